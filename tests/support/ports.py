"""Ports for servers started in a subprocess, which binds them only seconds after they are chosen."""

from __future__ import annotations

import random
import socket

# Below Linux's default ephemeral range (32768-60999): the kernel never hands these out to
# outgoing connections, so a port chosen here stays free while the subprocess starts up, which
# a port from `free_port()` (an ephemeral one) does not under a busy test run.
_LOW, _HIGH = 20000, 32767


def subprocess_port() -> int:
    for _ in range(200):
        port = random.randint(_LOW, _HIGH)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")

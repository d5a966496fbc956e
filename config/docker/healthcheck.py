"""Container health check: exit 0 when the service in this container answers GET /health.

Docker's HEALTHCHECK runs it (``python healthcheck.py relay`` or ``... api``); the slim base has
no curl, and the standard library keeps it free of the app's imports, so it costs ~30 ms. The
port comes from the same variable the service binds (RELAY_PORT / API_PORT), so a changed port
cannot leave a stale check behind. Liveness only: readiness (/ready) is the load balancer's call.
"""

from __future__ import annotations

import http.client
import os
import sys

PORTS = {"relay": ("RELAY_PORT", 8090), "api": ("API_PORT", 8080)}
TIMEOUT_SECONDS = 3.0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in PORTS:
        print(f"usage: {argv[0]} {'|'.join(PORTS)}", file=sys.stderr)
        return 2
    variable, default = PORTS[argv[1]]
    port = int(os.environ.get(variable) or default)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/health")
        status = connection.getresponse().status
    except OSError as exc:
        print(f"{argv[1]} on port {port}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"{argv[1]} on port {port}: /health answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Checks that secrets stay out of what the API says and logs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence


def assert_no_secret_in(
    texts: Iterable[str], records: Sequence[logging.LogRecord], secrets: Sequence[str]
) -> None:
    """No secret in any response text, nor in any log record's message or extra fields.

    Fails when no record was captured at all, so a capture that was not live cannot pass."""
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert records, "expected the API to log something over this flow"
    for record in records:
        rendered = record.getMessage() + repr(record.__dict__)
        for secret in secrets:
            assert secret not in rendered, record.name

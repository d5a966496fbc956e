"""WebSocket close codes of ``/twilio/stream``: the stable reason is also the close frame's reason.

Twilio does not act on close codes; they are for logs, tests and whoever reads a packet capture.
Codes follow HTTP where one fits (4000 + status):

=====================  =====  ==========================================================
reason                 code   when
=====================  =====  ==========================================================
(the call's reason)    1000   the call ended: agent_ended, caller_hangup, transferred, ...
message_too_large      1009   a message over RELAY_TWILIO_MAX_MESSAGE_BYTES
internal_error         1011   a fault inside the relay
invalid_json           4400   a frame that is not a JSON object
invalid_message        4400   a message of the wrong shape (also a second ``start``)
missing_start          4400   ``media``/``mark``/``dtmf``/``stop`` before ``start``
unknown_stream         4400   a ``streamSid`` that is not the stream's
bad_payload            4400   ``media.payload`` that is not base64
unauthorized           4401   no ``token`` parameter, or a token that does not verify
forbidden              4403   a token that is not a caller's, or a session refused
not_a_phone_call       4403   the token's call is not a phone call
call_mismatch          4403   ``start.callSid`` is not the call's Twilio CallSid
start_timeout          4408   no ``start`` within RELAY_TWILIO_START_TIMEOUT_SECONDS
call_in_progress       4409   the call already has its stream
call_ended             4410   the call ended before this stream started
unsupported_format     4415   ``mediaFormat`` other than audio/x-mulaw, 8000 Hz, mono
rate_limited           4429   the tenant's connection rate
tenant_limit           4429   the tenant's concurrent calls
upstream_unavailable   4503   the control API, Redis or the agent cannot be reached
draining               4503   this relay is shutting down
=====================  =====  ==========================================================
"""

from __future__ import annotations

from typing import Final

NORMAL_CLOSE: Final = 1000
INTERNAL_ERROR: Final = 1011

STREAM_CLOSE_CODES: Final[dict[str, int]] = {
    "message_too_large": 1009,
    "internal_error": INTERNAL_ERROR,
    "invalid_json": 4400,
    "invalid_message": 4400,
    "missing_start": 4400,
    "unknown_stream": 4400,
    "bad_payload": 4400,
    "unauthorized": 4401,
    "forbidden": 4403,
    "not_a_phone_call": 4403,
    "call_mismatch": 4403,
    "start_timeout": 4408,
    "call_in_progress": 4409,
    "call_ended": 4410,
    "unsupported_format": 4415,
    "rate_limited": 4429,
    "tenant_limit": 4429,
    "upstream_unavailable": 4503,
    "not_ready": 4503,
    "draining": 4503,
}


def close_code_for(reason: str) -> int:
    """The close code of a stable reason (unknown reasons are internal errors)."""
    return STREAM_CLOSE_CODES.get(reason, INTERNAL_ERROR)

"""Why a call ended: the upstream's close code and last error mapped to ``call.ended`` {reason, code}.

``reason`` is coarse (what a client shows or retries on); ``code`` is finer and stable (what a
dashboard groups by). Both are identifiers we define: upstream free text never becomes a code,
only ElevenLabs' documented error types do (reference §1.9).

Upstream mapping (``end_from_upstream_close``):

=============================  ===================  =============================================
close                          reason               code
=============================  ===================  =============================================
1000                           agent_ended          normal
1000 + max_duration_exceeded   max_duration         max_duration_exceeded
1002                           upstream_error       quota_exceeded (quota text), the error type,
                                                    or protocol_error
1008                           upstream_rejected    the error type (override_error,
                                                    missing_dynamic_variable, ...) or
                                                    policy_violation
1011                           upstream_crashed     the error type or internal_error
1001                           upstream_lost        going_away
None / 1006                    upstream_lost        connection_lost (or, when an error message
                                                    came first, as for that error's code)
anything else                  upstream_error       close_<code>
=============================  ===================  =============================================

After the agent's ``end_call`` tool (``agent_tool_response``), the relay ends the call
``AGENT_END_CALL`` (agent_ended / end_call) whatever close follows (relay.bridge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from relay.protocol.elevenlabs import UpstreamError

EndedBy: TypeAlias = Literal["caller", "agent", "relay"]


@dataclass(frozen=True, slots=True)
class CallEnd:
    reason: str
    code: str
    ended_by: EndedBy
    failed: bool  # True when the call did not end the way a participant meant it to


# --- Ends the relay decides ---------------------------------------------------------------------

CALLER_HANGUP: Final = CallEnd("caller_hangup", "normal", "caller", False)
# The caller's connection vanished (no call.end) and did not come back within the grace period.
CLIENT_GONE: Final = CallEnd("client_gone", "reconnect_timeout", "caller", False)
AGENT_END_CALL: Final = CallEnd("agent_ended", "end_call", "agent", False)
SHUTDOWN: Final = CallEnd("shutdown", "draining", "relay", False)
IDLE_TIMEOUT: Final = CallEnd("idle_timeout", "idle_timeout", "relay", False)
MAX_DURATION: Final = CallEnd("max_duration", "max_duration_exceeded", "relay", False)
UPSTREAM_TIMEOUT: Final = CallEnd("upstream_unavailable", "upstream_timeout", "relay", True)
UPSTREAM_UNAVAILABLE: Final = CallEnd("upstream_unavailable", "connect_failed", "relay", True)
UPSTREAM_PROTOCOL_ERROR: Final = CallEnd("upstream_error", "protocol_violation", "relay", True)
RELAY_ERROR: Final = CallEnd("relay_error", "internal_error", "relay", True)
# A phone call the agent transferred to a number (Twilio <Dial>): it goes on without us.
TRANSFERRED: Final = CallEnd("transferred", "transferred", "agent", False)
# The replica carrying a call that cannot move (a phone leg) died; another replica ended it.
OWNER_LOST: Final = CallEnd("relay_lost", "owner_crashed", "relay", True)

# --- ElevenLabs error types (AsyncAPI ErrorType), by the close code they come with -------------

MAX_DURATION_TYPE: Final = "max_duration_exceeded"
_TYPES_1002: Final = frozenset(
    {
        "safety_violation",
        "llm_timeout",
        "transport_receive_timeout",
        "asyncio_timeout",
        "http_exception",
        "llm_error",
        "custom_llm_error",
        "cascade_brain_error",
        "asr_transcription_error",
        "vad_error",
        "turn_probability_error",
        "tts_cascade_error",
        "redis_timeout_error",
    }
)
_TYPES_1008: Final = frozenset(
    {
        "invalid_message",
        "telephony_agent_error",
        "mcp_tool_error",
        "mcp_https_error",
        "value_error",
        "missing_fields",
        "override_error",
        "missing_dynamic_variable_transfer",
        "missing_dynamic_variable",
    }
)
_TYPES_1011: Final = frozenset({"unknown_websocket_crash"})
KNOWN_ERROR_TYPES: Final = _TYPES_1002 | _TYPES_1008 | _TYPES_1011 | {MAX_DURATION_TYPE}
# Longest first, so that text naming "custom_llm_error" is not taken for "llm_error".
_TYPES_LONGEST_FIRST: Final = tuple(sorted(KNOWN_ERROR_TYPES, key=lambda t: (-len(t), t)))
_QUOTA_MARKERS: Final = ("exceeds your quota", "quota limit", "quota exceeded")
_ABNORMAL: Final = frozenset({1005, 1006})


def end_from_upstream_close(
    close_code: int | None, close_reason: str, last_error: UpstreamError | None
) -> CallEnd:
    """How the call ended when the upstream socket closed (``close_code`` None: no close frame)."""
    error_type = _known_type(close_reason, last_error)
    code = close_code
    if (code is None or code in _ABNORMAL) and last_error is not None and last_error.code:
        # The server said why in an error message, then the connection dropped without a close.
        code = last_error.code
    if error_type == MAX_DURATION_TYPE:
        return CallEnd("max_duration", MAX_DURATION_TYPE, "agent", False)
    if code == 1000:
        return CallEnd("agent_ended", "normal", "agent", False)
    if code == 1002:
        if _mentions_quota(close_reason, last_error):
            return CallEnd("upstream_error", "quota_exceeded", "agent", True)
        return CallEnd(
            "upstream_error", _typed(error_type, _TYPES_1002, "protocol_error"), "agent", True
        )
    if code == 1008:
        return CallEnd(
            "upstream_rejected", _typed(error_type, _TYPES_1008, "policy_violation"), "agent", True
        )
    if code == 1011:
        return CallEnd(
            "upstream_crashed", _typed(error_type, _TYPES_1011, "internal_error"), "agent", True
        )
    if code == 1001:
        return CallEnd("upstream_lost", "going_away", "agent", True)
    if code is None or code in _ABNORMAL:
        return CallEnd("upstream_lost", "connection_lost", "agent", True)
    return CallEnd("upstream_error", f"close_{code}", "agent", True)


def _known_type(close_reason: str, last_error: UpstreamError | None) -> str | None:
    """The documented error type named by the error message or the close reason, if any."""
    if last_error is not None and last_error.error_type in KNOWN_ERROR_TYPES:
        return last_error.error_type
    texts = [close_reason.lower()]
    if last_error is not None:
        texts.append(last_error.message.lower())
    for text in texts:
        if not text:
            continue
        for known in _TYPES_LONGEST_FIRST:
            if known in text:
                return known
    return None


def _typed(error_type: str | None, allowed: frozenset[str], default: str) -> str:
    return error_type if error_type in allowed else default


def _mentions_quota(close_reason: str, last_error: UpstreamError | None) -> bool:
    texts = (close_reason, last_error.message if last_error is not None else "")
    return any(marker in text.lower() for text in texts for marker in _QUOTA_MARKERS)

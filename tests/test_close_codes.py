"""Upstream close codes and error messages → call.ended {reason, code}."""

from __future__ import annotations

import pytest

from relay.protocol import close_codes
from relay.protocol.close_codes import CallEnd, end_from_upstream_close
from relay.protocol.elevenlabs import ElevenLabsProtocol, UpstreamError

QUOTA = (
    "received 1002 (protocol error) This request exceeds your quota limit.; "
    "then sent 1002 (protocol error) This request exceeds your quota limit."
)


@pytest.mark.parametrize(
    ("close_code", "close_reason", "last_error", "expected"),
    [
        (1000, "", None, CallEnd("agent_ended", "normal", "agent", False)),
        (1000, "Conversation ended", None, CallEnd("agent_ended", "normal", "agent", False)),
        (
            1000,
            "",
            UpstreamError("max_duration_exceeded", 1000, "max_duration_exceeded"),
            CallEnd("max_duration", "max_duration_exceeded", "agent", False),
        ),
        (
            1000,
            "max_duration_exceeded",
            None,
            CallEnd("max_duration", "max_duration_exceeded", "agent", False),
        ),
        (1002, "", None, CallEnd("upstream_error", "protocol_error", "agent", True)),
        (
            1002,
            "",
            UpstreamError(QUOTA, None, None),
            CallEnd("upstream_error", "quota_exceeded", "agent", True),
        ),
        (
            1002,
            "This request exceeds your quota limit.",
            None,
            CallEnd("upstream_error", "quota_exceeded", "agent", True),
        ),
        (
            1002,
            "",
            UpstreamError("LLM response took over 20 seconds", 1002, "llm_timeout"),
            CallEnd("upstream_error", "llm_timeout", "agent", True),
        ),
        (
            1002,
            "",
            UpstreamError("No user input for 60 seconds", 1002, "transport_receive_timeout"),
            CallEnd("upstream_error", "transport_receive_timeout", "agent", True),
        ),
        (
            1002,
            "The AI agent you are trying to reach appears to be misconfigured",
            None,
            CallEnd("upstream_error", "protocol_error", "agent", True),
        ),
        (1008, "", None, CallEnd("upstream_rejected", "policy_violation", "agent", True)),
        (
            1008,
            "",
            UpstreamError(
                "Override for field first_message is not allowed", 1008, "override_error"
            ),
            CallEnd("upstream_rejected", "override_error", "agent", True),
        ),
        (
            1008,
            "",
            UpstreamError("Missing required dynamic variables", 1008, "missing_dynamic_variable"),
            CallEnd("upstream_rejected", "missing_dynamic_variable", "agent", True),
        ),
        (
            1008,
            "missing_dynamic_variable_transfer: customer",
            None,
            CallEnd("upstream_rejected", "missing_dynamic_variable_transfer", "agent", True),
        ),
        (
            1008,
            "override_error",
            None,
            CallEnd("upstream_rejected", "override_error", "agent", True),
        ),
        (1011, "", None, CallEnd("upstream_crashed", "internal_error", "agent", True)),
        (
            1011,
            "",
            UpstreamError("crash", 1011, "unknown_websocket_crash"),
            CallEnd("upstream_crashed", "unknown_websocket_crash", "agent", True),
        ),
        (None, "", None, CallEnd("upstream_lost", "connection_lost", "agent", True)),
        (1006, "", None, CallEnd("upstream_lost", "connection_lost", "agent", True)),
        (1005, "", None, CallEnd("upstream_lost", "connection_lost", "agent", True)),
        (1001, "", None, CallEnd("upstream_lost", "going_away", "agent", True)),
        (4000, "", None, CallEnd("upstream_error", "close_4000", "agent", True)),
        (1009, "", None, CallEnd("upstream_error", "close_1009", "agent", True)),
    ],
)
def test_upstream_close_mapping(
    close_code: int | None, close_reason: str, last_error: UpstreamError | None, expected: CallEnd
) -> None:
    assert end_from_upstream_close(close_code, close_reason, last_error) == expected


def test_an_error_message_explains_a_connection_that_then_dropped() -> None:
    error = UpstreamError("Override not allowed", 1008, "override_error")
    assert end_from_upstream_close(None, "", error) == CallEnd(
        "upstream_rejected", "override_error", "agent", True
    )
    assert (
        end_from_upstream_close(1006, "", UpstreamError(QUOTA, 1002, None)).code == "quota_exceeded"
    )


def test_error_types_only_count_under_their_own_close_code() -> None:
    # An error type documented for 1008 does not become the code of a 1002 close.
    end = end_from_upstream_close(1002, "", UpstreamError("x", 1002, "override_error"))
    assert end == CallEnd("upstream_error", "protocol_error", "agent", True)


def test_upstream_free_text_never_becomes_a_code() -> None:
    end = end_from_upstream_close(1008, "<script>", UpstreamError("'; drop", 1008, "made_up_type"))
    assert end.code == "policy_violation"


def test_longest_error_type_wins_in_text() -> None:
    end = end_from_upstream_close(1002, "custom_llm_error: upstream 500", None)
    assert end.code == "custom_llm_error"


def test_mapping_from_the_protocols_last_error() -> None:
    protocol = ElevenLabsProtocol()
    protocol.receive_text('{"type":"error","message":"This request exceeds your quota limit."}')
    assert end_from_upstream_close(1002, "", protocol.last_error).code == "quota_exceeded"


def test_relay_side_ends() -> None:
    assert CallEnd("caller_hangup", "normal", "caller", False) == close_codes.CALLER_HANGUP
    assert close_codes.SHUTDOWN.reason == "shutdown"
    assert close_codes.IDLE_TIMEOUT.reason == "idle_timeout"
    assert close_codes.MAX_DURATION.reason == "max_duration"
    assert close_codes.UPSTREAM_TIMEOUT.reason == "upstream_unavailable"
    assert close_codes.UPSTREAM_TIMEOUT.failed
    assert close_codes.CLIENT_GONE.ended_by == "caller"
    assert CallEnd("agent_ended", "end_call", "agent", False) == close_codes.AGENT_END_CALL
    relay_ends = [
        close_codes.SHUTDOWN,
        close_codes.IDLE_TIMEOUT,
        close_codes.MAX_DURATION,
        close_codes.UPSTREAM_TIMEOUT,
        close_codes.UPSTREAM_UNAVAILABLE,
        close_codes.UPSTREAM_PROTOCOL_ERROR,
        close_codes.RELAY_ERROR,
    ]
    assert all(end.ended_by == "relay" for end in relay_ends)

"""The TwiML documents the voice webhook answers with, built with twilio's own TwiML classes."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, VoiceResponse  # type: ignore[import-untyped]

TWIML_MEDIA_TYPE = "text/xml"
# Twilio: "the combined length of the name and value [of a <Parameter>] must be less than 500".
MAX_PARAMETER_LENGTH = 499

UNKNOWN_NUMBER = "Sorry, this number is not in service. Goodbye."
REFUSED = "Sorry, this call cannot be connected. Goodbye."
BUSY = "Sorry, all our lines are busy right now. Please call again later. Goodbye."
TROUBLE = "Sorry, we are having technical difficulties. Please call again later. Goodbye."


class ParameterTooLong(ValueError):
    """A <Parameter> would exceed Twilio's limit; the message names it, never its value."""


def connect_stream(stream_url: str, parameters: Mapping[str, str]) -> str:
    """``<Connect><Stream url>`` with one ``<Parameter>`` per entry (Twilio hands them to the
    stream's ``start.customParameters``; the URL itself takes no query string)."""
    for name, value in parameters.items():
        if len(name) + len(value) > MAX_PARAMETER_LENGTH:
            raise ParameterTooLong(f"the <Parameter> {name!r} is {len(name) + len(value)} chars")
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def say_and_hang_up(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def dial(number: str) -> str:
    """What a live call is redirected to on transfer."""
    response = VoiceResponse()
    response.dial(number)
    return str(response)


def empty() -> str:
    """An answer that makes Twilio do nothing (status callbacks ignore the body anyway)."""
    return str(VoiceResponse())

"""Re-export of the shared audio formats, which live in voicerelay.audio_formats (the relay uses them too)."""

from voicerelay.audio_formats import (
    AUDIO_FORMAT_NAMES,
    DEFAULT_AUDIO_FORMAT,
    TWILIO_AUDIO_FORMAT,
    AudioFormat,
    audio_format_or_none,
    coerce_audio_format,
    parse_audio_format,
)

__all__ = [
    "AUDIO_FORMAT_NAMES",
    "DEFAULT_AUDIO_FORMAT",
    "TWILIO_AUDIO_FORMAT",
    "AudioFormat",
    "audio_format_or_none",
    "coerce_audio_format",
    "parse_audio_format",
]

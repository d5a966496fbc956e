"""The ElevenLabs Conversational AI audio formats, shared by the control API and the relay.

Each name is ``<encoding>_<sample rate>``: PCM is 16-bit little-endian mono, μ-law is G.711
8-bit mono; both are raw (headerless) and base64-encoded on the wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class AudioFormat(StrEnum):
    pcm_8000 = "pcm_8000"
    pcm_16000 = "pcm_16000"
    pcm_22050 = "pcm_22050"
    pcm_24000 = "pcm_24000"
    pcm_44100 = "pcm_44100"
    pcm_48000 = "pcm_48000"
    ulaw_8000 = "ulaw_8000"

    @property
    def encoding(self) -> Literal["pcm", "ulaw"]:
        return "ulaw" if self.value.startswith("ulaw_") else "pcm"

    @property
    def sample_rate(self) -> int:
        return int(self.value.partition("_")[2])

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.encoding == "ulaw" else 2

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.bytes_per_sample

    def bytes_for_ms(self, milliseconds: int) -> int:
        """Size of ``milliseconds`` of audio, rounded down to whole samples."""
        return self.sample_rate * milliseconds // 1000 * self.bytes_per_sample


# ElevenLabs' default for both directions when an agent does not say otherwise.
DEFAULT_AUDIO_FORMAT = AudioFormat.pcm_16000
# What Twilio Media Streams carry.
TWILIO_AUDIO_FORMAT = AudioFormat.ulaw_8000
AUDIO_FORMAT_NAMES: tuple[str, ...] = tuple(f.value for f in AudioFormat)


def parse_audio_format(value: str) -> AudioFormat:
    """The format named ``value`` (exact, case-sensitive as ElevenLabs sends it)."""
    try:
        return AudioFormat(value)
    except ValueError:
        raise ValueError(
            f"unknown audio format; expected one of {', '.join(AUDIO_FORMAT_NAMES)}"
        ) from None


def audio_format_or_none(value: object) -> AudioFormat | None:
    """Lenient parse for peer-supplied metadata: None instead of an error."""
    if isinstance(value, str):
        try:
            return AudioFormat(value)
        except ValueError:
            return None
    return None


def coerce_audio_format(value: str | AudioFormat) -> AudioFormat:
    """``value`` as an AudioFormat; a name is parsed (ValueError if unknown)."""
    return value if isinstance(value, AudioFormat) else parse_audio_format(value)

"""Audio for the emulated agent: ElevenLabs format names, μ-law, loudness and a test tone.

Formats are ``pcm_<rate>`` (PCM16 little-endian mono) and ``ulaw_8000`` (G.711 μ-law), as in the
ConvAI protocol. Everything is deterministic so tests can compare bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

AUDIO_FORMATS = frozenset(
    {"pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100", "pcm_48000", "ulaw_8000"}
)
TONE_HZ = 440.0
TONE_AMPLITUDE = 8000


@dataclass(frozen=True)
class Format:
    name: str
    encoding: Literal["pcm", "ulaw"]
    sample_rate: int

    @property
    def sample_width(self) -> int:
        return 2 if self.encoding == "pcm" else 1

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.sample_width

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_second

    def nbytes(self, seconds: float) -> int:
        samples = round(seconds * self.sample_rate)
        return samples * self.sample_width


def parse_format(name: str) -> Format:
    encoding, _, rate = name.partition("_")
    if name not in AUDIO_FORMATS or encoding not in ("pcm", "ulaw"):
        raise ValueError(f"unknown audio format {name!r}")
    return Format(name, "pcm" if encoding == "pcm" else "ulaw", int(rate))


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


_ULAW_TO_PCM = _ulaw_decode_table()


_ULAW_SEGMENT_ENDS = np.array(
    [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32
)


def ulaw_encode(samples: npt.NDArray[np.int16]) -> bytes:
    """G.711 μ-law of PCM16 samples, bit-identical to audioop.lin2ulaw (which the relay uses)."""
    values = samples.astype(np.int32) >> 2  # audioop encodes the top 14 bits
    negative = values < 0
    magnitude = np.minimum(np.where(negative, -values, values), 8159) + 0x21
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude).astype(np.int32)
    code = np.where(
        segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    )
    codes: npt.NDArray[np.uint8] = (code ^ np.where(negative, 0x7F, 0xFF)).astype(np.uint8)
    return codes.tobytes()


def pcm_samples(audio: bytes, fmt: Format) -> npt.NDArray[np.int16]:
    if fmt.encoding == "ulaw":
        return _ULAW_TO_PCM[np.frombuffer(audio, dtype=np.uint8)]
    whole = len(audio) - len(audio) % 2
    return np.frombuffer(audio[:whole], dtype="<i2").astype(np.int16)


def rms(audio: bytes, fmt: Format) -> float:
    samples = pcm_samples(audio, fmt)
    if samples.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))


def tone(fmt: Format, seconds: float) -> bytes:
    """A deterministic 440 Hz tone of ``seconds`` in ``fmt``."""
    count = round(max(0.0, seconds) * fmt.sample_rate)
    phase = 2 * np.pi * TONE_HZ * np.arange(count, dtype=np.float64) / fmt.sample_rate
    samples = np.round(TONE_AMPLITUDE * np.sin(phase)).astype(np.int16)
    if fmt.encoding == "ulaw":
        return ulaw_encode(samples)
    return samples.astype("<i2").tobytes()

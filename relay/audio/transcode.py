"""Streaming conversion between the ElevenLabs audio formats (PCM16LE mono at 8 to 48 kHz, μ-law 8 kHz).

One ``Transcoder`` per direction per call: it keeps the resampler's filter history and a dangling
odd byte of PCM16 between chunks, so a stream cut into frames of any size converts the same as the
whole signal at once (within ±2 LSB; the resampler rounds differently at block edges).

Pipeline: decode to PCM16 at the source rate (μ-law with ``audioop``) → resample with
``soxr.ResampleStream(dtype="int16")`` if the rates differ → encode (μ-law with ``audioop``).
When source and destination are the same format, ``convert`` returns the very object it was given.

Resampler choice (measured with soxr 1.1.0 / libsoxr, 20 ms frames; see tests/test_transcode.py):

* ``quality="HQ"`` (20-bit precision): the audio is 16-bit, so VHQ's 28 bits buy nothing audible,
  while in fixed-rate mode VHQ doubles the latency of 16k↔24k/48k (≈42 ms vs ≈21 ms mean).
  Measured tone SNR is ≈85 dB (the int16 floor) and aliasing ≈-86 dB in both.
* ``vr=True`` (libsoxr's variable-rate engine, used at a fixed ratio) by default: fixed-rate soxr
  emits output in bursts of ~100 ms (8 kHz↔16 kHz HQ: nothing for four 20 ms frames, then 1660
  samples), i.e. 63 ms mean and up to 115 ms of added, jittery latency on the Twilio↔agent path.
  The variable-rate engine emits every frame with a constant lag: **30 ms at 8k→16k, 15 ms at
  16k→8k/24k/48k, 10-14 ms when downsampling from 24k/44.1k**, at the same measured SNR and
  aliasing. It costs more CPU. Whole ``convert`` per 20 ms frame, one core of the dev machine
  (low_latency / fixed-rate): μ-law 8k→PCM 16k 16 / 8 µs, PCM 16k→μ-law 8k 14 / 7 µs,
  PCM 48k→16k 76 / 16 µs, PCM 16k→48k 47 / 17 µs, PCM 44.1k→μ-law 8k 55 / 20 µs;
  μ-law↔PCM at 8k (no resampling) under 1 µs; passthrough 0.2 µs.
  python-soxr marks ``vr`` experimental (its ``set_io_ratio`` API, which we do not use), so
  ``low_latency=False`` selects the fixed-rate engine.

Either way the lag is real: ``flush()`` (end of a stream) returns the samples still held back;
``reset()`` (after an interruption or a reconnect gap) drops them.
"""

from __future__ import annotations

import sys
import warnings
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

from voicerelay.audio_formats import AudioFormat, coerce_audio_format

with warnings.catch_warnings():
    # Deprecated (not broken) on 3.11/3.12; the audioop-lts package provides it on 3.13+.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

RESAMPLER_QUALITY: Final = "HQ"
_SAMPLE_WIDTH: Final = 2  # PCM16
_NO_SAMPLES: Final = np.zeros(0, dtype=np.int16)


class Transcoder:
    """Converts one stream from ``src`` to ``dst``; not shared between streams or calls."""

    __slots__ = (
        "_carry",
        "_decode_ulaw",
        "_encode_ulaw",
        "_resampler",
        "dst",
        "passthrough",
        "src",
    )

    def __init__(
        self, src: str | AudioFormat, dst: str | AudioFormat, *, low_latency: bool = True
    ) -> None:
        self.src = coerce_audio_format(src)
        self.dst = coerce_audio_format(dst)
        self.passthrough = self.src == self.dst
        if not self.passthrough and sys.byteorder != "little":
            # audioop and numpy work in native order and the wire is little-endian.
            raise RuntimeError("audio conversion needs a little-endian host")
        self._decode_ulaw = self.src.encoding == "ulaw"
        self._encode_ulaw = self.dst.encoding == "ulaw"
        self._carry = b""
        self._resampler: soxr.ResampleStream | None = None
        if self.src.sample_rate != self.dst.sample_rate:
            self._resampler = soxr.ResampleStream(
                self.src.sample_rate,
                self.dst.sample_rate,
                1,
                dtype="int16",
                quality=RESAMPLER_QUALITY,
                vr=low_latency,
            )

    def convert(self, chunk: bytes) -> bytes:
        """The converted audio available so far (may be ``b""`` while the resampler fills)."""
        if self.passthrough:
            return chunk
        pcm = audioop.ulaw2lin(chunk, _SAMPLE_WIDTH) if self._decode_ulaw else self._whole(chunk)
        if self._resampler is None:
            # Same rate, different encoding: only μ-law 8 kHz ↔ PCM 8 kHz gets here.
            return audioop.lin2ulaw(pcm, _SAMPLE_WIDTH) if self._encode_ulaw else bytes(pcm)
        if not pcm:
            return b""
        return self._encode(self._resampler.resample_chunk(np.frombuffer(pcm, dtype=np.int16)))

    def flush(self) -> bytes:
        """End of stream: the samples the resampler still holds; then ready for a new stream.

        A dangling odd byte (half a sample) is dropped.
        """
        self._carry = b""
        if self._resampler is None:
            return b""
        tail = self._resampler.resample_chunk(_NO_SAMPLES, last=True)
        self._resampler.clear()
        return self._encode(tail)

    def reset(self) -> None:
        """Forget history (resampler state, odd byte) without emitting it, e.g. after an interruption."""
        self._carry = b""
        if self._resampler is not None:
            self._resampler.clear()

    def _whole(self, chunk: bytes) -> bytes | memoryview:
        """``chunk`` cut to whole PCM16 samples, the odd byte kept for the next chunk."""
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if len(chunk) & 1:
            self._carry = chunk[-1:]
            return memoryview(chunk)[:-1]
        return chunk

    def _encode(self, samples: npt.NDArray[np.int16]) -> bytes:
        if not samples.size:
            return b""
        if self._encode_ulaw:
            return audioop.lin2ulaw(samples.data, _SAMPLE_WIDTH)  # .data: a view, no copy
        return samples.tobytes()

    def __repr__(self) -> str:
        return f"Transcoder({self.src.value} -> {self.dst.value})"


def make_transcoder(src: str | AudioFormat, dst: str | AudioFormat) -> Transcoder:
    """A transcoder from ``src`` to ``dst`` with the default (low-latency) resampler."""
    return Transcoder(src, dst)

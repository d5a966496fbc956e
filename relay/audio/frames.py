"""Frame arithmetic for raw audio (sizes, durations, whole samples)."""

from __future__ import annotations

from voicerelay.audio_formats import AudioFormat, coerce_audio_format


def duration_seconds(nbytes: int, fmt: str | AudioFormat) -> float:
    """How long ``nbytes`` of raw audio in ``fmt`` plays (a trailing partial sample counts as nothing)."""
    audio_format = coerce_audio_format(fmt)
    return (nbytes // audio_format.bytes_per_sample) / audio_format.sample_rate


def is_whole_samples(nbytes: int, fmt: str | AudioFormat) -> bool:
    """True when ``nbytes`` holds no partial sample (any size is whole for 8-bit μ-law)."""
    return nbytes % coerce_audio_format(fmt).bytes_per_sample == 0


def bytes_for_seconds(seconds: float, fmt: str | AudioFormat) -> int:
    """Size of ``seconds`` of audio in ``fmt``, rounded down to whole samples."""
    audio_format = coerce_audio_format(fmt)
    return int(seconds * audio_format.sample_rate) * audio_format.bytes_per_sample

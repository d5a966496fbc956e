"""Audio for the relay: format arithmetic and streaming transcoding (pure, no I/O)."""

from relay.audio.frames import bytes_for_seconds, duration_seconds, is_whole_samples
from relay.audio.transcode import Transcoder, make_transcoder

__all__ = [
    "Transcoder",
    "bytes_for_seconds",
    "duration_seconds",
    "is_whole_samples",
    "make_transcoder",
]

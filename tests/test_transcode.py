"""Streaming transcoder: μ-law accuracy, resampling fidelity, durations, chunking, odd bytes, latency."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from relay.audio import Transcoder, duration_seconds, is_whole_samples, make_transcoder
from relay.audio.frames import bytes_for_seconds
from voicerelay.audio_formats import AudioFormat

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MODES = pytest.mark.parametrize("low_latency", [True, False], ids=["vr", "fixed"])


def tone(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 12000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq * t) * amplitude).astype(np.int16)


def pcm(samples: np.ndarray) -> bytes:
    return samples.astype("<i2").tobytes()


def samples_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def convert_chunked(t: Transcoder, data: bytes, sizes: list[int]) -> bytes:
    out = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            break
        out.append(t.convert(data[pos : pos + size]))
        pos += size
    out.append(t.flush())
    return b"".join(out)


def convert_all(t: Transcoder, data: bytes) -> bytes:
    return t.convert(data) + t.flush()


def frames(data: bytes, fmt: AudioFormat, ms: int = 20) -> list[bytes]:
    size = fmt.bytes_for_ms(ms)
    return [data[i : i + size] for i in range(0, len(data), size)]


def assert_close(a: bytes, b: bytes, fmt: AudioFormat) -> None:
    """Equal within the resampler's rounding: soxr's int16 output dithers by up to ±2 LSB depending
    on its history; through μ-law that is at most one quantization step."""
    assert len(a) == len(b)
    if fmt.encoding == "pcm":
        assert np.all(np.abs(samples_of(a) - samples_of(b)) <= 2)
    else:
        x, y = samples_of(audioop.ulaw2lin(a, 2)), samples_of(audioop.ulaw2lin(b, 2))
        assert np.all(np.abs(x - y) <= np.abs(y) / 16 + 8)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


# --- μ-law ---------------------------------------------------------------------------------------


def test_ulaw_round_trip_error_is_within_g711_quantization() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    to_ulaw = Transcoder("pcm_8000", "ulaw_8000")
    to_pcm = Transcoder("ulaw_8000", "pcm_8000")
    ulaw = to_ulaw.convert(pcm(every))
    assert len(ulaw) == len(every)
    back = samples_of(to_pcm.convert(ulaw))
    error = np.abs(back - every.astype(np.float64))
    # G.711 μ-law: 8 segments of 16 steps; the step doubles per segment, so the error is at most
    # half a step, about 1/32 of the magnitude, plus the finest step near zero.
    assert np.all(error <= np.abs(every.astype(np.float64)) / 16 + 8)
    assert error.max() <= 1024  # the top segment's step is 1024 (16-bit scale), clip edge aside
    # A speech-level tone keeps ~35 dB+ signal-to-quantization-noise.
    x = tone(8000, 1.0, amplitude=8000)
    y = samples_of(to_pcm.convert(to_ulaw.convert(pcm(x))))
    snr = 20 * np.log10(rms(x.astype(np.float64)) / rms(y - x))
    assert snr > 35


def test_every_ulaw_code_survives_decode_then_encode() -> None:
    codes = bytes(range(256))
    back = Transcoder("pcm_8000", "ulaw_8000").convert(
        Transcoder("ulaw_8000", "pcm_8000").convert(codes)
    )
    differing = [c for c, b in zip(codes, back, strict=True) if c != b]
    # 0x7F is "negative zero"; it decodes to 0, which encodes as 0xFF ("positive zero").
    assert differing == [0x7F]


# --- Resampling fidelity ------------------------------------------------------------------------


@MODES
def test_440hz_tone_16k_pcm_to_8k_ulaw_and_back(low_latency: bool) -> None:
    x = tone(16000, 1.0)
    down = Transcoder("pcm_16000", "ulaw_8000", low_latency=low_latency)
    up = Transcoder("ulaw_8000", "pcm_16000", low_latency=low_latency)
    ulaw = b"".join(down.convert(f) for f in frames(pcm(x), AudioFormat.pcm_16000)) + down.flush()
    assert abs(len(ulaw) - 8000) <= 2
    back = b"".join(up.convert(f) for f in frames(ulaw, AudioFormat.ulaw_8000)) + up.flush()
    y = samples_of(back)
    assert abs(duration_seconds(len(back), "pcm_16000") - 1.0) < 0.003
    # Ignore the filters' start/stop transients.
    core_x = x[1600:-1600].astype(np.float64)
    core_y = y[1600:-1600]
    assert rms(core_y) == pytest.approx(rms(core_x), rel=0.05)
    assert dominant_frequency(core_y, 16000) == pytest.approx(440, abs=3)


@MODES
@pytest.mark.parametrize(
    ("src_rate", "dst_rate"),
    [(a, b) for a, b in itertools.permutations(PCM_RATES, 2)],
)
def test_resampling_preserves_duration_energy_and_pitch(
    src_rate: int, dst_rate: int, low_latency: bool
) -> None:
    src = AudioFormat(f"pcm_{src_rate}")
    dst = AudioFormat(f"pcm_{dst_rate}")
    x = tone(src_rate, 0.5, freq=1000)
    t = Transcoder(src, dst, low_latency=low_latency)
    out = b"".join(t.convert(f) for f in frames(pcm(x), src)) + t.flush()
    assert abs(len(out) // 2 - dst_rate // 2) <= 2  # whole duration, within 2 samples
    y = samples_of(out)
    margin = dst_rate // 20
    assert rms(y[margin:-margin]) == pytest.approx(
        rms(x[src_rate // 20 : -src_rate // 20]), rel=0.03
    )
    assert dominant_frequency(y[margin:-margin], dst_rate) == pytest.approx(1000, abs=5)


def test_downsampling_removes_content_above_the_new_nyquist() -> None:
    x = tone(16000, 0.5, freq=6000)  # above 4 kHz: must not alias into the 8 kHz output
    out = samples_of(convert_all(Transcoder("pcm_16000", "pcm_8000"), pcm(x)))
    assert rms(out[400:-400]) < rms(x.astype(np.float64)) * 0.001  # below -60 dB


# --- Streaming --------------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("pcm_16000", "ulaw_8000"),
        ("ulaw_8000", "pcm_16000"),
        ("pcm_48000", "pcm_16000"),
        ("pcm_22050", "pcm_24000"),
        ("pcm_8000", "ulaw_8000"),
        ("ulaw_8000", "pcm_44100"),
    ],
)
def test_chunked_streaming_equals_one_shot(src: str, dst: str, low_latency: bool) -> None:
    rng = np.random.default_rng(7)
    src_fmt = AudioFormat(src)
    noise = (rng.standard_normal(src_fmt.sample_rate) * 4000).astype(np.int16)
    data = pcm(noise) if src_fmt.encoding == "pcm" else audioop.lin2ulaw(pcm(noise), 2)
    one_shot = convert_all(Transcoder(src, dst, low_latency=low_latency), data)
    # Odd and even sizes, tiny and large: exercises the odd-byte carry and resampler state.
    sizes = [int(s) for s in rng.integers(1, 2000, size=50)]
    chunked = convert_chunked(Transcoder(src, dst, low_latency=low_latency), data, sizes)
    assert len(chunked) == len(one_shot)
    assert_close(chunked, one_shot, AudioFormat(dst))


def test_odd_byte_is_carried_to_the_next_chunk() -> None:
    x = pcm(tone(8000, 0.1))
    whole = Transcoder("pcm_8000", "ulaw_8000").convert(x)
    t = Transcoder("pcm_8000", "ulaw_8000")
    out = [t.convert(x[i : i + 1]) for i in range(len(x))]  # byte by byte
    assert out[0] == b""  # half a sample: nothing yet
    assert b"".join(out) == whole
    t2 = Transcoder("pcm_8000", "ulaw_8000")
    assert t2.convert(x[:3]) + t2.convert(x[3:]) == whole


def test_a_dangling_half_sample_is_dropped_by_flush_and_reset() -> None:
    x = pcm(tone(8000, 0.01))
    t = Transcoder("pcm_8000", "ulaw_8000")
    assert len(t.convert(x + b"\x01")) == len(x) // 2
    assert t.flush() == b""
    assert t.convert(x) == Transcoder("pcm_8000", "ulaw_8000").convert(x)  # no stale byte in front
    t.convert(b"\x01")
    t.reset()
    assert t.convert(x) == Transcoder("pcm_8000", "ulaw_8000").convert(x)


@MODES
def test_reset_forgets_resampler_history(low_latency: bool) -> None:
    x = pcm(tone(16000, 0.2, freq=300))
    used = Transcoder("pcm_16000", "ulaw_8000", low_latency=low_latency)
    used.convert(pcm(tone(16000, 0.3, freq=2000)))
    kept = Transcoder("pcm_16000", "pcm_8000", low_latency=low_latency)
    kept.convert(pcm(tone(16000, 0.3, freq=2000)))
    used.reset()
    fresh_out = convert_all(Transcoder("pcm_16000", "ulaw_8000", low_latency=low_latency), x)
    assert_close(convert_all(used, x), fresh_out, AudioFormat.ulaw_8000)
    # Without reset the old tone's tail comes out first.
    with_history = convert_all(kept, x)
    fresh_pcm = convert_all(Transcoder("pcm_16000", "pcm_8000", low_latency=low_latency), x)
    assert len(with_history) > len(fresh_pcm)


def test_flush_leaves_the_transcoder_ready_for_a_new_stream() -> None:
    x = pcm(tone(16000, 0.2))
    t = Transcoder("pcm_16000", "pcm_24000")
    first = convert_all(t, x)
    assert_close(convert_all(t, x), first, AudioFormat.pcm_24000)


@pytest.mark.parametrize("name", [f.value for f in AudioFormat])
def test_passthrough_returns_the_same_object_and_holds_nothing(name: str) -> None:
    t = make_transcoder(name, AudioFormat(name))
    assert t.passthrough
    chunk = bytes(range(7))  # even an odd size is not touched
    assert t.convert(chunk) is chunk
    assert t.flush() == b""
    t.reset()
    assert not make_transcoder("pcm_16000", "ulaw_8000").passthrough


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown audio format"):
        make_transcoder("pcm_11025", "pcm_16000")
    with pytest.raises(ValueError, match="unknown audio format"):
        make_transcoder("pcm_16000", "mp3_44100")


# --- Latency: samples in vs out, not wall-clock time ------------------------------------------


def _lags_ms(t: Transcoder, n_frames: int) -> tuple[list[float], list[int], int]:
    """Steady-state lag after each 20 ms frame (expected minus produced output), output sizes,
    and what flush() returned."""
    src, dst = t.src, t.dst
    frame = pcm(tone(src.sample_rate, 0.02)) if src.encoding == "pcm" else b"\xff" * 160
    produced = 0
    lags, sizes = [], []
    for i in range(1, n_frames + 1):
        out = len(t.convert(frame)) // dst.bytes_per_sample
        produced += out
        sizes.append(out)
        expected = i * dst.sample_rate // 50
        lags.append((expected - produced) * 1000 / dst.sample_rate)
    tail = len(t.flush()) // dst.bytes_per_sample
    assert abs(produced + tail - n_frames * dst.sample_rate // 50) <= 2
    return lags[10:], sizes[10:], tail


@pytest.mark.parametrize(
    ("src", "dst", "lag_ms"),
    [
        ("ulaw_8000", "pcm_16000", 30),
        ("pcm_16000", "ulaw_8000", 15),
        ("pcm_16000", "pcm_24000", 15),
        ("pcm_16000", "pcm_48000", 15),
        ("pcm_24000", "pcm_16000", 10),
        ("pcm_44100", "pcm_16000", 14),
    ],
)
def test_low_latency_resampler_lag_is_constant_and_small(src: str, dst: str, lag_ms: int) -> None:
    lags, sizes, tail = _lags_ms(Transcoder(src, dst), 100)
    assert max(lags) - min(lags) < 0.2  # no bursts: output every frame
    assert all(sizes)
    assert max(lags) == pytest.approx(lag_ms, abs=1)  # the figure in transcode.py's docstring
    assert tail * 1000 / AudioFormat(dst).sample_rate == pytest.approx(max(lags), abs=1)


def test_fixed_rate_resampler_lag_is_bursty_as_documented() -> None:
    lags, sizes, _ = _lags_ms(Transcoder("ulaw_8000", "pcm_16000", low_latency=False), 100)
    assert sizes.count(0) > len(sizes) / 2  # most frames produce nothing
    assert max(lags) > 60
    assert max(lags) <= 120


def test_mulaw_pcm_same_rate_adds_no_latency() -> None:
    lags, sizes, tail = _lags_ms(Transcoder("ulaw_8000", "pcm_8000"), 20)
    assert lags == [0.0] * len(lags)
    assert tail == 0


# --- Frame arithmetic -----------------------------------------------------------------------------


def test_frame_arithmetic() -> None:
    assert duration_seconds(640, "pcm_16000") == pytest.approx(0.02)
    assert duration_seconds(641, AudioFormat.pcm_16000) == pytest.approx(0.02)
    assert duration_seconds(160, "ulaw_8000") == pytest.approx(0.02)
    assert duration_seconds(882, "pcm_22050") == pytest.approx(0.02)
    assert is_whole_samples(3, "ulaw_8000")
    assert not is_whole_samples(3, "pcm_8000")
    assert bytes_for_seconds(0.02, "pcm_44100") == 1764
    assert bytes_for_seconds(0.25, "ulaw_8000") == 2000

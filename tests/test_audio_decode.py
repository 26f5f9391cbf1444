"""Decode keeps memory bounded whatever the input (issue 12).

A file is decoded block by block, straight into the views the models read (Whisper's 16 kHz mono,
the tokenizer's layout), so memory follows those views and never the source format; the duration
limit is enforced from the header before decoding, or while decoding when the header does not know
the length; every failure of one object is a typed `PermanentError`.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

import pipeline.audio
from pipeline.audio import (
    BLOCK_FRAMES,
    BUILTIN_TOKENIZER_LAYOUT,
    WHISPER_LAYOUT,
    AudioLayout,
    DecodedAudio,
    DecodeSpec,
    decode_audio,
)
from pipeline.batch import Downloaded, Slot, WorkItem, decode_stage, whisper_inputs
from pipeline.config import Settings
from pipeline.errors import DurationOutOfRange, EmptyObject, NotAudio, PermanentError
from pipeline.models import Models, NoTranscription
from pipeline.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


# --- audio to decode ----------------------------------------------------------------------------


def signal(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """Tones and noise, a different mix per channel, float32 [frames, channels] within +-0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    columns = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(t.shape) for c in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


def flac(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def streamed_flac(samples: np.ndarray, rate: int) -> bytes:
    """FLAC as an encoder writing to a pipe leaves it: it cannot seek back, so STREAMINFO says
    0 total samples (length unknown)."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    data = subprocess.run(
        ["flac", "--silent", "--force-raw-format", "--endian=little", "--sign=signed",
         f"--channels={samples.shape[1]}", "--bps=16", f"--sample-rate={rate}", "--stdout", "-"],
        input=pcm.tobytes(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert streaminfo_total_samples(data) == 0
    return data


def streaminfo_total_samples(data: bytes) -> int:
    """STREAMINFO (the first metadata block, at byte 8) holds total samples in the low 36 bits of bytes 13-17."""
    assert data[:4] == b"fLaC"
    return int.from_bytes(data[8 + 13 : 8 + 18], "big") & ((1 << 36) - 1)


def audio_offset(data: bytes) -> int:
    """Where a FLAC's audio frames start: after the last metadata block."""
    pos = 4
    while True:
        header, length = data[pos], int.from_bytes(data[pos + 1 : pos + 4], "big")
        pos += 4 + length
        if header & 0x80:
            return pos


def whole_file_view(data: bytes, rate: int, channels: int = 1) -> np.ndarray:
    """What decode did before issue 12: the whole file in native float32, downmixed, one soxr HQ call."""
    native, native_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    x = native.mean(axis=1, dtype=np.float32) if channels == 1 else native
    return x if rate == native_rate else soxr.resample(x, native_rate, rate, quality="HQ")


@pytest.fixture
def frames_read(monkeypatch) -> list[int]:
    """Native frames each read from the decoder returned, in order."""
    reads: list[int] = []
    read = pipeline.audio._ForwardReader.read

    def counting(self, *args, **kwargs):
        block = read(self, *args, **kwargs)
        reads.append(block.shape[0])
        return block

    monkeypatch.setattr(pipeline.audio._ForwardReader, "read", counting)
    return reads


# --- the views equal a whole-file decode --------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [44_100, 48_000, 16_000])
def test_blockwise_decode_equals_whole_file_decode_and_resample(rate, channels, frames_read):
    data = flac(signal(4.1, rate, channels), rate)  # several blocks, the last one partial
    layouts = (WHISPER_LAYOUT, AudioLayout(24_000), AudioLayout(24_000, channels))
    audio = decode_audio(data, DecodeSpec(layouts))

    assert sum(1 for n in frames_read if n) >= 2, "the file was not read in blocks"
    assert (audio.sample_rate, audio.channels, audio.frames) == (rate, channels, round(4.1 * rate))
    assert audio.duration_sec == pytest.approx(4.1, abs=1 / rate)
    for layout in layouts:
        expected = whole_file_view(data, layout.sample_rate, layout.channels)
        got = audio.view(layout)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    in_file_channels = audio.at_rate(24_000, mono=False)  # [frames, channels] even for a mono file
    assert in_file_channels.ndim == 2 and in_file_channels.shape[1] == channels
    np.testing.assert_array_equal(in_file_channels.ravel(), audio.view(AudioLayout(24_000, channels)).ravel())


def test_only_the_views_asked_for_are_kept_not_the_native_samples():
    data = flac(signal(1.0, 48_000, 2), 48_000)
    audio = decode_audio(data, DecodeSpec((WHISPER_LAYOUT,)))
    assert set(audio.views) == {WHISPER_LAYOUT}
    held = sum((v if v.base is None else v.base).nbytes for v in audio.views.values())
    assert held <= 16_000 * 4 + 1024  # 1 s at 16 kHz mono, float32 (native: 384,000 bytes)
    with pytest.raises(LookupError, match="24000 Hz"):
        audio.at_rate(24_000)


def test_a_multichannel_layout_other_than_the_files_repeats_the_downmix():
    data = flac(signal(1.0, 48_000, 6), 48_000)
    audio = decode_audio(data, DecodeSpec((AudioLayout(24_000, 2),)))
    stereo = audio.view(AudioLayout(24_000, 2))
    mono = whole_file_view(data, 24_000)
    np.testing.assert_allclose(stereo, np.stack([mono, mono], axis=1), rtol=0, atol=1e-6)


def test_samples_in_memory_get_the_same_views_as_the_file_holding_them():
    samples = signal(2.0, 44_100, 2)
    data = flac(samples, 44_100)
    from_file = decode_audio(data)
    in_memory = DecodedAudio.from_samples(sf.read(io.BytesIO(data), dtype="float32")[0], 44_100)
    assert set(from_file.views) == set(in_memory.views) == set(DecodeSpec().layouts)
    for layout in from_file.views:
        np.testing.assert_array_equal(from_file.view(layout), in_memory.view(layout))


# --- duration limits ------------------------------------------------------------------------------


def test_a_file_longer_than_the_maximum_is_refused_from_its_header_before_decoding(frames_read):
    data = flac(signal(10.0, 48_000, 2), 48_000)
    start = audio_offset(data)
    # The header is intact, every audio frame after it is garbage: decoding it would fail otherwise.
    corrupt = data[:start] + np.random.default_rng(1).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()

    with pytest.raises(DurationOutOfRange, match="from the header"):
        decode_audio(corrupt, DecodeSpec(max_duration_sec=5.0))
    assert frames_read == [], "samples were decoded before the header's length was checked"

    with pytest.raises(NotAudio):  # within the limit, decode reaches the garbage
        decode_audio(corrupt, DecodeSpec(max_duration_sec=60.0))


def test_a_file_shorter_than_the_minimum_is_refused():
    with pytest.raises(DurationOutOfRange, match="shorter"):
        decode_audio(flac(signal(0.05, 16_000, 1), 16_000), DecodeSpec(min_duration_sec=0.1))
    assert decode_audio(flac(signal(0.15, 16_000, 1), 16_000), DecodeSpec(min_duration_sec=0.1)).frames == 2400


def test_a_streamed_flac_of_unknown_length_decodes_to_its_duration():
    samples = signal(3.7, 44_100, 2)
    audio = decode_audio(streamed_flac(samples, 44_100))
    assert (audio.sample_rate, audio.channels, audio.frames) == (44_100, 2, samples.shape[0])
    assert audio.duration_sec == pytest.approx(3.7, abs=1 / 44_100)
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)  # as streamed_flac wrote it
    known_length = decode_audio(flac(pcm, 44_100))  # the same audio with its length in the header
    for layout in known_length.views:
        np.testing.assert_array_equal(audio.view(layout), known_length.view(layout))


def test_a_streamed_flac_over_the_maximum_stops_decoding_as_soon_as_it_passes_it(frames_read):
    data = streamed_flac(signal(20.0, 16_000, 1), 16_000)
    with pytest.raises(DurationOutOfRange, match="while decoding"):
        decode_audio(data, DecodeSpec(max_duration_sec=5.0))
    # Stopped within one block of the limit, not at the end of the file.
    assert 5.0 * 16_000 < sum(frames_read) <= 5.0 * 16_000 + BLOCK_FRAMES
    assert sum(frames_read) < 20.0 * 16_000


def test_the_error_of_a_file_refused_while_decoding_does_not_hold_its_partial_views():
    import tracemalloc

    data = streamed_flac(signal(20.0, 48_000, 1), 48_000)
    tracemalloc.start()
    try:
        with pytest.raises(DurationOutOfRange) as refused:
            decode_audio(data, DecodeSpec(max_duration_sec=10.0))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.__traceback__ is not None  # the error is alive, kept as a dead letter would be
    # 10 s of 16 + 24 kHz mono views were made (1.6 MB; more reserved) and must be gone with the decode.
    assert held < 256 * 1024


# --- every failure is typed -----------------------------------------------------------------------


def float_wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_samples_are_not_audio(bad):
    samples = signal(1.0, 16_000, 1)
    samples[12_345, 0] = bad
    with pytest.raises(NotAudio, match="NaN or infinite"):
        decode_audio(float_wav(samples, 16_000))


def test_empty_bytes_are_an_empty_object_and_unreadable_bytes_are_not_audio():
    with pytest.raises(EmptyObject):
        decode_audio(b"")
    with pytest.raises(NotAudio):
        decode_audio(b"this is not audio at all" * 100)
    data = flac(signal(1.0, 16_000, 1), 16_000)
    with pytest.raises(NotAudio):  # a header and no audio frames
        decode_audio(data[: audio_offset(data)])


@pytest.mark.parametrize("failure", [RuntimeError, MemoryError, ValueError, sf.LibsndfileError])
def test_any_decoder_failure_becomes_not_audio_and_never_escapes(monkeypatch, failure):
    def broken(self, *args, **kwargs):
        raise failure(1) if failure is sf.LibsndfileError else failure("the decoder gave up")

    monkeypatch.setattr(pipeline.audio._ForwardReader, "read", broken)
    with pytest.raises(NotAudio, match=failure.__name__):
        decode_audio(flac(signal(1.0, 16_000, 1), 16_000))


# --- the decode stage ---------------------------------------------------------------------------


def slot(data: bytes) -> Slot[Downloaded]:
    return Slot(WorkItem(event=None, source=None), Downloaded(data, "etag"))  # type: ignore[arg-type]


def test_decode_stage_makes_the_loaded_models_views_and_isolates_bad_files():
    settings = Settings(tokenizer="synthetic", device="cpu", min_duration_sec=0.1, max_duration_sec=5.0)
    tokenizer = load_tokenizer(settings)
    good = flac(signal(2.0, 48_000, 2), 48_000)
    nan = signal(1.0, 16_000, 1)
    nan[5, 0] = np.nan
    failed_upstream = Slot(WorkItem(event=None, source=None), error=EmptyObject("gone"))  # type: ignore[arg-type]
    slots = [slot(good), slot(float_wav(nan, 16_000)), slot(streamed_flac(signal(8.0, 16_000, 1), 16_000)),
             slot(flac(signal(6.0, 16_000, 1), 16_000)), failed_upstream]  # fmt: skip

    models = Models(settings, Transcribing(), tokenizer)
    try:
        decoded = decode_stage(slots, settings, models.layouts)  # as flows.prepare calls it

        assert [type(s.error).__name__ if s.error else "ok" for s in decoded] == [
            "ok", "NotAudio", "DurationOutOfRange", "DurationOutOfRange", "EmptyObject"
        ]
        assert all(isinstance(s.error, PermanentError) for s in decoded[1:])
        audio = decoded[0].value
        assert set(audio.views) == {WHISPER_LAYOUT, tokenizer.layout}
        (clip16k,) = whisper_inputs(decoded)
        np.testing.assert_allclose(clip16k, whole_file_view(good, 16_000), rtol=0, atol=1e-6)
        assert tokenizer.encode_batch([audio])[0].shape == (8, 150)  # 2 s at 75 Hz
    finally:
        models.close()


class Transcribing:
    """Stands in for a loaded Whisper: `Models` then decodes its 16 kHz view too."""

    name = "stand-in"

    def close(self) -> None:
        pass


def test_the_flow_decodes_the_view_a_loaded_codec_of_another_rate_reads_and_no_16_khz_view_without_whisper(tmp_path):
    """flows.prepare decodes into `Models.layouts`: what the loaded tokenizer said it reads (here a
    DAC checkpoint at 44.1 kHz), and Whisper's 16 kHz mono only when transcription is on."""
    import transformers

    config = transformers.DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=16,
        n_codebooks=4, codebook_size=64, codebook_dim=4, sampling_rate=44_100,
    )  # fmt: skip
    transformers.DacModel(config).save_pretrained(tmp_path / "dac44k")
    settings = Settings(tokenizer="dac", tokenizer_weights=str(tmp_path / "dac44k"), device="cpu", transcribe=False)
    codec = load_tokenizer(settings)
    models = Models(settings, NoTranscription(), codec)
    try:
        assert models.layouts == (AudioLayout(44_100),)
        (decoded,) = decode_stage([slot(flac(signal(1.0, 48_000, 2), 48_000))], settings, models.layouts)
        assert set(decoded.value.views) == {AudioLayout(44_100)}  # transcription off: no 16 kHz view is made
        assert codec.encode_batch([decoded.value])[0].shape == (4, 138)  # ceil(44100 / 320) frames
    finally:
        models.close()


def test_decode_stage_makes_the_layouts_it_is_given_and_by_default_whisper_s_and_the_built_in_tokenizers():
    decoded = decode_stage([slot(flac(signal(1.0, 44_100, 2), 44_100))], Settings(), layouts=(AudioLayout(22_050, 2),))
    assert set(decoded[0].value.views) == {AudioLayout(22_050, 2)}
    decoded = decode_stage([slot(flac(signal(1.0, 44_100, 2), 44_100))], Settings())
    assert set(decoded[0].value.views) == {WHISPER_LAYOUT, BUILTIN_TOKENIZER_LAYOUT}


# --- memory -------------------------------------------------------------------------------------

LONG_SECONDS, LONG_RATE, LONG_CHANNELS = 1500, 96_000, 8  # 4.6 GB as native float32

CHILD = """
import json, resource, sys, time
from pipeline.audio import DecodeSpec, decode_audio
from pipeline.errors import DurationOutOfRange

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

data = open(sys.argv[1], "rb").read()
out = {"baseline_mib": peak_mib()}
t = time.perf_counter()
try:
    decode_audio(data, DecodeSpec(max_duration_sec=600))
except DurationOutOfRange:
    out["refused_sec"], out["refused_peak_mib"] = time.perf_counter() - t, peak_mib()
t = time.perf_counter()
audio = decode_audio(data, DecodeSpec(max_duration_sec=3600))
out.update(decode_sec=time.perf_counter() - t, peak_mib=peak_mib(), duration_sec=audio.duration_sec,
           view_mib=sum(v.nbytes for v in audio.views.values()) / 2**20)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 minutes of 96 kHz 8-channel silence: about 1 MB of FLAC, 4.6 GB as native float32."""
    path = tmp_path_factory.mktemp("long") / "long.flac"
    block = np.zeros((LONG_RATE * 10, LONG_CHANNELS), dtype=np.int16)
    with sf.SoundFile(path, "w", LONG_RATE, LONG_CHANNELS, "PCM_16", format="FLAC") as f:
        for _ in range(LONG_SECONDS // 10):
            f.write(block)
    return path


@pytest.mark.slow
def test_a_25_minute_96khz_8_channel_file_decodes_in_memory_that_follows_its_views(long_flac):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(long_flac)], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
    )
    m = json.loads(result.stdout)
    assert m["duration_sec"] == LONG_SECONDS
    # Refused from its header: no time, no memory.
    assert m["refused_sec"] < 1.0 and m["refused_peak_mib"] - m["baseline_mib"] < 16
    # Decoded: what decode adds is the views it returns (16 kHz + 24 kHz mono: 229 MiB) and a few
    # blocks in flight; measured 236 MiB. Native float32 would be 4,394 MiB (the old decode peaked
    # at 5.4 GiB). 128 MiB of slack covers the allocator and soxr's buffers.
    native_mib = LONG_SECONDS * LONG_RATE * LONG_CHANNELS * 4 / 2**20
    added = m["peak_mib"] - m["baseline_mib"]
    assert m["view_mib"] == pytest.approx(LONG_SECONDS * (16_000 + 24_000) * 4 / 2**20, rel=1e-3)
    assert added < m["view_mib"] + 128, m
    assert added < native_mib / 10, m

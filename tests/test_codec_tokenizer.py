"""The neural codec tokenizers (`encodec`, `dac`, `mimi`) and `tokens decode`, without the hub.

Each codec is a small randomly initialised model built from its transformers config (24 kHz, the
real codecs' strides, few channels), saved with `save_pretrained` and loaded through the production
path: `load_tokenizer(Settings(tokenizer=..., tokenizer_weights=dir))`.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import transformers

from pipeline.audio import DecodedAudio
from pipeline.config import Settings
from pipeline.errors import ModelUnavailable, TokenizationFailed
from pipeline.records import TranscribedAudio, to_table
from pipeline.tokenizers import load_tokenizer
from pipeline.tokenizers.codec import CodecTokenizer, TokenizerName
from metavoice.tokens import RowNotFound, add_tokens_parser, decode_row_to_wav, run_tokens_command

FAMILIES = ["encodec", "dac", "mimi"]
RATE = 24_000


# --- tiny checkpoints -----------------------------------------------------------------------------


def _training_audio(generator: torch.Generator) -> torch.Tensor:
    t = torch.arange(RATE * 2) / RATE
    noise = [0.1 * torch.randn(t.shape, generator=generator) for _ in range(2)]
    return torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) + n for f, n in zip((110, 440), noise)])[:, None, :]


def _spread_codebooks(layers, residual: torch.Tensor, generator: torch.Generator) -> None:
    """Random codebook entries spread like each quantizer's inputs: fresh EnCodec and Mimi codebooks
    are all zeros, which would give every frame code 0."""
    for layer in layers:
        book = layer.codebook
        vectors = residual.permute(0, 2, 1).reshape(-1, residual.shape[1])
        noise = torch.randn(book.codebook_size, vectors.shape[1], generator=generator)
        entries = vectors.mean(0) + vectors.std(0) * noise
        if hasattr(book, "embed_sum"):  # Mimi keeps sums and usage counts, and caches their ratio
            book.embed_sum.copy_(entries)
            book.cluster_usage.fill_(1.0)
            book._embed = None
        else:
            book.embed.copy_(entries)
            book.embed_avg.copy_(entries)
        residual = residual - layer.decode(layer.encode(residual))


def _tiny_encodec(path: Path, generator: torch.Generator) -> Path:
    config = transformers.EncodecConfig(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1)
    model = transformers.EncodecModel(config).eval()
    audio = _training_audio(generator)
    with torch.no_grad():
        # Centre the embeddings: far from the origin, distances to the codebook entries would cancel
        # out in float32 and leave near-ties that rounding noise flips.
        model.encoder.layers[-1].conv.bias -= model.encoder(audio).mean(dim=(0, 2))
        _spread_codebooks(model.quantizer.layers, model.encoder(audio), generator)
    model.save_pretrained(path)
    transformers.EncodecFeatureExtractor(feature_size=1, sampling_rate=RATE).save_pretrained(path)
    return path


def _tiny_dac(path: Path, generator: torch.Generator) -> Path:
    config = transformers.DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=16,
        n_codebooks=4, codebook_size=64, codebook_dim=4, sampling_rate=RATE,
    )  # fmt: skip
    transformers.DacModel(config).save_pretrained(path)  # DAC's codebooks start random: nothing to spread
    transformers.DacFeatureExtractor(feature_size=1, sampling_rate=RATE, hop_length=320).save_pretrained(path)
    return path


def _tiny_mimi(path: Path, generator: torch.Generator) -> Path:
    config = transformers.MimiConfig(
        num_filters=4, hidden_size=16, codebook_dim=16, codebook_size=64, num_quantizers=4,
        vector_quantization_hidden_dimension=16, upsample_groups=16, num_hidden_layers=2,
        intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    model = transformers.MimiModel(config).eval()
    with torch.no_grad():
        latents = model.encoder(_training_audio(generator)).latents
        quantizer = model.quantizer
        for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
            _spread_codebooks(rvq.layers, rvq.input_proj(latents) if rvq.input_proj else latents, generator)
    model.save_pretrained(path)
    transformers.EncodecFeatureExtractor(feature_size=1, sampling_rate=RATE).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are tiny: a second intra-op thread only spins against the other processes
    sharing the CPU (it made this module three times slower on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codecs")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return {
        "encodec": _tiny_encodec(root / "encodec", g),
        "dac": _tiny_dac(root / "dac", g),
        "mimi": _tiny_mimi(root / "mimi", g),
    }


def load(checkpoints: dict[str, Path], family: str, **settings) -> CodecTokenizer:
    weights = str(checkpoints[family])
    tokenizer = load_tokenizer(Settings(tokenizer=family, tokenizer_weights=weights, device="cpu", **settings))
    assert isinstance(tokenizer, CodecTokenizer)
    return tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def codec(request: pytest.FixtureRequest, checkpoints: dict[str, Path]):
    tokenizer = load(checkpoints, request.param)
    yield tokenizer
    tokenizer.close()


# --- audio ---------------------------------------------------------------------------------------


def clip(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> DecodedAudio:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    tone = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) * np.sin(2 * np.pi * 0.7 * t)
    wave = tone + 0.05 * rng.standard_normal(n)
    return DecodedAudio.from_samples(np.repeat(wave.astype(np.float32)[:, None], channels, axis=1), rate)


def mixed_clips() -> list[DecodedAudio]:
    specs = [(0.5, 24_000), (1.37, 16_000), (0.9, 44_100), (0.1, 8_000), (1.6, 48_000), (0.7, 22_050)]
    return [clip(d, r, seed=i) for i, (d, r) in enumerate(specs)]


# --- shapes, names, frames -----------------------------------------------------------------------


def test_tokens_are_int16_codebooks_by_frames(codec: CodecTokenizer) -> None:
    (tokens,) = codec.encode_batch([clip(1.5)])
    assert tokens.dtype == np.int16
    assert tokens.shape == (codec.codebooks, math.ceil(1.5 * codec.frame_rate))
    assert tokens.min() >= 0 and tokens.max() < codec.model.config.codebook_size
    assert len(np.unique(tokens[0])) > 1, "the test model codes every frame alike"


def test_encodec_defaults_to_6kbps_8_codebooks_at_75hz_named_after_its_checkpoint(checkpoints) -> None:
    tokenizer = load(checkpoints, "encodec")
    assert (tokenizer.codebooks, tokenizer.frame_rate) == (8, 75.0)
    assert tokenizer.name == f"encodec:{checkpoints['encodec']}@6kbps"


@pytest.mark.parametrize(("bandwidth", "codebooks"), [(1.5, 2), (3.0, 4), (12.0, 16), (24.0, 32)])
def test_encodec_bandwidth_chooses_the_codebooks(checkpoints, bandwidth: float, codebooks: int) -> None:
    tokenizer = load(checkpoints, "encodec", tokenizer_bandwidth=bandwidth)
    assert tokenizer.codebooks == codebooks
    assert tokenizer.encode_batch([clip(0.2)])[0].shape == (codebooks, 15)
    assert tokenizer.name.endswith(f"@{bandwidth:g}kbps")


def test_dac_and_mimi_take_a_number_of_codebooks(checkpoints) -> None:
    assert load(checkpoints, "dac").codebooks == 4  # all of the checkpoint's
    dac = load(checkpoints, "dac", tokenizer_codebooks=2)
    assert dac.codebooks == 2 and dac.name.endswith("@2cb")
    assert dac.encode_batch([clip(0.4)])[0].shape == (2, 30)
    mimi = load(checkpoints, "mimi", tokenizer_codebooks=3)
    assert mimi.encode_batch([clip(0.4)])[0].shape == (3, 5)


def test_a_full_name_from_the_tokenizer_column_rebuilds_that_tokenizer(checkpoints) -> None:
    settings = Settings(
        tokenizer="encodec:facebook/encodec_24khz@12kbps", tokenizer_weights=str(checkpoints["encodec"]), device="cpu"
    )
    tokenizer = load_tokenizer(settings)
    assert tokenizer.name == "encodec:facebook/encodec_24khz@12kbps"
    assert tokenizer.codebooks == 16


def test_tokenizer_names_parse_checkpoint_and_spec() -> None:
    assert TokenizerName.parse("encodec") == TokenizerName("encodec")
    assert TokenizerName.parse("encodec:facebook/encodec_24khz@1.5kbps") == TokenizerName(
        "encodec", "facebook/encodec_24khz", bandwidth=1.5
    )
    assert TokenizerName.parse("mimi:/models/mimi@v2@8cb") == TokenizerName("mimi", "/models/mimi@v2", codebooks=8)
    assert TokenizerName.parse("dac:/models/dac@v2") == TokenizerName("dac", "/models/dac@v2")


def test_frames_follow_duration_at_every_sampling_rate(codec: CodecTokenizer) -> None:
    clips = [
        clip(seconds, rate, seed=k)
        for k, (seconds, rate) in enumerate(
            (s, r) for s in (0.1, 0.37, 1.03) for r in (8_000, 22_050, 44_100, 48_000)
        )
    ]
    tokens = codec.encode_batch(clips)
    for c, t in zip(clips, tokens):
        assert t.shape[0] == codec.codebooks
        assert abs(t.shape[1] - math.ceil(c.duration_sec * codec.frame_rate)) <= 1, (c.sample_rate, c.duration_sec)


def test_stereo_is_coded_as_its_mono_downmix(checkpoints) -> None:
    tokenizer = load(checkpoints, "encodec")
    stereo = clip(0.8, 48_000, channels=2)  # the same wave in both channels
    mono = clip(0.8, 48_000, channels=1)
    np.testing.assert_array_equal(*tokenizer.encode_batch([stereo, mono]))


# --- batching, windows, replays ------------------------------------------------------------------


def test_batched_encoding_equals_one_by_one(codec: CodecTokenizer) -> None:
    clips = mixed_clips()
    batched = codec.encode_batch(clips)
    for c, tokens in zip(clips, batched):
        np.testing.assert_array_equal(tokens, codec.encode_batch([c])[0])


def test_long_clip_encoded_in_windows_matches_one_pass(checkpoints, codec: CodecTokenizer) -> None:
    long = clip(4.3, seed=3)
    (one_pass,) = codec.encode_batch([long])  # 30 s windows: one pass
    windowed = load(checkpoints, codec.family, tokenizer_window_sec=1.0)
    (tokens,) = windowed.encode_batch([long])
    assert tokens.shape == one_pass.shape
    if codec.family == "encodec":
        # The LSTM remembers the whole file; 1 s of context brings windows close to one pass.
        np.testing.assert_array_equal(tokens[:, : windowed.window_frames], one_pass[:, : windowed.window_frames])
        assert (tokens == one_pass).mean() >= 0.98
    else:  # DAC: context covers the receptive field; Mimi: streaming carries state
        np.testing.assert_array_equal(tokens, one_pass)


def test_windows_bound_what_reaches_the_model(checkpoints, codec: CodecTokenizer) -> None:
    tokenizer = load(checkpoints, codec.family, tokenizer_window_sec=1.0, tokenizer_batch_size=2)
    shapes: list[tuple[int, ...]] = []
    encode = tokenizer.model.encode

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return encode(x, *args, **kwargs)

    tokenizer.model.encode = spy
    tokens = tokenizer.encode_batch([clip(3.2), clip(2.1, seed=1), clip(0.3, seed=2)])
    assert [t.shape[1] for t in tokens] == [math.ceil(s * tokenizer.frame_rate) for s in (3.2, 2.1, 0.3)]
    context = tokenizer.context_frames * (1 if tokenizer.causal else 2)
    assert max(s[0] for s in shapes) <= 2
    assert max(s[-1] for s in shapes) <= (tokenizer.window_frames + context) * tokenizer.hop


def test_a_replay_produces_identical_tokens(checkpoints, codec: CodecTokenizer) -> None:
    clips = mixed_clips()
    first = codec.encode_batch(clips)
    again = load(checkpoints, codec.family, tokenizer_batch_size=3).encode_batch(list(reversed(clips)))
    for a, b in zip(first, reversed(again)):
        np.testing.assert_array_equal(a, b)


def test_tokens_equal_what_transformers_computes_for_the_same_audio(checkpoints, codec: CodecTokenizer) -> None:
    path = checkpoints[codec.family]
    model = getattr(transformers, codec.model_class).from_pretrained(path).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(path)

    def direct(audio: DecodedAudio) -> np.ndarray:
        inputs = extractor(raw_audio=audio.at_rate(RATE), sampling_rate=RATE, return_tensors="pt")
        with torch.inference_mode():
            if codec.family == "encodec":
                codes = model.encode(inputs["input_values"], inputs["padding_mask"], bandwidth=6.0).audio_codes[0, 0]
            elif codec.family == "dac":
                codes = model.encode(inputs["input_values"], n_quantizers=codec.codebooks).audio_codes[0]
            else:
                codes = model.encode(inputs["input_values"], num_quantizers=codec.codebooks).audio_codes[0]
        return codes.numpy()

    whole = clip(1.2)  # whole frames for every codec: no padding anywhere
    np.testing.assert_array_equal(codec.encode_batch([whole])[0], direct(whole))

    partial = clip(1.01, seed=1)  # 24240 samples: a partial last frame
    (tokens,) = codec.encode_batch([partial])
    expected = direct(partial)
    assert tokens.shape == expected.shape
    if codec.family == "dac":  # its feature extractor pads with silence to whole frames, as we do
        np.testing.assert_array_equal(tokens, expected)
    else:
        # Alone, EnCodec and Mimi pad a partial frame by reflecting or repeating the audio; we pad every
        # clip with silence (as a padded batch does), so only the last frame may differ.
        np.testing.assert_array_equal(tokens[:, :-1], expected[:, :-1])


# --- decode --------------------------------------------------------------------------------------


def test_decode_returns_audio_of_the_clips_length_at_the_codec_rate(codec: CodecTokenizer) -> None:
    source = clip(1.3)
    (tokens,) = codec.encode_batch([source])
    audio, rate = codec.decode(tokens)
    assert rate == RATE
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert audio.shape[0] == tokens.shape[1] * codec.hop
    assert 0 <= audio.shape[0] - source.frames < codec.hop
    assert np.abs(audio).max() > 0


def test_windowed_decode_matches_one_pass(checkpoints, codec: CodecTokenizer) -> None:
    (tokens,) = codec.encode_batch([clip(3.0)])
    one_pass, _ = codec.decode(tokens)
    windowed, _ = load(checkpoints, codec.family, tokenizer_window_sec=1.0).decode(tokens)
    np.testing.assert_allclose(windowed, one_pass, atol=1e-4 * max(1.0, float(np.abs(one_pass).max())))


def test_decode_refuses_codes_of_another_shape(codec: CodecTokenizer) -> None:
    with pytest.raises(ValueError, match="decodes"):
        codec.decode(np.zeros((codec.codebooks + 1, 10), dtype=np.int16))


# --- failures ------------------------------------------------------------------------------------


def test_missing_weights_fail_at_startup_saying_where_and_how(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-encodec"
    with pytest.raises(ModelUnavailable) as info:
        load_tokenizer(Settings(tokenizer="encodec", tokenizer_weights=str(missing)))
    message = str(info.value)
    assert str(missing) in message
    assert "METAVOICE_TOKENIZER_WEIGHTS=/path" in message
    assert "download facebook/encodec_24khz" in message


def test_uncached_hub_weights_offline_fail_at_startup_naming_id_cache_and_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        load_tokenizer(Settings(tokenizer="mimi", tokenizer_weights="metavoice-tests/no-such-codec"))
    message = str(info.value)
    assert "'metavoice-tests/no-such-codec'" in message
    assert constants.HF_HUB_CACHE in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download metavoice-tests/no-such-codec" in message


def test_weights_of_another_codec_are_refused_at_startup(checkpoints) -> None:
    with pytest.raises(ModelUnavailable, match="'dac' model, not 'encodec'"):
        load_tokenizer(Settings(tokenizer="encodec", tokenizer_weights=str(checkpoints["dac"])))


def test_an_unsupported_bandwidth_fails_at_startup(checkpoints) -> None:
    with pytest.raises(ModelUnavailable, match="6 kbps = 8 codebooks"):
        load(checkpoints, "encodec", tokenizer_bandwidth=5.0)


def test_a_clip_that_cannot_be_coded_raises_tokenization_failed(codec: CodecTokenizer) -> None:
    broken = clip(0.5)
    broken.at_rate(RATE)[100] = np.nan  # the view the codec reads
    with pytest.raises(TokenizationFailed):
        codec.encode_batch([clip(0.5), broken])


# --- tokens decode -------------------------------------------------------------------------------


def _row(key: str, tokens: np.ndarray, tokenizer: str, frame_rate: float) -> TranscribedAudio:
    now = datetime.now(timezone.utc)
    return TranscribedAudio(
        id=key, bucket="b", etag="e", size_bytes=1, event_time=now, duration_sec=1.0, sampling_rate=RATE,
        channels=1, transcription="", language="en", segments=[], tokens=tokens, tokenizer=tokenizer,
        token_frame_rate=frame_rate, whisper_model="tiny.en", kafka_topic="t", kafka_partition=0,
        kafka_offset=0, processed_at=now,
    )  # fmt: skip


def test_decode_row_to_wav_writes_the_rows_audio(checkpoints, tmp_path: Path) -> None:
    codec = load(checkpoints, "encodec")
    first, second = codec.encode_batch([clip(0.7), clip(1.2, seed=4)])
    path = tmp_path / "part-0.parquet"
    rows = [_row(key, tokens, codec.name, codec.frame_rate) for key, tokens in (("a.flac", first), ("b.flac", second))]
    pq.write_table(to_table(rows), path)

    out = decode_row_to_wav(path, "b.flac", tmp_path / "listen" / "b.wav", Settings(device="cpu"))
    audio, rate = sf.read(out, dtype="float32")
    expected, _ = codec.decode(second)
    assert rate == RATE and audio.shape == expected.shape
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=2 / 32768)


def test_tokens_decode_command_takes_weights_for_the_checkpoint_the_column_names(checkpoints, tmp_path, capsys) -> None:
    codec = load_tokenizer(Settings(
        tokenizer="dac:descript/dac_24khz", tokenizer_weights=str(checkpoints["dac"]), device="cpu"
    ))  # fmt: skip
    (tokens,) = codec.encode_batch([clip(0.5)])
    assert codec.name == "dac:descript/dac_24khz@4cb"
    output = tmp_path / "output"  # laid out as the pipeline writes it, with files that are not Parquet
    (output / "data").mkdir(parents=True)
    pq.write_table(to_table([_row("x.flac", tokens, codec.name, codec.frame_rate)]), output / "data" / "p.parquet")
    (output / "data" / "q.parquet.inprogress").write_bytes(b"half a file")
    (output / "summary.json").write_text("{}")

    parser = argparse.ArgumentParser()
    add_tokens_parser(parser.add_subparsers(dest="command"))
    argv = ["tokens", "decode", "--parquet", str(output), "--id", "x.flac", "--out", str(output / "x.wav")]
    for _ in range(2):  # the second time, the WAV of the first lies in the directory too
        assert run_tokens_command(parser.parse_args([*argv, "--weights", str(checkpoints["dac"])]), Settings()) == 0
        assert sf.info(output / "x.wav").frames == tokens.shape[1] * codec.hop

    assert run_tokens_command(parser.parse_args([*argv[:5], "nope.flac", *argv[6:]]), Settings()) == 1
    assert "no row with id 'nope.flac'" in capsys.readouterr().err


def test_decode_row_refuses_tokens_that_carry_no_audio(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(to_table([_row("s.flac", np.zeros((8, 10), np.int16), "synthetic", 75.0)]), path)
    with pytest.raises(ValueError, match="carry no audio"):
        decode_row_to_wav(path, "s.flac", tmp_path / "s.wav", Settings())
    with pytest.raises(RowNotFound):
        decode_row_to_wav(path, "other.flac", tmp_path / "s.wav", Settings())

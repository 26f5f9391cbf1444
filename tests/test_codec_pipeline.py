"""EnCodec end to end: the tokens in Parquet are what transformers computes for the same audio."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from pipeline.audio import decode_audio
from pipeline.models import Models

from .conftest import backfill, consume_until_idle, upload
from .test_codec_tokenizer import _tiny_encodec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_encodec_tokens_in_parquet_equal_transformers_for_the_same_audio(
    s3, bucket, speech_corpus, settings_factory, tmp_path
):
    weights = _tiny_encodec(tmp_path / "encodec", torch.Generator().manual_seed(7))
    clips = speech_corpus[:3]  # 48 kHz stereo among them: resampled and downmixed on the way
    upload(s3, bucket, clips)
    # One clip per encoder call makes each clip's codes a function of that clip alone, so they can be
    # compared bit for bit (in padded batches float rounding may flip a near-tie: see docs/tokenizers.md).
    settings = settings_factory(tokenizer="encodec", tokenizer_weights=str(weights), tokenizer_batch_size=1)
    backfill(settings, bucket)
    models = Models.load(settings)
    try:
        stats = consume_until_idle(settings, models)
    finally:
        models.close()
    assert stats.rows == len(clips)

    table = pq.read_table(settings.output_dir / "data").to_pylist()
    rows = {r["id"]: r for r in table}
    model = transformers.EncodecModel.from_pretrained(weights).eval()
    for clip in clips:
        row = rows[clip.key]
        assert row["tokenizer"].startswith("encodec:") and row["tokenizer"].endswith("@6kbps")
        assert row["token_codebooks"] == 8 and row["token_frame_rate"] == pytest.approx(75.0)
        tokens = np.asarray(row["tokens"], dtype=np.int16)
        audio = decode_audio(clip.path.read_bytes()).at_rate(24_000)
        with torch.inference_mode():
            direct = model.encode(torch.from_numpy(audio)[None, None, :], bandwidth=6.0).audio_codes[0, 0].numpy()
        assert tokens.shape[0] == direct.shape[0] and abs(tokens.shape[1] - direct.shape[1]) <= 1
        n = min(tokens.shape[1], direct.shape[1]) - 1  # a partial last frame is padded differently
        np.testing.assert_array_equal(tokens[:, :n], direct[:, :n])
    summary_frames = sum(len(r["tokens"][0]) for r in table)
    import orjson

    summary = orjson.loads((settings.output_dir / "summary.json").read_bytes())
    assert summary["token_counts"]["max"] == max(len(r["tokens"][0]) for r in table)
    assert summary_frames > 0

"""`model-segment` / `model-score` split their time per analysis model, so the README's cost table can be re-measured."""

from __future__ import annotations

import pytest

from pipeline.audio import DecodedAudio, DecodeSpec
from pipeline.config import Settings

from . import speech

pytestmark = pytest.mark.slow


def test_the_analysis_modes_report_each_models_seconds_within_the_stages_wall_time():
    from benchmark.model import run_analysis_stage
    from pipeline.models import Models

    models = Models.load(Settings(prefect_enabled=False, segmentation="utterances", dnsmos="on", transcribe=False))
    try:
        call = speech.phone_call().audio()
        decoded = {"call": DecodedAudio.from_samples(call, speech.SAMPLE_RATE, DecodeSpec(layouts=models.layouts))}
        segment = run_analysis_stage(models, decoded, "segment")
        score = run_analysis_stage(models, decoded, "score")
        speakers = models.analysis.speakers
        assert "embed" not in vars(speakers) and "change_points" not in vars(speakers)  # wrappers removed
    finally:
        models.close()
    assert set(segment.details["model_seconds"]) == {"vad", "speaker_changes"}
    assert set(score.details["model_seconds"]) == {"dnsmos", "speaker_embeddings", "signal_measures"}
    for r in (segment, score):
        assert r.files == 1 and 0 < sum(r.details["model_seconds"].values()) <= r.wall_seconds
        assert all(v > 0 for v in r.details["model_audio_s_per_s"].values())

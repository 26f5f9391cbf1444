"""Utterances are cut between decoded words: at pauses, at speaker turns (the widest gap near a change
point), at the maximum length; short pieces join a neighbour or grow into the silence around them."""

from __future__ import annotations

import pytest

from pipeline.analysis.vad import word_utterances, widen
from pipeline.records import Word


def words(*spans: tuple[float, float]) -> list[Word]:
    return [Word(a, b, f"w{i}", 0.9) for i, (a, b) in enumerate(spans)]


def cut(window, ws, **kw):
    kw = {"min_sec": 1.0, "max_sec": 30.0, "pause_sec": 0.5, **kw}
    return word_utterances(window, ws, **kw)


def test_a_pause_between_words_ends_an_utterance_and_bounds_lie_between_the_words():
    ws = words((0.2, 0.6), (0.7, 1.2), (1.3, 1.8), (2.6, 3.0), (3.1, 3.6))  # 0.8 s pause after w2
    out = cut((0.0, 4.0), ws)
    assert [[w.word for w in g] for _, _, g in out] == [["w0", "w1", "w2"], ["w3", "w4"]]
    assert out[0][0] == 0.0 and out[-1][1] == 4.0  # the window's edges
    assert out[0][1] == out[1][0] == pytest.approx((1.8 + 2.6) / 2)
    for a, b, g in out:  # every word inside its own utterance
        assert all(a <= w.start <= w.end <= b for w in g)


def test_a_speaker_turn_goes_to_the_widest_gap_near_the_change_point_not_through_a_word():
    # the encoder puts the change at 2.3 s, where the middles of w3 and w4 straddle it; the turn is
    # the 0.3 s gap after w2 (1.5-1.8 s), within the encoder's 0.8 s hop of the change point
    ws = words((0.1, 0.5), (0.55, 1.0), (1.05, 1.5), (1.8, 2.4), (2.45, 3.0), (3.05, 3.6))
    out = cut((0.0, 4.0), ws, cuts=[2.3])
    assert [[w.word for w in g] for _, _, g in out] == [["w0", "w1", "w2"], ["w3", "w4", "w5"]]
    assert out[0][1] == out[1][0] == pytest.approx(1.65)


def test_a_turn_shorter_than_the_minimum_joins_the_neighbour_across_the_smaller_gap():
    ws = words((0.1, 1.0), (1.05, 2.0), (2.3, 2.7), (2.75, 3.8), (3.85, 5.0))
    out = cut((0.0, 5.0), ws, cuts=[2.15, 2.72])  # a 0.4 s "turn" (w2): below what the encoder resolves
    assert len(out) == 2 and all(b - a >= 1.0 for a, b, _ in out)
    assert [w.word for w in out[1][2]] == ["w2", "w3", "w4"]  # the gap after w2 (0.05) < before it (0.3)
    assert sum(len(g) for _, _, g in out) == len(ws)  # no word lost


def test_no_utterance_is_longer_than_the_maximum():
    ws = words(*[(0.1 + 0.5 * i, 0.5 + 0.5 * i) for i in range(20)])  # 10 s of words, 0.1 s gaps
    out = cut((0.0, 10.2), ws, max_sec=4.0)
    assert len(out) >= 3 and all(b - a <= 4.0 + 1e-9 for a, b, _ in out)
    assert [a for a, _, _ in out] == sorted(a for a, _, _ in out)
    assert all(x[1] <= y[0] for x, y in zip(out, out[1:]))
    assert sum(len(g) for _, _, g in out) == 20


def test_a_window_without_words_is_one_utterance():
    assert cut((2.0, 4.5), []) == [(2.0, 4.5, [])]


def test_a_short_span_grows_into_the_silence_around_it_without_touching_its_neighbours():
    spans = [(0.5, 3.0), (4.0, 4.2), (4.8, 7.0)]
    out = widen(spans, 1.0, 8.0)
    assert out[0] == spans[0] and out[2] == spans[2]
    a, b = out[1]
    assert b - a == pytest.approx(1.0) and 3.0 <= a and b <= 4.2 + (4.8 - 4.2) / 2 + 1e-9
    assert widen([(0.1, 0.4)], 1.0, 5.0)[0] == pytest.approx((0.0, 1.0))  # the file's start bounds it
    assert widen([(0.0, 0.3)], 1.0, 0.3)[0] == (0.0, 0.3)  # no room: stays short (left out by the caller)

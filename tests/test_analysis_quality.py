"""Quality scores rank real speech: a noisy or band-limited copy scores lower than the clean original."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.quality import DnsmosScorer, signal_measures
from pipeline.analysis.vad import speech_regions

from .speech import SAMPLE_RATE, arctic, phone_call, sox

pytestmark = pytest.mark.slow  # real models on real speech, fetched from PyPI on the first run


@pytest.fixture(scope="module")
def clean():
    return arctic().audio()


@pytest.fixture(scope="module")
def scorer():
    return DnsmosScorer("cpu")


def _measures(audio, rate=SAMPLE_RATE):
    return signal_measures(audio, rate, speech_regions(audio if rate == SAMPLE_RATE else sox(audio, "rate", "16000")))


def test_added_noise_lowers_snr_and_dnsmos(clean, scorer):
    # white noise at about 15 dB below the speech, drawn once (seeded) so the test is reproducible
    noisy = clean + np.random.default_rng(7).normal(0.0, 0.02, clean.shape).astype(np.float32)
    a, b = _measures(clean), _measures(noisy)
    assert b.snr_db < a.snr_db - 6, (a.snr_db, b.snr_db)
    clean_score, noisy_score = scorer.score([clean, noisy])
    assert noisy_score.ovrl < clean_score.ovrl - 0.3 and noisy_score.bak < clean_score.bak, (clean_score, noisy_score)


def test_a_band_limited_copy_reads_a_lower_bandwidth_and_dnsmos(clean, scorer):
    """sox low-pass / resampling: 8 kHz telephone band read as ~4 kHz, even upsampled to 48 kHz.
    DNSMOS (a 16 kHz model) barely hears the 8 kHz band (3.13 vs 3.13 seen), a 3 kHz low-pass it does
    (3.05 vs 3.13): deterministic on the same input, so a small margin is enough."""
    lowpassed = sox(clean, "sinc", "-3000")  # a steep 3 kHz low-pass
    full = _measures(clean).bandwidth_hz
    low = _measures(lowpassed).bandwidth_hz
    clean_score, low_score = scorer.score([clean, lowpassed])
    assert low_score.ovrl < clean_score.ovrl - 0.03, (clean_score, low_score)
    narrow = sox(clean, "rate", "8000", rate=8000)
    up48 = _upsample(narrow)
    phone48 = signal_measures(up48, 48_000, [(0.0, up48.shape[0] / 48_000)]).bandwidth_hz
    assert full > 6000, full
    assert low < full and low < 3500, (full, low)
    assert 3500 <= phone48 <= 4200, phone48


def _upsample(audio8k: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(audio8k, 8000, 48_000).astype(np.float32)


def test_the_8_khz_phone_call_reads_about_4_khz():
    call = phone_call().audio()
    assert 3500 <= _measures(call).bandwidth_hz <= 4200


def test_level_clipping_and_speech_ratio_follow_the_signal(clean):
    loud = np.clip(clean * 20, -1, 1)
    a, b = _measures(clean), _measures(loud)
    assert a.clipping_ratio == 0.0 < b.clipping_ratio
    assert b.rms_dbfs > a.rms_dbfs + 10
    padded = np.concatenate([np.zeros(4 * SAMPLE_RATE, np.float32), clean])
    assert _measures(padded).speech_ratio < a.speech_ratio

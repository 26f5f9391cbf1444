"""Quality of a clip: signal measures (numpy) and DNSMOS P.835 (speechmos' ONNX, run with onnxruntime).

speechmos' own wrapper imports librosa (for the P.808 model's mel input only); the P.835 model used
here takes the waveform itself, so the ONNX file is loaded from the installed package directly."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
FRAME_SEC = 0.02
CLIP_LEVEL = 0.999  # |x| at or above: a clipped sample
SNR_MAX_DB = 100.0
# Effective bandwidth: the highest frequency whose (smoothed) speech spectrum is still within this
# many dB of its peak. Resamplers leave 80-100 dB of stop band above a former Nyquist, so 60 dB puts
# an 8 kHz call upsampled to 48 kHz at ~4 kHz, while full-band speech reaches past 7 kHz.
BANDWIDTH_DROP_DB = 60.0


@dataclass
class SignalMeasures:
    snr_db: float
    bandwidth_hz: float
    clipping_ratio: float
    rms_dbfs: float
    speech_ratio: float


def _db(power: float) -> float:
    return float(10 * np.log10(max(power, 1e-12)))


def _speech_mask(n: int, sample_rate: int, regions: list[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(n, bool)
    for s, e in regions:
        mask[max(0, int(s * sample_rate)) : min(n, int(e * sample_rate))] = True
    return mask


def signal_measures(audio: np.ndarray, sample_rate: int, regions: list[tuple[float, float]]) -> SignalMeasures:
    """Measures of a mono clip at its own rate; `regions` are VAD speech (seconds).

    snr_db: mean power of speech frames over the mean power of non-speech frames (the quietest tenth
    of frames when the VAD left no pause), speech power net of that noise."""
    x = np.asarray(audio, np.float64)
    n = x.shape[0]
    if n == 0:
        return SignalMeasures(0.0, 0.0, 0.0, -120.0, 0.0)
    rms_dbfs = _db(float(np.mean(x * x)))
    clipping = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    mask = _speech_mask(n, sample_rate, regions)
    speech_ratio = float(mask.mean())
    hop = max(1, int(FRAME_SEC * sample_rate))
    frames = n // hop
    if frames == 0:
        return SignalMeasures(0.0, 0.0, clipping, rms_dbfs, speech_ratio)
    power = (x[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1)
    speech_frames = mask[: frames * hop].reshape(frames, hop).mean(axis=1) > 0.5
    noise = power[~speech_frames] if (~speech_frames).sum() >= 5 else np.sort(power)[: max(1, frames // 10)]
    signal = power[speech_frames] if speech_frames.any() else power
    noise_p = float(noise.mean())
    snr = _db(max(float(signal.mean()) - noise_p, 1e-12)) - _db(noise_p)
    snr = float(np.clip(snr, -SNR_MAX_DB, SNR_MAX_DB))
    return SignalMeasures(snr, bandwidth_hz(x[mask] if mask.sum() > sample_rate // 4 else x, sample_rate),
                          clipping, rms_dbfs, speech_ratio)


def bandwidth_hz(x: np.ndarray, sample_rate: int) -> float:
    """Effective bandwidth: highest frequency within `BANDWIDTH_DROP_DB` of the spectrum's peak (capped by Nyquist)."""
    from scipy.signal import welch

    if x.shape[0] < 256:
        return 0.0
    freqs, psd = welch(x, fs=sample_rate, nperseg=min(2048, x.shape[0]))
    if not np.any(psd > 0):
        return 0.0
    smooth = np.convolve(psd, np.ones(5) / 5, mode="same")
    level = 10 * np.log10(np.maximum(smooth, 1e-30))
    above = np.nonzero(level >= level.max() - BANDWIDTH_DROP_DB)[0]
    return float(freqs[above[-1]])


@dataclass
class Dnsmos:
    ovrl: float
    sig: float
    bak: float


DNSMOS_INPUT_SEC = 9.01  # the P.835 model scores 9.01 s windows
# DNSMOS' polynomial calibration of the raw (sig, bak, ovrl) outputs, non-personalised model.
_P_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
_P_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
_P_OVR = np.poly1d([-0.06766283, 1.11546468, 0.04602535])


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)  # finds the package without importing its librosa-bound modules
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return os.path.join(spec.submodule_search_locations[0], *parts)


class DnsmosScorer:
    """DNSMOS P.835 (Microsoft, MIT; the ONNX shipped by PyPI speechmos 0.0.1.1): OVRL, SIG, BAK in 1-5."""

    name = "dnsmos-p835-speechmos-0.0.1.1"

    def __init__(self, device: str) -> None:
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        available = set(ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1 if device != "cuda" else 0
        self.session = ort.InferenceSession(
            _package_file("speechmos", "dnsmos_models", "sig_bak_ovr.onnx"), opts,
            providers=[p for p in providers if p in available] or ["CPUExecutionProvider"],
        )
        self.device = device

    def score(self, clips16k: list[np.ndarray]) -> list[Dnsmos]:
        """One score per clip: the mean over its 9.01 s windows (a shorter clip is repeated to fill one);
        the windows of all clips go through the model in batches of 32."""
        length = int(DNSMOS_INPUT_SEC * SAMPLE_RATE)
        windows: list[np.ndarray] = []
        owner: list[int] = []
        for i, clip in enumerate(clips16k):
            audio = np.asarray(clip, np.float32)
            if audio.shape[0] == 0:
                audio = np.zeros(SAMPLE_RATE, np.float32)
            while audio.shape[0] < length:
                audio = np.concatenate([audio, audio])
            # DNSMOS' recipe slides its window 1 s at a time (9x the work for a long clip); windows
            # side by side, the last one ending at the clip's end, cover the same audio at ~1/9 the cost.
            n = int(np.ceil(audio.shape[0] / length))
            starts = np.linspace(0, audio.shape[0] - length, n).astype(int) if n > 1 else [0]
            for s in starts:
                windows.append(audio[s : s + length])
                owner.append(i)
        raw = np.zeros((0, 3), np.float32)
        for start in range(0, len(windows), 32):
            batch = np.stack(windows[start : start + 32])
            raw = np.concatenate([raw, self.session.run(None, {"input_1": batch})[0]])
        out = []
        owners = np.asarray(owner)
        for i in range(len(clips16k)):
            sig, bak, ovr = raw[owners == i].T
            out.append(Dnsmos(float(np.mean(_P_OVR(ovr))), float(np.mean(_P_SIG(sig))), float(np.mean(_P_BAK(bak)))))
        return out

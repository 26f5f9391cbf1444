"""Speaker embeddings (Resemblyzer's GE2E encoder, `pretrained.pt` from PyPI resemblyzer 0.1.4,
Apache-2.0) and speaker labels within a file (agglomerative clustering, cosine, average linkage).

Resemblyzer's own front end calls librosa 0.9's positional API (broken in librosa >= 0.10), so the
same 40-band power mel (25 ms Hann window, 10 ms hop, Slaney mel scale) is computed here with numpy,
and the weights are loaded into the same 3-layer LSTM without importing the package."""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 16_000
N_FFT, HOP, N_MELS = 400, 160, 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIAL_STEP = 77  # frames between partials: Resemblyzer's rate of 1.3 partials per second
MAX_PARTIALS = 12  # per clip: the LSTM's cost grows with partials, the mean embedding barely moves past ~10 s
TARGET_DBFS = -30.0  # Resemblyzer normalises volume up to this before embedding
# Average cosine distance under which clusters are one speaker. Measured on pyannote's two-speaker
# call (two women, 8 kHz band): one voice's turns 0.08-0.29 apart, the two voices ~0.28 on average,
# a read male voice ~0.5 from both; 0.27 labels that call's seven turns right. Tuned on one call.
SAME_SPEAKER_DISTANCE = 0.27
TURN_WINDOW_SEC, TURN_HOP_SEC = 1.6, 0.8


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40) (Slaney scale and area norm), [40, 201]."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return (weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]).astype(np.float32)


_FILTERS = mel_filters()
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """[frames, 40] power mel, centred frames (zero padding), as Resemblyzer's `wav_to_mel_spectrogram`.

    Checked against librosa 0.11's `feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160,
    n_mels=40)` on CMU ARCTIC a0007: largest difference 9e-8 of the peak (filters equal to 1e-9)."""
    x = np.pad(np.asarray(wav, np.float32), (N_FFT // 2, N_FFT // 2))
    n = 1 + (x.shape[0] - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * _WINDOW, axis=1)) ** 2
    return (spec @ _FILTERS.T).astype(np.float32)


def _normalise_volume(wav: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    if rms <= 0:
        return wav
    gain_db = TARGET_DBFS - 20 * math.log10(rms)
    return wav * (10 ** (gain_db / 20)) if gain_db > 0 else wav


class SpeakerEncoder:
    """256-dim, L2-normalised voice embeddings; all partials of all clips go through one LSTM batch."""

    name = "resemblyzer-0.1.4-ge2e"

    def __init__(self, device: str) -> None:
        import importlib.util
        import os

        import torch

        spec = importlib.util.find_spec("resemblyzer")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("package 'resemblyzer' is not installed (pip install --no-deps resemblyzer==0.1.4)")
        weights = os.path.join(spec.submodule_search_locations[0], "pretrained.pt")
        self.device = device
        self.torch = torch
        self.lstm = torch.nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)
        state = torch.load(weights, map_location="cpu", weights_only=False)["model_state"]
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        self.lstm.to(device).eval()
        self.linear.to(device).eval()

    def _partials(self, wav: np.ndarray) -> np.ndarray:
        mel = mel_frames(_normalise_volume(np.asarray(wav, np.float32)))
        if mel.shape[0] < PARTIAL_FRAMES:
            mel = np.pad(mel, ((0, PARTIAL_FRAMES - mel.shape[0]), (0, 0)))
        starts = list(range(0, mel.shape[0] - PARTIAL_FRAMES + 1, PARTIAL_STEP))
        if len(starts) > MAX_PARTIALS:  # a long clip: evenly spread partials say as much about the voice
            starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, MAX_PARTIALS)]
        return np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts])

    def embed(self, clips16k: list[np.ndarray]) -> np.ndarray:
        """[n, 256] float32: per clip the normalised mean of its partials' normalised embeddings."""
        if not clips16k:
            return np.zeros((0, 256), np.float32)
        parts = [self._partials(c) for c in clips16k]
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.concatenate(parts)).to(self.device)
            _, (hidden, _) = self.lstm(x)
            e = torch.relu(self.linear(hidden[-1]))
            e = e / torch.linalg.norm(e, dim=1, keepdim=True).clamp_min(1e-9)
            partial = e.cpu().numpy()
        out, at = [], 0
        for p in parts:
            m = partial[at : at + len(p)].mean(axis=0)
            at += len(p)
            out.append(m / max(float(np.linalg.norm(m)), 1e-9))
        return np.stack(out).astype(np.float32)

    def change_points(self, audio16k: np.ndarray, region: tuple[float, float]) -> list[float]:
        """Speaker turns inside a speech region (seconds): where the labels of sliding 1.6 s windows change."""
        start, end = region
        if end - start < 2 * TURN_WINDOW_SEC:
            return []
        starts = np.arange(start, end - TURN_WINDOW_SEC + 1e-9, TURN_HOP_SEC)
        windows = [audio16k[int(s * SAMPLE_RATE) : int((s + TURN_WINDOW_SEC) * SAMPLE_RATE)] for s in starts]
        labels = label_speakers(self.embed(windows))
        points = []
        for i in range(1, len(labels)):
            if labels[i] != labels[i - 1]:
                points.append(round(float(starts[i] + TURN_WINDOW_SEC / 2 - TURN_HOP_SEC / 2), 3))
        return points


def label_speakers(embeddings: np.ndarray) -> list[str]:
    """"S0", "S1", ... per embedding, numbered in order of first appearance."""
    n = len(embeddings)
    if n == 0:
        return []
    if n == 1:
        return ["S0"]
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    clusters = fcluster(linkage(pdist(np.asarray(embeddings, np.float64), "cosine"), "average"),
                        SAME_SPEAKER_DISTANCE, criterion="distance")
    names: dict[int, str] = {}
    return [names.setdefault(int(c), f"S{len(names)}") for c in clusters]

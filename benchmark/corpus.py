"""What the benchmark reads: spoken clips for the model modes, small objects for the stream ceiling."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metavoice.samples import RATES, SENTENCES, SampleClip, speak_to_flac, word_overlap
from pipeline.config import Settings

BUCKET = "metavoice-bench"
CORPUS_PREFIX = "clips/"  # the spoken corpus
SMALL_PREFIX = "small/"  # the stream ceiling's objects
COPIES_PREFIX = "copies/"  # distinct object versions of corpus clips (latency pass)
UPLOAD_THREADS = 8

CORPUS_VERSION = 2


def make_bench_corpus(directory: Path, count: int, min_sec: float, max_sec: float) -> list[SampleClip]:
    """`count` spoken clips with lengths spread over [min_sec, max_sec], cycling sampling rates.

    Lengths are set by the number of words spoken (calibrated once on this espeak-ng), so they
    land near their targets; the order is mixed (golden-ratio stride), not sorted. A manifest
    lets `--corpus-dir` reuse the clips across runs.
    """
    manifest = directory / "corpus.json"
    params = {"version": CORPUS_VERSION, "count": count, "min_sec": min_sec, "max_sec": max_sec}
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("params") == params and all((directory / c["key"]).exists() for c in saved["clips"]):
            return [SampleClip(c["key"], directory / c["key"], c["text"], c["sample_rate"], c["channels"]) for c in saved["clips"]]
    import soundfile as sf

    words = " ".join(SENTENCES).split()
    probe = speak_to_flac(" ".join(words[:40]), directory / "calibration.flac", 16_000)
    words_per_second = 40 / sf.info(str(probe)).duration
    probe.unlink()
    clips = []
    for i in range(count):
        target = min_sec + (max_sec - min_sec) * ((i * 0.6180339887) % 1.0)
        n = max(2, round(target * words_per_second))
        # an utterance, as a dataset's clips are: capitalized, ending in a full stop
        text = " ".join(words[(i * 11 + j) % len(words)] for j in range(n)).rstrip(",.") + "."
        text = text[0].upper() + text[1:]
        rate = RATES[i % len(RATES)]
        channels = 2 if i % 12 == 1 else 1
        key = f"{CORPUS_PREFIX}clip-{i:05d}.flac"
        clips.append(SampleClip(key, speak_to_flac(text, directory / key, rate, channels), text, rate, channels))
    manifest.write_text(json.dumps({"params": params, "clips": [
        {"key": c.key, "text": c.text, "sample_rate": c.sample_rate, "channels": c.channels} for c in clips]}))
    return clips


def boto3_s3(settings: Settings):
    import boto3

    return boto3.client("s3", **settings.s3_client_kwargs())


def upload_corpus(settings: Settings, clips: list[SampleClip]) -> None:
    s3 = boto3_s3(settings)
    s3.create_bucket(Bucket=BUCKET)
    for c in clips:
        s3.upload_file(str(c.path), BUCKET, c.key)



@dataclass(frozen=True)
class StoredObject:
    key: str
    etag: str
    size: int


def small_flac(index: int, seconds: float) -> bytes:
    """A `seconds`-long FLAC of its own (a tone with a little noise, seeded by `index`): rates cycle
    like the spoken corpus's, one in twelve is stereo, and no two objects have the same bytes."""
    import soundfile as sf

    rate = RATES[index % len(RATES)]
    channels = 2 if index % 12 == 1 else 1
    rng = np.random.default_rng(index)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (180 + index % 400) * t) + 0.02 * rng.standard_normal(t.shape[0])
    samples = np.repeat(tone[:, None], channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def upload_small_objects(settings: Settings, count: int, seconds: float) -> list[StoredObject]:
    """`count` small FLAC objects under SMALL_PREFIX, uploaded `UPLOAD_THREADS` at a time (not timed)."""
    s3 = boto3_s3(settings)

    def put(i: int) -> StoredObject:
        key = f"{SMALL_PREFIX}{i:06d}.flac"
        body = small_flac(i, seconds)
        etag = s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')
        return StoredObject(key, etag, len(body))

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        return list(pool.map(put, range(count)))


def copy_clips(settings: Settings, clips: list[SampleClip], count: int, tag: str) -> list[StoredObject]:
    """`count` server-side copies of corpus clips (cycling), each its own object version: events
    for them are distinct rows, never duplicates, and carry the copy's real etag (If-Match)."""
    s3 = boto3_s3(settings)
    out = []
    for i in range(count):
        clip = clips[i % len(clips)]
        key = f"{COPIES_PREFIX}{tag}/{i:05d}-{Path(clip.key).name}"
        res = s3.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": clip.key})
        out.append(StoredObject(key, res["CopyObjectResult"]["ETag"].strip('"'), clip.path.stat().st_size))
    return out


def mean_overlap(transcripts: dict[str, str], texts: dict[str, str]) -> float | None:
    """The mean word overlap of transcripts with the texts their clips were spoken from (None: no clip)."""
    scores = [word_overlap(texts[k], v) for k, v in transcripts.items() if k in texts]
    return float(np.mean(scores)) if scores else None

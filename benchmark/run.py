"""One benchmark run: services, corpora, one loaded model, every mode, the ratios."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION
from metavoice.samples import SampleClip
from pipeline.config import Settings

from .backlog import run_backlog_comparison
from .bare import run_bare
from .ceiling import CEILING_MODES, run_ceiling_modes
from .corpus import BUCKET, make_bench_corpus, upload_corpus, upload_small_objects
from .harness import BENCH_SESSION_TIMEOUT_MS, prefect_env, start_prefect_api, warm_up_prefect
from .latency import LATENCY_LOAD, run_latency
from .measure import ModeResult, log, machine_info, rounded
from .model import run_analysis_stage, run_model
from .seed import run_seed
from .stream import run_pipeline

# Speech modes (audio-seconds per wall-second), then the stream's ceiling (events per second).
SPEECH_MODES = ("seed", "bare", "model", "model-segment", "model-score", "pipeline", "pipeline-no-prefect")
MODES = SPEECH_MODES + CEILING_MODES
PASSES = ("latency", "backlog")
RATIOS = (
    ("pipeline", "seed"), ("pipeline", "bare"), ("pipeline", "model"),
    ("stream-ceiling", "io-floor"),  # what the stream costs over the I/O with our decode
    ("stream-ceiling", "plain-floor"),  # ... over the plain list/GET/soundfile a user would write
    # end to end with the backfill's listing and publishing timed, vs each floor (target >= 0.8 vs plain)
    ("stream-ceiling-backfill", "plain-floor"), ("stream-ceiling-backfill", "io-floor"),
    ("stream-ceiling", "stream-ceiling-no-prefect"),  # Prefect on / off (target >= 0.9)
    ("stream-ceiling-s3-output", "stream-ceiling"),  # what writing the dataset to S3 costs (uploads overlap work)
)
TARGETS = {"pipeline/seed": 2.0, "pipeline/model": 0.9, "stream-ceiling/io-floor": 0.8, "stream-ceiling-backfill/plain-floor": 0.8,
           "stream-ceiling/stream-ceiling-no-prefect": 0.9}
FLOW_RUNS_PER_1000_TARGET = 10.0
# Micro-batch settings beyond batch_max_events/bytes/linger, reported when this version has them.
ADAPTIVE_BATCH_SETTINGS = ("batch_max_events_backlog",)


@dataclass
class BenchArgs:
    clips: int
    min_sec: float
    max_sec: float
    device: str
    whisper_batch_size: int
    skip: set[str]
    json_path: Path | None
    backlog_events: int
    backlog_seconds: float
    latency_events: int
    latency_rate: float | None
    bare_without_timestamps: bool
    corpus_dir: Path | None
    keep: bool
    repeat: int = 1
    window: str | None = None
    ceiling_events: int = 1000
    ceiling_clip_sec: float = 2.0
    batch_max_events: int | None = None


def run(args: BenchArgs) -> dict[str, Any]:
    from metavoice.local_services import local_services
    from pipeline.models import Models

    started = time.perf_counter()
    for k, v in MOTO_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    work = Path(tempfile.mkdtemp(prefix="metavoice-bench-"))
    prefect_api = prefect_env(work)  # before anything imports Prefect: it reads its settings once
    report: dict[str, Any] = {"command": " ".join(["python -m benchmark", *sys.argv[1:]]),
                              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine_info(), "prefect": {"api": prefect_api}}
    if _wants_prefect(args):
        start_prefect_api()  # its first start (migrations) overlaps the corpus and the model load
    speech = _wants_speech(args)
    try:
        corpus: list[SampleClip] = []
        if speech:
            corpus_dir = args.corpus_dir or work / "corpus"
            log.info("speaking %d clips (%g-%g s) into %s", args.clips, args.min_sec, args.max_sec, corpus_dir)
            corpus = make_bench_corpus(corpus_dir, args.clips, args.min_sec, args.max_sec)
        with local_services(work / "services") as svc:
            base = Settings().with_overrides(
                kafka_bootstrap=svc.kafka_bootstrap, s3_endpoint_url=svc.s3_endpoint_url, s3_region=MOTO_REGION,
                bucket=BUCKET, device=args.device, whisper_batch_size=args.whisper_batch_size or None,
                whisper_window=args.window, kafka_session_timeout_ms=BENCH_SESSION_TIMEOUT_MS,
                batch_max_events=args.batch_max_events,
            )
            upload_corpus(base, corpus)
            t = time.perf_counter()
            # only the ceiling modes: no Whisper (they load models of their own that cost nothing)
            models = Models.load(base if speech else base.with_overrides(transcribe=False))
            report["model_load_seconds"] = time.perf_counter() - t
            try:
                report["settings"] = _settings_report(base, models)
                return _run_modes(args, base, models, corpus, work, report, started)
            finally:
                models.close()
    finally:
        if args.keep:
            log.warning("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


# The modes that run flow runs: the API is started early and warmed up before any of them is timed.
PREFECT_MODES = ("pipeline", "stream-ceiling", "stream-ceiling-s3-output", "stream-ceiling-backfill", "latency", "backlog")


def _wants_prefect(args: BenchArgs) -> bool:
    return bool(set(PREFECT_MODES) - args.skip)


def _wants_speech(args: BenchArgs) -> bool:
    """Whether any mode needs the spoken corpus and Whisper (all but the ceiling modes do)."""
    return bool(set(SPEECH_MODES + PASSES) - args.skip)


def _settings_report(st: Settings, models: Any) -> dict[str, Any]:
    tr = models.transcriber
    return {
        "whisper_model": tr.name, "device": tr.device, "compute_type": tr.compute_type,
        "whisper_batch_size": tr.batch_size, "beam_size": tr.beam_size, "language": tr.language,
        "whisper_window": tr.window, "tokenizer": models.tokenizer.name, "synthetic_load_ms": st.synthetic_load_ms,
        "cpu_threads": st.resolved_cpu_threads(), "batch_max_events": st.batch_max_events,
        "batch_max_bytes": st.batch_max_bytes, "batch_linger_ms": st.batch_linger_ms, "pipeline_depth": st.pipeline_depth,
        "download_concurrency": st.download_concurrency, "topic_partitions": st.topic_partitions,
        "kafka_session_timeout_ms": st.kafka_session_timeout_ms,
        **{k: getattr(st, k) for k in ADAPTIVE_BATCH_SETTINGS if hasattr(st, k)},
    }


def _run_modes(args: BenchArgs, base: Settings, models: Any, corpus: list[SampleClip], work: Path,
               report: dict[str, Any], started: float) -> dict[str, Any]:
    from pipeline.audio import WHISPER_SAMPLE_RATE, decode_audio

    texts = {c.key: c.text for c in corpus}
    decoded = {c.key: decode_audio(c.path.read_bytes()) for c in corpus}
    clips16k = {k: a.at_rate(WHISPER_SAMPLE_RATE) for k, a in decoded.items()}
    durations = [a.duration_sec for a in decoded.values()]
    if corpus:
        report["corpus"] = {
            "clips": len(corpus), "audio_seconds": sum(durations), "min_sec": min(durations),
            "max_sec": max(durations), "mean_sec": float(np.mean(durations)),
            "sampling_rates": sorted({c.sample_rate for c in corpus}), "stereo": sum(c.channels == 2 for c in corpus),
        }
        # First calls allocate and load lazily (ctranslate2 buffers, the Silero VAD model): not timed.
        shortest = min(clips16k.values(), key=len)
        models.transcriber.transcribe_one_by_one(shortest)
        models.transcriber.transcribe_batch([shortest])
        models.tokenizer.encode_batch([next(iter(decoded.values()))])
        if models.analysis is not None:  # Silero, the speaker encoder and DNSMOS load lazily too
            run_analysis_stage(models, {"warm-up": next(iter(decoded.values()))}, "score")
    bare_batch = models.transcriber.batch_size
    if corpus and "bare" not in args.skip:
        from faster_whisper import BatchedInferencePipeline

        list(BatchedInferencePipeline(models.transcriber.model).transcribe(
            shortest, batch_size=bare_batch, beam_size=models.transcriber.beam_size)[0])

    if _wants_prefect(args):
        report["prefect"]["warm_up_seconds"] = asyncio.run(warm_up_prefect())
    runners: dict[str, Callable[[], ModeResult]] = {
        "seed": lambda: run_seed(base, models, work / "seed.parquet", texts),
        "bare": lambda: run_bare(models, clips16k, bare_batch, args.bare_without_timestamps, texts),
        "model": lambda: run_model(models, clips16k, texts),
        "model-segment": lambda: run_analysis_stage(models, decoded, "segment"),
        "model-score": lambda: run_analysis_stage(models, decoded, "score"),
        "pipeline": lambda: asyncio.run(run_pipeline(base, models, "pipeline", True, work, texts)),
        "pipeline-no-prefect": lambda: asyncio.run(run_pipeline(base, models, "pipeline-no-prefect", False, work, texts)),
    }
    # Rounds interleave the modes, so a burst of load from elsewhere hits one run, not one mode;
    # each mode reports its best round (the least disturbed), all rounds are kept.
    runs: dict[str, list[ModeResult]] = {}
    ceiling = [m for m in CEILING_MODES if m not in args.skip]
    objects = []
    if ceiling:
        t = time.perf_counter()
        objects = upload_small_objects(base, args.ceiling_events, args.ceiling_clip_sec)
        report["ceiling_corpus"] = {"objects": len(objects), "seconds_each": args.ceiling_clip_sec,
                                    "bytes": sum(o.size for o in objects), "upload_seconds": time.perf_counter() - t}
    for _ in range(args.repeat):
        for name in SPEECH_MODES:
            if name not in args.skip:
                runs.setdefault(name, []).append(runners[name]())
        if ceiling:
            for name, result in run_ceiling_modes(base, objects, work, args.skip).items():
                runs.setdefault(name, []).append(result)
    modes = {name: max(rs, key=lambda r: r.throughput) for name, rs in runs.items()}
    for name, rs in runs.items():
        modes[name].details["rounds_throughput"] = [round(r.throughput, 3) for r in rs]
    report["modes"] = {k: v.to_dict() for k, v in modes.items() if k in SPEECH_MODES}
    report["ceiling"] = {k: v.to_dict() for k, v in modes.items() if k in CEILING_MODES}
    report["ratios"] = {f"{a}/{b}": _ratio(modes, a, b) for a, b in RATIOS}
    # Load-robust views of the same ratios (a shared machine): paired per round (the two modes ran
    # minutes apart, not one at its quietest and the other at its busiest), and per CPU-second.
    report["ratios_paired"] = {f"{a}/{b}": _paired_ratio(runs, a, b) for a, b in RATIOS}
    report["ratios_cpu"] = {f"{a}/{b}": _cpu_ratio(runs, a, b) for a, b in RATIOS}
    report["targets"] = _targets(report)
    report["prefect"].update(_prefect_overhead(modes))

    if "latency" not in args.skip:
        rate = args.latency_rate
        if rate is None:
            p = modes.get("pipeline") or modes.get("pipeline-no-prefect")
            capacity = p.files / p.wall_seconds if p and p.wall_seconds > 0 else 1.0
            rate = round(min(4.0, max(0.05, LATENCY_LOAD * capacity)), 3)
        report["latency"] = asyncio.run(run_latency(base, models, corpus, rate, args.latency_events, work))
    if "backlog" not in args.skip:
        report["backlog"] = run_backlog_comparison(base, corpus, args.backlog_events, args.backlog_seconds, work)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["run_seconds"] = time.perf_counter() - started
    return rounded(report)


def _ratio(modes: dict[str, ModeResult], a: str, b: str) -> float | None:
    """Throughput of `a` over `b` (audio-seconds per second; for the ceiling modes, which process the
    same objects, the same as events per second)."""
    if a not in modes or b not in modes or modes[b].throughput <= 0:
        return None
    return round(modes[a].throughput / modes[b].throughput, 3)


def _paired_ratio(runs: dict[str, list[ModeResult]], a: str, b: str) -> dict[str, Any] | None:
    """`a`/`b` in each round (both modes ran in it, minutes apart), and the median of those.

    Best-of-rounds favours the shorter mode: a 3-s floor finds a quiet moment more often than a
    7-s stream run does. Pairing by round compares runs that met the same load."""
    ra, rb = runs.get(a), runs.get(b)
    if not ra or not rb:
        return None
    per_round = [x.throughput / y.throughput for x, y in zip(ra, rb) if y.throughput > 0]
    return {"median": round(float(np.median(per_round)), 3), "rounds": [round(r, 3) for r in per_round]} if per_round else None


def _cpu_ratio(runs: dict[str, list[ModeResult]], a: str, b: str) -> float | None:
    """Median audio-seconds per CPU-second of our own processes (bench, broker, S3, Prefect), `a` over
    `b`: what each costs in CPU, whatever others ran meanwhile. On a CPU-bound machine this is the
    ratio the wall clock would show if nothing else ran."""
    ea = [r.cpu_efficiency for r in runs.get(a, []) if r.cpu_efficiency]
    eb = [r.cpu_efficiency for r in runs.get(b, []) if r.cpu_efficiency]
    if not ea or not eb:
        return None
    return round(float(np.median(ea)) / float(np.median(eb)), 3)


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target of issue 13 with the measured figure and whether it is met (None: not measured)."""
    out: dict[str, Any] = {}
    for key, target in TARGETS.items():
        v = report["ratios"].get(key)
        paired = (report.get("ratios_paired") or {}).get(key)
        out[key] = {"target": f">= {target:g}", "measured": v, "met": None if v is None else v >= target,
                    "paired_median": paired["median"] if paired else None,
                    "per_cpu_second": (report.get("ratios_cpu") or {}).get(key)}
    on = report["ceiling"].get("stream-ceiling")
    v = on["details"]["flow_runs_per_1000_events"] if on else None
    out["flow_runs_per_1000_events"] = {"target": f"<= {FLOW_RUNS_PER_1000_TARGET:g}", "measured": v,
                                        "met": None if v is None else v <= FLOW_RUNS_PER_1000_TARGET}
    return out


def _prefect_overhead(modes: dict[str, ModeResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("pipeline", "stream-ceiling"):
        on, off = modes.get(name), modes.get(f"{name}-no-prefect")
        if on is not None:
            out[f"per_batch_{name}"] = on.details["per_batch"]
        if on is not None and off is not None and on.details["batches"]:
            # from wall times: noisy when there are few batches
            out[f"{name}_wall_difference_per_batch_s"] = (on.wall_seconds - off.wall_seconds) / on.details["batches"]
    return out

"""`python -m benchmark` (`metavoice bench`): the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipeline.cli_support import CliError, Parser, entry_point, settings_from

from . import __doc__ as OVERVIEW
from .backlog import backlog_worker
from .report import print_report
from .run import MODES, PASSES, BenchArgs, run
from .latency import LATENCY_LOAD

# --quick: a smoke test of every mode in a few minutes (tests/test_bench_smoke.py)
QUICK_CLIPS, QUICK_MAX_SEC, QUICK_LATENCY_EVENTS, QUICK_CEILING_EVENTS = 6, 10.0, 6, 96


def build_parser(prog: str = "python -m benchmark") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=None, help=f"clips to speak (default 24; {QUICK_CLIPS} with --quick)")
    p.add_argument("--min-sec", type=float, default=2.0, help="shortest clip (default 2)")
    p.add_argument("--max-sec", type=float, default=None, help=f"longest clip (default 20; {QUICK_MAX_SEC:g} with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--whisper-batch-size", type=int, default=0, help="windows per model call (0: the setting's default)")
    p.add_argument("--window", choices=["fit", "full"], default=None,
                   help="Whisper encoder windows for the model and pipeline modes (default: the setting, METAVOICE_WHISPER_WINDOW)")
    p.add_argument("--batch-max-events", type=int, default=None,
                   help="micro-batch size of every stream mode (default: the setting, METAVOICE_BATCH_MAX_EVENTS)")
    p.add_argument("--ceiling-events", type=int, default=None,
                   help=f"small objects (one event each) for io-floor and stream-ceiling (default 1000; {QUICK_CEILING_EVENTS} with --quick)")
    p.add_argument("--ceiling-clip-sec", type=float, default=2.0, help="length of each of those objects (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the throughput modes, interleaved; each mode reports its best (default 1)")
    p.add_argument("--skip", default="", help=f"comma-separated, of: {','.join(MODES + PASSES)}")
    p.add_argument("--json", dest="json_path", type=Path, help="write the full report here")
    p.add_argument("--backlog-events", type=int, default=10_000)
    p.add_argument("--backlog-seconds", type=float, default=90.0, help="how long each backlog consumer runs (default 90: peaks are spiky, a few batches are not enough)")
    p.add_argument("--latency-events", type=int, default=None,
                   help=f"events in the latency pass (default 16; {QUICK_LATENCY_EVENTS} with --quick)")
    p.add_argument("--latency-rate", type=float, default=None,
                   help=f"events per second in the latency pass (default {LATENCY_LOAD:g} x the measured pipeline capacity)")
    p.add_argument("--bare-without-timestamps", action="store_true",
                   help="bare: the library's default without_timestamps=True (less decoding than the pipeline does)")
    p.add_argument("--corpus-dir", type=Path, help="keep (and reuse) the spoken corpus here instead of the run's temp dir")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_CLIPS} short clips, {QUICK_CEILING_EVENTS} ceiling events, a short latency pass, no backlog (smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the run's temp dir (outputs, service logs)")
    p.add_argument("--verbose", action="store_true", help="log the consumer's batches")
    p.add_argument("--backlog-worker", action="store_true", help=argparse.SUPPRESS)
    return p


@entry_point
def main(argv: list[str] | None = None, prog: str = "python -m benchmark") -> int:
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    # The METAVOICE_* settings every mode starts from, and the flags that override them: a bad value
    # stops here, before any clip is spoken, service started or model loaded.
    settings_from({"device": a.device, "whisper_batch_size": a.whisper_batch_size or None,
                   "whisper_window": a.window, "batch_max_events": a.batch_max_events}, parser)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("benchmark").setLevel(logging.INFO)
    for noisy in ("aiokafka", "botocore", "aiobotocore", "urllib3", "httpx", "faster_whisper"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if a.verbose else "WARNING")
    if a.backlog_worker:
        return backlog_worker(a.backlog_seconds, a.json_path)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = skip - set(MODES + PASSES)
    if unknown:
        raise CliError(f"--skip: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES + PASSES)}")
    if a.quick:
        skip.add("backlog")
    args = BenchArgs(
        clips=a.clips or (QUICK_CLIPS if a.quick else 24), min_sec=a.min_sec,
        max_sec=a.max_sec or (QUICK_MAX_SEC if a.quick else 20.0),
        device=a.device, whisper_batch_size=a.whisper_batch_size, skip=skip, json_path=a.json_path,
        backlog_events=a.backlog_events, backlog_seconds=a.backlog_seconds,
        latency_events=a.latency_events or (QUICK_LATENCY_EVENTS if a.quick else 16), latency_rate=a.latency_rate,
        bare_without_timestamps=a.bare_without_timestamps, corpus_dir=a.corpus_dir, keep=a.keep,
        repeat=max(1, a.repeat), window=a.window,
        ceiling_events=a.ceiling_events or (QUICK_CEILING_EVENTS if a.quick else 1000),
        ceiling_clip_sec=a.ceiling_clip_sec, batch_max_events=a.batch_max_events,
    )
    if args.min_sec <= 0 or args.max_sec < args.min_sec:
        raise CliError(f"--min-sec: must be > 0 and <= --max-sec ({args.max_sec:g}), got {args.min_sec:g}")
    if args.ceiling_events < 1 or args.ceiling_clip_sec <= 0:
        raise CliError("--ceiling-events must be >= 1 and --ceiling-clip-sec > 0")
    report = run(args)
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    return 0

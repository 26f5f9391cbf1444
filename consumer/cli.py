"""`python -m consumer`: run the streaming consumer. Flags override METAVOICE_* settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.logs import setup_logging

from .app import run_consumer

log = logging.getLogger("consumer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    p.add_argument("--output", dest="output_dir", type=Path, help="output directory (METAVOICE_OUTPUT_DIR)")
    p.add_argument("--group", help="consumer group (METAVOICE_GROUP)")
    p.add_argument("--topic", help="events topic (METAVOICE_TOPIC)")
    p.add_argument("--kafka-bootstrap", help="bootstrap servers (METAVOICE_KAFKA_BOOTSTRAP)")
    p.add_argument("--from-beginning", action="store_true", default=None, help="rewind the group to the first event")
    p.add_argument("--from-timestamp", help="rewind the group to the first event at/after this ISO-8601 time")
    p.add_argument("--force", action="store_true", default=None, help="write into a directory built with other settings")
    p.add_argument("--batch-max-events", type=int)
    p.add_argument("--batch-max-bytes", type=int)
    p.add_argument("--batch-linger-ms", type=int)
    p.add_argument("--roll-max-rows", type=int)
    p.add_argument("--roll-max-seconds", type=float)
    p.add_argument("--exit-when-idle", type=float, metavar="SECONDS", help="finish, commit and exit after this long without events")
    p.add_argument("--pipeline-depth", type=int, help="micro-batches in flight at once")
    p.add_argument("--no-transcribe", dest="transcribe", action="store_false", default=None,
                   help="load no Whisper: rows hold metadata and tokens, transcription is null (METAVOICE_TRANSCRIBE=false)")
    p.add_argument("--whisper-model", help="faster-whisper model name or converted directory")
    p.add_argument("--whisper-batch-size", type=int)
    p.add_argument("--whisper-window", choices=["fit", "full"], help="encoder window per chunk: fitted to it, or Whisper's 30 s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compute-type")
    p.add_argument("--tokenizer")
    p.add_argument("--no-prefect", dest="prefect_enabled", action="store_false", default=None, help="run stages without Prefect")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port")
    p.add_argument("--log-format", choices=["text", "json"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    settings = Settings().with_overrides(**args)
    setup_logging(settings)
    try:
        stats = asyncio.run(run_consumer(settings, handle_signals=True))
    except (PipelineError, ExceptionGroup) as exc:
        errors = pipeline_errors(exc)
        if not errors:
            raise
        for err in errors:
            log.error("stopped without committing: %s: %s", type(err).__name__, err)
        return 1
    log.info(
        "done (%s): %d rows, %d dead letters, %d skipped, %d duplicates, %d files, %.1fs audio in %.1fs",
        stats.stop_reason, stats.rows, stats.dead_letters, stats.skipped, stats.duplicates, stats.files,
        stats.audio_seconds, stats.wall_seconds,
    )
    return 0


def pipeline_errors(exc: BaseException) -> list[PipelineError]:
    """The typed errors inside a (possibly nested) exception group."""
    if isinstance(exc, PipelineError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in pipeline_errors(sub)]
    return []

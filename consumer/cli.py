"""`python -m consumer` (`metavoice consume`): run the streaming consumer. Flags override METAVOICE_* settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time

from pipeline.cli_support import Parser, document_settings, entry_point, pipeline_errors, print_error, settings_from
from pipeline.config import TOKENIZERS
from pipeline.errors import PipelineError
from pipeline.logs import setup_logging

log = logging.getLogger("consumer")

# After a failure, how long the process may take to end once the consumer has stopped.
FAILED_EXIT_SECONDS = 5.0


def exit_within(seconds: float, code: int) -> None:
    """End the process with `code` at the latest `seconds` from now.

    Once the consumer has returned, everything it promises is durable (files finalized, offsets
    committed - or, after a failure, nothing committed). What can still hold the process is a
    library's exit hook: Prefect drains its event and log workers at interpreter exit, retrying an
    API that is gone - the ephemeral server child, which got the same SIGTERM from the process
    group, is - for minutes. Past `seconds` those run records are dropped, never data.
    """

    def hard_exit() -> None:
        log.warning("exit hooks still running after %.1fs (Prefect run records to an API that is gone): "
                    "exiting now; the files and offsets were already final", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(max(seconds, 0.5), hard_exit)
    timer.daemon = True
    timer.start()

__all__ = ["build_parser", "main", "pipeline_errors"]


def build_parser(prog: str = "python -m consumer") -> argparse.ArgumentParser:
    # Every dest is a setting; values stay text here and pipeline/config.py checks them all, so a flag
    # and its environment variable are refused with the same words.
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--output", dest="output_dir", help="output directory, or s3://bucket/prefix")
    p.add_argument("--group", help="consumer group")
    p.add_argument("--topic", help="events topic")
    p.add_argument("--kafka-bootstrap", help="bootstrap servers")
    p.add_argument("--from-beginning", action="store_true", default=None, help="rewind the group to the first event")
    p.add_argument("--from-timestamp", metavar="ISO8601", help="rewind the group to the first event at/after this time")
    p.add_argument("--force", action="store_true", default=None, help="write into a directory built with other settings")
    p.add_argument("--batch-max-events", metavar="N", help="a micro-batch closes at this many objects")
    p.add_argument("--batch-max-bytes", metavar="N", help="... or at this many bytes of audio")
    p.add_argument("--batch-linger-ms", metavar="MS", help="... or this long after its first event")
    p.add_argument("--roll-max-rows", metavar="N", help="a Parquet file is finalized at this many rows")
    p.add_argument("--roll-max-seconds", metavar="SECONDS", help="... or this long after it was opened")
    p.add_argument("--exit-when-idle", metavar="SECONDS", help="finish, commit and exit after this long without events")
    p.add_argument("--pipeline-depth", metavar="N", help="micro-batches in flight at once")
    p.add_argument("--no-transcribe", dest="transcribe", action="store_false", default=None,
                   help="load no Whisper: rows hold metadata and tokens, transcription is null")
    p.add_argument("--whisper-model", help="faster-whisper model name or converted directory")
    p.add_argument("--whisper-batch-size", metavar="N", help="windows per Whisper batch; 0: 16 on CUDA, 8 on CPU")
    p.add_argument("--whisper-window", help="encoder window per chunk: fitted to it, or Whisper's 30 s")
    p.add_argument("--segmentation", help="file: one row per object version; utterances: one row per utterance")
    p.add_argument("--device")
    p.add_argument("--compute-type", help="auto: float16 on CUDA, int8 on CPU; or a CTranslate2 type")
    p.add_argument("--tokenizer", help=f"{', '.join(TOKENIZERS)}, or family:checkpoint as the Parquet column names it")
    p.add_argument("--no-prefect", dest="prefect_enabled", action="store_false", default=None, help="run stages without Prefect")
    p.add_argument("--metrics-port", metavar="PORT", help="serve /metrics, /healthz, /readyz on this port")
    p.add_argument("--log-format")
    p.add_argument("--log-level")
    return document_settings(p)


@entry_point
def main(argv: list[str] | None = None, prog: str = "python -m consumer") -> int:
    parser = build_parser(prog)
    settings = settings_from(parser.parse_args(argv), parser)  # every value checked: nothing has connected yet
    setup_logging(settings)
    from .app import run_consumer  # the heavy part (models, Kafka, Prefect): only with good settings

    try:
        stats = asyncio.run(run_consumer(settings, handle_signals=True))
    except (PipelineError, BaseExceptionGroup) as exc:
        errors = pipeline_errors(exc)
        if not errors:
            raise
        exit_within(FAILED_EXIT_SECONDS, 1)
        for err in errors:
            line = f"stopped without committing: {type(err).__name__}: {err}"
            if settings.log_format == "json":
                log.error(line)  # one JSON object, like every other line of this process
            else:
                print_error(line)
        return 1
    log.info(
        "done (%s): %d rows, %d dead letters, %d skipped, %d duplicates, %d files, %.1fs audio in %.1fs",
        stats.stop_reason, stats.rows, stats.dead_letters, stats.skipped, stats.duplicates, stats.files,
        stats.audio_seconds, stats.wall_seconds,
    )
    # METAVOICE_SHUTDOWN_TIMEOUT bounds the whole stop, from the signal to the process's end
    since_stop = time.monotonic() - stats.stop_requested_at if stats.stop_requested_at is not None else 0.0
    exit_within(settings.shutdown_timeout - since_stop, 0)
    return 0

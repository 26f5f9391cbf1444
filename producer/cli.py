"""`python -m producer …`: every event source behind one command line.

    backfill      publish one event per object already in a bucket (resumable, rate-limited)
    r2-queue      drain a Cloudflare Queue of R2 notifications (HTTP pull consumer)
    webhook       accept notifications over HTTP (R2 shape, S3 Records[], MinIO)
    create-topic  create the events topic and its DLQ for replay (infinite retention)

Settings come from METAVOICE_* environment variables (see pipeline/config.py); the flags
below override them. A value that is not allowed stops the command with one line naming it
(exit status 2) before anything connects; a typed failure ends it with one line (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path

from aiokafka.errors import KafkaError
from rich.filesize import decimal

from pipeline.cli_support import CliError, Parser, document_settings, entry_point, print_error, settings_from
from pipeline.config import Settings
from pipeline.logs import setup_logging
from pipeline.timeutil import parse_iso_time

from .backfill import progress_wanted, run_backfill
from .r2_queue import CF_API_BASE, MAX_BATCH, QueueConfig, run_r2_queue

log = logging.getLogger("producer")


def build_parser(prog: str = "python -m producer") -> argparse.ArgumentParser:
    # A flag whose dest is a setting stays text here: pipeline/config.py checks it, in the same words
    # as its environment variable.
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers")
    p.add_argument("--topic", help="events topic")
    p.add_argument("--partitions", dest="topic_partitions", metavar="N", help="partitions when creating topics")
    p.add_argument("--log-level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backfill", help="publish one event per object already in a bucket")
    b.add_argument("--bucket", help="bucket to enumerate (METAVOICE_BUCKET)")
    b.add_argument("--prefix", action="append", default=[], help="key prefix; repeatable (default: whole bucket)")
    b.add_argument("--suffix", default=".flac", help="key suffix filter (default .flac); '' for every object")
    b.add_argument("--modified-since", type=_iso_time, metavar="ISO8601", help="only objects modified at or after")
    b.add_argument("--modified-until", type=_iso_time, metavar="ISO8601", help="only objects modified before")
    b.add_argument("--start-after", metavar="KEY", help="list keys after KEY (S3 StartAfter)")
    b.add_argument("--checkpoint", type=Path, metavar="FILE", help="resume from / record progress in FILE")
    b.add_argument("--rate-limit", type=_positive_float, metavar="N", help="at most N events per second")
    b.add_argument("--progress", action="store_true", help="draw a progress bar even when not on a terminal")
    b.add_argument("--dry-run", action="store_true", help="count matching objects and bytes; publish nothing")
    b.add_argument("--chunk-size", type=int, default=500, help="events per acknowledgement wait and checkpoint")

    q = sub.add_parser("r2-queue", help="drain a Cloudflare Queue of R2 notifications into Kafka")
    q.add_argument("--account-id", help="Cloudflare account id (METAVOICE_CF_ACCOUNT_ID)")
    q.add_argument("--queue-id", help="queue id (METAVOICE_CF_QUEUE_ID)")
    q.add_argument("--api-base", help=f"API base URL (METAVOICE_CF_API_BASE, default {CF_API_BASE})")
    q.add_argument("--batch-size", type=int, default=MAX_BATCH, help="messages per pull, 1-100 (default 100)")
    q.add_argument("--visibility-timeout-ms", type=int, default=30_000, help="lease per pull (default 30000)")
    q.add_argument("--retry-delay", type=int, default=10, metavar="S", help="redelivery delay of a failed message")
    q.add_argument("--exit-when-empty", action="store_true", help="stop after the first empty pull")

    w = sub.add_parser("webhook", help="accept bucket notifications over HTTP")
    w.add_argument("--host", default="0.0.0.0")
    w.add_argument("--port", type=int, default=8080)
    w.add_argument("--max-body-bytes", dest="webhook_max_body_bytes", metavar="N", help="larger bodies get 413")

    t = sub.add_parser("create-topic", help="create the events topic and its DLQ when missing")
    t.add_argument("--retention-ms", dest="topic_retention_ms", metavar="MS",
                   help="retention of both topics (default -1: forever, so a replay can re-read everything)")
    t.add_argument("--replication", dest="topic_replication", metavar="N", help="replication factor")
    for parser in (p, *sub.choices.values()):
        document_settings(parser)
    return p


@entry_point  # a typed failure (pipeline.errors.PipelineError, storage and broker ones included): one line, exit 1
def main(argv: list[str] | None = None, prog: str = "python -m producer") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    settings = settings_from(args, parser)  # every value checked: nothing has connected yet
    setup_logging(settings)
    try:
        return COMMANDS[args.command](settings, args)
    except KafkaError as exc:
        return print_error(f"{type(exc).__name__}: {exc}", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    bucket = args.bucket or settings.bucket
    if not bucket:
        raise CliError("backfill needs --bucket or METAVOICE_BUCKET")
    try:
        result = asyncio.run(
            run_backfill(
                settings, bucket, args.prefix, args.suffix,
                modified_since=args.modified_since, modified_until=args.modified_until,
                start_after=args.start_after, checkpoint=args.checkpoint, rate_limit=args.rate_limit,
                dry_run=args.dry_run, progress=progress_wanted(args.progress), chunk_size=args.chunk_size,
            )
        )
    except KeyboardInterrupt:
        if args.checkpoint:
            print(f"interrupted; run again with --checkpoint {args.checkpoint} to resume", file=sys.stderr)
        raise
    size = decimal(result.bytes)
    done_names = ", ".join(repr(p) if p else "(whole bucket)" for p in result.already_done)
    done = f"; already done per checkpoint: {done_names}" if result.already_done else ""
    if result.dry_run:
        print(f"dry run: {result.matched} of {result.listed} listed objects match ({size}); nothing published{done}")
    else:
        print(
            f"published {result.published} events ({result.listed} objects listed, {result.matched} matched, "
            f"{size}) to {settings.topic}{done}"
        )
    return 0


def cmd_r2_queue(settings: Settings, args: argparse.Namespace) -> int:
    account_id = args.account_id or settings.cf_account_id
    queue_id = args.queue_id or settings.cf_queue_id
    if not account_id or not queue_id:
        raise CliError("r2-queue needs --account-id and --queue-id (or METAVOICE_CF_ACCOUNT_ID / _QUEUE_ID)")
    if settings.cf_api_token is None:
        raise CliError("r2-queue needs METAVOICE_CF_API_TOKEN (an API token with Queues Edit)")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise CliError(f"--batch-size: must be 1..{MAX_BATCH}, got {args.batch_size}")
    cfg = QueueConfig(
        account_id=account_id,
        queue_id=queue_id,
        token=settings.cf_api_token,
        api_base=args.api_base or settings.cf_api_base,
        batch_size=args.batch_size,
        visibility_timeout_ms=args.visibility_timeout_ms,
        retry_delay_s=args.retry_delay,
    )

    async def run() -> None:
        stats = await run_r2_queue(settings, cfg, exit_when_empty=args.exit_when_empty, stop=stop_on_signals())
        print(
            f"r2-queue: {stats.messages} messages, {stats.events} events published to {settings.topic}, "
            f"{stats.dead_lettered} malformed sent to {settings.dlq_topic}, {stats.acked} acked, "
            f"{stats.retried} handed back"
        )

    asyncio.run(run())
    return 0


def cmd_webhook(settings: Settings, args: argparse.Namespace) -> int:
    from .webhook import run_webhook

    async def run() -> None:
        await run_webhook(settings, args.host, args.port, stop_on_signals())

    asyncio.run(run())
    return 0


def cmd_create_topic(settings: Settings, args: argparse.Namespace) -> int:
    from broker.topics import ensure_topics

    report = asyncio.run(ensure_topics(settings))
    for name in report.created:
        print(
            f"created {name}: {settings.topic_partitions} partitions, replication {settings.topic_replication}, "
            f"retention.ms={settings.topic_retention_ms}"
        )
    for name in report.existing:
        print(f"{name} already exists (left as it is)")
    for name, current in report.retention_mismatch.items():
        print(
            f"warning: {name} has retention.ms={current}, not {settings.topic_retention_ms}: events older than that "
            f"cannot be replayed; change it with kafka-configs.sh --alter --add-config retention.ms=...",
            file=sys.stderr,
        )
    return 0


COMMANDS = {
    "backfill": cmd_backfill,
    "r2-queue": cmd_r2_queue,
    "webhook": cmd_webhook,
    "create-topic": cmd_create_topic,
}


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM/SIGINT; the handler is then removed, so a second one forces exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: finishing the current batch, then stopping (send it again to force)", sig.name)
        loop.remove_signal_handler(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def _iso_time(text: str) -> datetime:
    try:
        return parse_iso_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value

"""`python -m producer …`: every event source behind one command line."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.config import Settings
from pipeline.logs import setup_logging

from .backfill import run_backfill
from .kafka import ensure_topics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__)
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (METAVOICE_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic", help="events topic (METAVOICE_TOPIC)")
    p.add_argument("--partitions", dest="topic_partitions", type=int, help="partitions when creating topics")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("backfill", help="publish one event per object already in a bucket")
    b.add_argument("--bucket", help="bucket to enumerate (METAVOICE_BUCKET)")
    b.add_argument("--prefix", action="append", default=[], help="key prefix; repeatable")
    b.add_argument("--suffix", default=".flac", help="key suffix filter; '' for every object")

    sub.add_parser("create-topic", help="create the events topic and its DLQ when missing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings().with_overrides(
        kafka_bootstrap=args.kafka_bootstrap, topic=args.topic, topic_partitions=args.topic_partitions
    )
    setup_logging(settings)
    if args.command == "backfill":
        bucket = args.bucket or settings.bucket
        if not bucket:
            raise SystemExit("backfill needs --bucket or METAVOICE_BUCKET")
        result = asyncio.run(run_backfill(settings, bucket, args.prefix, args.suffix))
        print(f"published {result.published} events ({result.listed} objects listed) to {settings.topic}")
    elif args.command == "create-topic":
        asyncio.run(ensure_topics(settings))
        print(f"topics {settings.topic} and {settings.dlq_topic} exist")
    return 0

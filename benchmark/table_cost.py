"""`python -m benchmark.table_cost`: what a finalize and a restart cost as the table grows.

The consumer's output path without Kafka or models: per file, one row through the rolling writer,
the table commit with its checks (`OutputLedger.commit_file`), and the summary update, exactly as
`consumer/committer.py` runs them; a dedupe checkpoint every `CHECKPOINT_EVERY` commits as the
committer takes it (timed apart, `checkpoint_s`). Then two restarts (`pipeline.ledger.recover` in a fresh ledger): after a clean
stop (the committer's final checkpoint) and after a crash (no final checkpoint), each counting the
data files it read. Issue 20's bar: the finalize rate over the last tenth of the files at least
0.8x the first tenth's (`ratio`), and a restart after a clean stop reads no data file. On a shared
host the rate swings with other processes' load; `paired_ratio` alternates finalizes between a
10-file table and the grown one and compares their medians: the growth with the files alone.

    python -m benchmark.table_cost --files 100,1000,1500 [--s3] [--json out.json]

`--s3` writes to an s3:// prefix on the embedded moto server (metavoice/local_services.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from consumer.committer import CHECKPOINT_EVERY
from pipeline.ledger import OutputLedger, object_version_hash, recover, update_summary
from pipeline.output import OffsetRange, open_output
from pipeline.parquet import RollingParquetWriter
from pipeline.records import Segment, TranscribedAudio, to_table
from pipeline.summary import Aggregates

IDENTITY = {"topic": "t", "group": "bench", "whisper_model": "tiny.en", "tokenizer": "synthetic"}


def one_row(i: int) -> TranscribedAudio:
    now = datetime.now(timezone.utc)
    return TranscribedAudio(
        id=f"k{i}.flac", bucket="b", etag=f"e{i}", size_bytes=100, event_time=now, duration_sec=1.0,
        sampling_rate=16000, channels=1, transcription=f"text {i}", language="en", segments=[Segment(0.0, 1.0, "t")],
        tokens=np.zeros((8, 75), dtype=np.int16), tokenizer="synthetic", token_frame_rate=75.0, whisper_model="tiny.en",
        kafka_topic="t", kafka_partition=i % 4, kafka_offset=i // 4, processed_at=now)


class Stream:
    """One output being written file by file as the committer does (one row per file)."""

    def __init__(self, location: str, settings) -> None:
        self.location, self.settings = location, settings
        self.output = open_output(location, settings)
        self.ledger = OutputLedger(self.output, group=IDENTITY["group"])
        recover(self.ledger, IDENTITY)
        self.writer = RollingParquetWriter(self.output, roll_max_rows=10**6, roll_max_seconds=10**6)
        self.files = 0
        self.checkpoints: list[float] = []

    def finalize_one(self) -> float:
        """Seconds for one file: append, finalize (check, upload), table commit, summary."""
        r = one_row(self.files)
        agg = Aggregates()
        agg.add_row(r)
        t0 = time.perf_counter()
        self.ledger.index.add(object_version_hash(r.bucket, r.id, r.etag))  # as the committer's apply does
        self.writer.append(to_table([r]), [OffsetRange("t", r.kafka_partition, r.kafka_offset, r.kafka_offset)], agg)
        self.ledger.commit_file(self.writer.finalize(self.ledger.check))
        update_summary(self.output)
        took = time.perf_counter() - t0
        self.files += 1
        if self.files % CHECKPOINT_EVERY == 0:  # timed apart: one every CHECKPOINT_EVERY files, not per file
            t1 = time.perf_counter()
            self.ledger.checkpoint()
            self.checkpoints.append(time.perf_counter() - t1)
        return took

    def close(self) -> None:
        self.writer.close()


def measure(location: str, settings, files: int, small_location: str, paired: int = 60) -> dict:
    small = Stream(small_location, settings)  # also the warm-up: imports and first calls land here
    for _ in range(10):
        small.finalize_one()
    big = Stream(location, settings)
    took = [big.finalize_one() for _ in range(files)]
    tenth = max(1, files // 10)
    first_rate, last_rate = tenth / sum(took[:tenth]), tenth / sum(took[-tenth:])
    # Paired: finalizes alternate between a fresh table of 10 files and this one, so that whatever
    # else takes the CPU meanwhile (the shared 2-core host) slows both alike; the ratio of their
    # median finalize is the growth with the files alone.
    pairs = [(small.finalize_one(), big.finalize_one()) for _ in range(paired)]
    small_median = float(np.median([a for a, _ in pairs]))
    big_median = float(np.median([b for _, b in pairs]))
    small.close()
    big.close()
    files = big.files

    def restart() -> tuple[float, int]:
        fresh = OutputLedger(open_output(location, settings), group=IDENTITY["group"])
        t0 = time.perf_counter()
        recover(fresh, IDENTITY)
        assert fresh.next_offset("t", 0) == (files + 3) // 4 and fresh.already_written("b", "k0.flac", "e0")
        return time.perf_counter() - t0, fresh.files_read

    crash_s, crash_reads = restart()  # as after a kill -9: the last checkpoint is up to CHECKPOINT_EVERY behind
    big.ledger.checkpoint()  # what the committer's final finalize does at a clean stop
    clean_s, clean_reads = restart()
    return {"files": files - paired, "first_tenth_per_s": round(first_rate, 1), "last_tenth_per_s": round(last_rate, 1),
            "ratio": round(last_rate / first_rate, 2),
            "paired_median_ms_10_files": round(small_median * 1000, 1),
            "paired_median_ms_this_table": round(big_median * 1000, 1),
            "paired_ratio": round(small_median / big_median, 2),
            "checkpoint_s": round(sum(big.checkpoints) / len(big.checkpoints), 3) if big.checkpoints else None,
            "restart_after_crash_s": round(crash_s, 3), "restart_after_crash_files_read": crash_reads,
            "restart_after_stop_s": round(clean_s, 3), "restart_after_stop_files_read": clean_reads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.table_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", default="100,1000,1500", help="comma-separated table sizes (default 100,1000,1500)")
    p.add_argument("--s3", action="store_true", help="an s3:// output on the embedded moto server")
    p.add_argument("--json", dest="json_path", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(n) for n in args.files.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.s3:
            import boto3

            from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION, local_services
            from pipeline.config import Settings

            with local_services(Path(tmp) / "services") as svc:
                s3 = boto3.client("s3", endpoint_url=svc.s3_endpoint_url, region_name=MOTO_REGION,
                                  aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
                for n in sizes:
                    bucket = f"bench-{uuid.uuid4().hex[:8]}"
                    s3.create_bucket(Bucket=bucket)
                    st = Settings(s3_endpoint_url=svc.s3_endpoint_url, s3_region=MOTO_REGION,
                                  s3_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                  s3_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                  spool_dir=str(Path(tmp) / f"spool-{n}"))
                    results.append({"output": "s3", **measure(f"s3://{bucket}/ds", st, n, f"s3://{bucket}/small")})
                    print(json.dumps(results[-1]), flush=True)
        else:
            for n in sizes:
                results.append({"output": "local", **measure(str(Path(tmp) / f"out-{n}"), None, n,
                                                             str(Path(tmp) / f"small-{n}"))})
                print(json.dumps(results[-1]), flush=True)
    if args.json_path:
        args.json_path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers for the exactly-once, fault and poison tests (this module holds no tests of its own).

- `ConsumerProcess` runs the consumer CLI (`python -m consumer`) as a child process, configured
  only through `METAVOICE_*` variables (on top of `services.env()`), so it can be killed with
  SIGKILL or stopped with SIGTERM like a real deployment; its output is kept for inspection.
- `FakeWhisper` stands in for Whisper where the model is beside the point (crashes, rebalances,
  outages): real Kafka, real S3, real files, real processes, and a transcriber that costs
  nothing. On two shared CPU cores tiny.en needs ~0.5-2 s per clip, which would make these
  tests minutes long. A child started with
  `fake_whisper=True` runs the same CLI `main()` with `FakeWhisper` installed (`child_main`).
- `create_topics` / `publish` put events (or raw, malformed bytes) on a fresh topic with a
  plain aiokafka producer: these tests exercise the consumer, not the producers.
- `output_rows`, `assert_exactly_once`, `assert_summary_matches_files` and
  `committed_offsets` read back the state the guarantees are about: finalized Parquet files,
  summary.json and the group's committed offsets in the broker - never logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from pipeline.config import Settings
from pipeline.events import ObjectEvent
from pipeline.models import Models
from pipeline.records import Segment, Transcript
from pipeline.ledger import rebuild_aggregates
from metavoice.local_services import LocalServices
from pipeline.ledger import load_summary
from pipeline.output import as_output
from pipeline.output.layout import writer_of
from tests.output_files import Where, inprogress_files

REPO = Path(__file__).resolve().parent.parent
ObjectVersion = tuple[str, str, str]  # (bucket, key, etag)


# --- a transcriber that costs nothing --------------------------------------------------------
class FakeWhisper:
    """Deterministic transcripts ("3.52 seconds of speech"), optionally slowed down per clip
    (`METAVOICE_TEST_WHISPER_DELAY` seconds) so a stream stays in flight long enough to be
    interrupted. Same interface as `pipeline.transcribe.WhisperTranscriber`."""

    name = "fake-whisper"
    device = "cpu"

    def __init__(self, settings: Settings | None = None) -> None:
        self.delay = float(os.environ.get("METAVOICE_TEST_WHISPER_DELAY", "0"))
        # a clip of exactly this many 16 kHz samples kills the process, as a native crash would
        self.crash_on = int(os.environ.get("METAVOICE_TEST_CRASH_ON_SAMPLES", "0"))

    def transcribe_batch(self, clips: list) -> list[Transcript]:
        if self.crash_on and any(len(c) == self.crash_on for c in clips):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.delay:
            time.sleep(self.delay * len(clips))
        out = []
        for clip in clips:
            seconds = round(len(clip) / 16_000, 2)
            out.append(Transcript(f"{seconds} seconds of speech", "en", [Segment(0.0, seconds, f"{seconds} seconds of speech")]))
        return out

    def close(self) -> None:
        pass


def fake_models() -> Models:
    """Models for in-process consumers: FakeWhisper, the real synthetic tokenizer and the real analysis
    models, as a child started with the default settings loads them (the manifest must match)."""
    from pipeline.models import Analysis
    from pipeline.tokenizers import load_tokenizer

    st = Settings(prefect_enabled=False, device="cpu", cpu_threads=1)
    return Models(st, FakeWhisper(st), load_tokenizer(st), Analysis.load(st) if st.analysis else None)


def child_main() -> None:
    """Entry point of a `fake_whisper` child: the consumer CLI with FakeWhisper installed."""
    import pipeline.models

    pipeline.models.WhisperTranscriber = FakeWhisper  # type: ignore[misc,assignment]
    from consumer.cli import main

    raise SystemExit(main())


# --- the consumer as a child process -------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """`METAVOICE_*` variables that reproduce `settings` in a child process (secrets excluded)."""
    return settings.child_env()


class ConsumerProcess:
    """`python -m consumer` in a child process; stderr goes to a file the test can read."""

    def __init__(
        self, services: LocalServices, settings: Settings, log_path: Path, *, fake_whisper: bool = True,
        unset: tuple[str, ...] = (), **extra_env: str,
    ) -> None:
        self.log_path = log_path
        self.argv = [sys.executable, "-c", "from tests.consumer_process import child_main; child_main()"] if fake_whisper \
            else [sys.executable, "-m", "consumer"]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("METAVOICE_")},
            **services.env(),
            **settings_env(settings),
            "METAVOICE_CPU_THREADS": "1",  # two shared cores: leave one to the other consumer/tests
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        for name in unset:
            self.env.pop(name, None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ConsumerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"consumer did not exit within {timeout}s; log:\n{self.log()[-4000:]}") from None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, then reap: the harshest stop there is."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"consumer exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"consumer did not log {text!r} within {timeout}s:\n{self.log()[-4000:]}")


@contextlib.contextmanager
def logs_on_failure(*procs: "ConsumerProcess | None") -> Iterator[None]:
    """Append the child consumers' logs to any assertion that fails inside the block."""
    try:
        yield
    except AssertionError as exc:
        logs = "\n".join(f"--- {p.log_path.name} ---\n{p.log()[-6000:]}" for p in procs if p is not None)
        raise AssertionError(f"{exc}\n{logs}") from exc


def wait_for_rows(output_dir: Where, count: int, timeout: float) -> None:
    """Until the finalized files hold `count` distinct object versions."""
    from pipeline.ledger import OutputLedger

    ledger = OutputLedger(output_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ledger.refresh()
        if len(ledger.index) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {len(ledger.index)} of {count} object versions in files after {timeout}s")


def wait_for_files(output_dir: Where, at_least: int, timeout: float, proc: ConsumerProcess | None = None) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = as_output(output_dir).finalized()
        if len(files) >= at_least:
            return files
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} finalized files after {timeout}s: {as_output(output_dir).finalized()}")


# --- an outage that keeps the server's state ---------------------------------------------------
class TcpOutage:
    """A TCP relay 127.0.0.1:`port` -> 127.0.0.1:`target`, for outages that must not lose data.

    Stopping moto itself would drop every bucket (it keeps them in memory), so the objects would
    have to be re-uploaded after the restart - and a retry landing in between would read "no such
    bucket". `cut()` does to clients what a dead server does: the listener closes (connection
    refused) and every open connection is reset; `restore()` listens on the same port again.
    """

    def __init__(self, target_port: int) -> None:
        from metavoice.local_services import free_port

        self.target = target_port
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.bytes_from_server = 0  # what clients were sent: a ranged read fetches less than the object
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.1)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def cut(self) -> None:
        # shutdown() before close(): close() alone neither wakes a thread blocked in accept()/recv()
        # nor lets the kernel tear the connection down while that thread still holds it.
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    close = cut

    def _accept(self, ls: socket.socket) -> None:
        while self._listener is ls:
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, a is upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool = False) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_server:
                    with self._lock:
                        self.bytes_from_server += len(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# --- arranging the stream --------------------------------------------------------------------
def create_topics(settings: Settings, partitions: int | None = None) -> None:
    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            n = partitions or settings.topic_partitions
            await admin.create_topics([NewTopic(settings.topic, n, 1), NewTopic(settings.dlq_topic, 1, 1)])
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()

    asyncio.run(run())


def publish(settings: Settings, messages: Iterable[ObjectEvent | tuple[bytes, bytes]], max_request_size: int = 1 << 20) -> int:
    """Publish events (JSON, keyed by object) or raw `(key, value)` pairs; returns once acknowledged."""

    async def run() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=max_request_size)
        await producer.start()
        try:
            futures = []
            for m in messages:
                key, value = (m.message_key, m.to_json()) if isinstance(m, ObjectEvent) else m
                futures.append(await producer.send(settings.topic, value, key=key))
            await asyncio.gather(*futures)
            return len(futures)
        finally:
            await producer.stop()

    return asyncio.run(run())


class Trickle(threading.Thread):
    """Publishes events one by one, `interval` seconds apart, in the background: a stream that
    is still flowing whenever the test changes the consumer group. It keeps going until
    `then_stop_after(n)` was called and `n` more events went out (or the events run out).
    `sent` lists the events the broker acknowledged."""

    def __init__(self, settings: Settings, events: list[ObjectEvent], interval: float) -> None:
        super().__init__(daemon=True)
        self.settings, self.events, self.interval = settings, events, interval
        self.sent: list[ObjectEvent] = []
        self.error: BaseException | None = None
        self._stop_at: int | None = None

    def then_stop_after(self, n: int) -> None:
        self._stop_at = len(self.sent) + n

    def run(self) -> None:
        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")
            await producer.start()
            try:
                for e in self.events:
                    if self._stop_at is not None and len(self.sent) >= self._stop_at:
                        return
                    await producer.send_and_wait(self.settings.topic, e.to_json(), key=e.message_key)
                    self.sent.append(e)
                    await asyncio.sleep(self.interval)
            finally:
                await producer.stop()

        try:
            asyncio.run(go())
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float) -> list[ObjectEvent]:
        self.join(timeout)
        assert not self.is_alive(), "the trickle publisher did not finish"
        assert self.error is None, f"publishing failed: {self.error!r}"
        return self.sent


def upload_copies(s3, bucket: str, sources: list[Path], count: int, prefix: str = "a/") -> list[ObjectEvent]:
    """`count` objects reusing `sources` round-robin (cheap: few distinct clips, many keys).

    Returns one create event per object, with the etag S3 reported.
    """
    events = []
    for i in range(count):
        key = f"{prefix}{i:04d}.flac"
        body = sources[i % len(sources)].read_bytes()
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
        events.append(ObjectEvent(bucket=bucket, key=key, size=len(body), etag=etag))
    return events


def versions(events: Iterable[ObjectEvent]) -> set[ObjectVersion]:
    return {(e.bucket, e.key, e.etag or "") for e in events}


# --- reading back the guarantees ---------------------------------------------------------------
def output_rows(output_dir: Where) -> list[dict]:
    """(bucket, id, etag, kafka_partition, kafka_offset) of every row of the table's latest version,
    read as any Delta reader does (deltalake's dataset: only the files the log adds)."""
    table = as_output(output_dir).table.snapshot()
    if table is None:
        return []
    rows = table.to_pyarrow_dataset().to_table(
        columns=["bucket", "id", "etag", "kafka_partition", "kafka_offset"]).to_pylist()
    return sorted(rows, key=lambda r: (r["kafka_partition"], r["kafka_offset"]))  # a table has no row order


def assert_exactly_once(output_dir: Where, expected: set[ObjectVersion]) -> None:
    """Every expected object version is in the finalized files exactly once, and nothing else is."""
    rows = output_rows(output_dir)
    counts = Counter((r["bucket"], r["id"], r["etag"]) for r in rows)
    doubled = {v: n for v, n in counts.items() if n > 1}
    missing = expected - counts.keys()
    unexpected = counts.keys() - expected
    assert not doubled, f"rows written more than once: {doubled}"
    assert not missing, f"{len(missing)} events lost: {sorted(missing)[:5]}"
    assert not unexpected, f"rows nobody asked for: {sorted(unexpected)[:5]}"
    assert not inprogress_files(output_dir), "in-progress files left behind"


def assert_summary_matches_files(output_dir: Where) -> dict:
    """summary.json's aggregates equal those recomputed from the finalized files' rows."""
    loaded = load_summary(output_dir)
    assert loaded is not None, "summary.json is missing or unreadable"
    summary = loaded.aggregates
    rebuilt, names = rebuild_aggregates(output_dir)
    table = as_output(output_dir).table
    table.refresh()
    assert loaded.table_version == table.version, f"summary covers version {loaded.table_version}, the table is at {table.version}"
    assert loaded.parquet_files == len(names), f"summary counts {loaded.parquet_files} files, the table holds {len(names)}"
    assert summary.files == rebuilt.files
    assert abs(summary.total_duration_sec - rebuilt.total_duration_sec) < 1e-3
    assert summary.sampling_rates == rebuilt.sampling_rates
    assert summary.languages == rebuilt.languages
    assert vars(summary.transcription_lengths) == vars(rebuilt.transcription_lengths)
    assert vars(summary.token_frames) == vars(rebuilt.token_frames)
    assert summary.errors == rebuilt.errors
    assert (summary.skipped, summary.duplicates) == (rebuilt.skipped, rebuilt.duplicates)
    return {"aggregates": summary, "files": names}


def footer_offsets(output_dir: Where) -> dict[int, list[tuple[int, int, str]]]:
    """Per partition, the [first, last] offset ranges the table's commits hold, and the commit."""
    table = as_output(output_dir).table
    out: dict[int, list[tuple[int, int, str]]] = {}
    if table.refresh() is None:
        return out
    for c in table.commits(None):
        rows = sum(n for _, n in c.files)
        for r in c.offsets:
            out.setdefault(r.partition, []).append((r.first, r.last, f"v{c.version} {[n for n, _ in c.files]} ({rows} rows)"))
    return {k: sorted(v) for k, v in out.items()}


def assert_offsets_contiguous(output_dir: Where, ends: dict[int, int]) -> None:
    """The table's commits cover every offset [0, end) of each partition once: no gap, no overlap."""
    spans = footer_offsets(output_dir)
    for partition, end in ends.items():
        nxt = 0
        for first, last, _ in spans.get(partition, []):
            assert first == nxt, f"partition {partition}: footers jump from {nxt} to {first}: {spans[partition]}"
            nxt = last + 1
        assert nxt == end, f"partition {partition}: footers end at {nxt}, the log at {end}"


def writer_ids(output_dir: Where) -> set[str]:
    """Writer ids from finalized file names `part-<stamp>-<writer>-<seq>.parquet`."""
    return {writer_of(name) for name in as_output(output_dir).finalized()}


def committed_offsets(settings: Settings, partitions: int | None = None) -> dict[int, int | None]:
    """The group's committed offset per partition, asked from the broker (None: nothing committed)."""

    async def run() -> dict[int, int | None]:
        c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group,
                             enable_auto_commit=False)
        await c.start()
        try:
            n = partitions or settings.topic_partitions
            return {p: await c.committed(TopicPartition(settings.topic, p)) for p in range(n)}
        finally:
            await c.stop()

    return asyncio.run(run())


def partition_ends(settings: Settings, expected: int | None = None, partitions: int | None = None) -> dict[int, int]:
    """Records per partition, counted by reading the topic (the broker's end offsets are not trusted):
    until `expected` records arrived (then 0.3 s more, to catch extras), or until 1 s of quiet."""

    async def run() -> dict[int, int]:
        c = AIOKafkaConsumer(settings.topic, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        ends: dict[int, int] = {p: 0 for p in range(partitions or settings.topic_partitions)}
        seen, quiet_since, deadline = 0, time.monotonic(), time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                got = await c.getmany(timeout_ms=100)
                for tp, recs in got.items():
                    seen += len(recs)
                    if recs:
                        ends[tp.partition] = max(ends[tp.partition], recs[-1].offset + 1)
                if got or (expected is not None and seen < expected):
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= (0.3 if expected is not None else 1.0):
                    break
        finally:
            await c.stop()
        return ends

    return asyncio.run(run())

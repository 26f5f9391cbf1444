"""The dataset in object storage: the same promises as a local directory, against a real S3 server.

Files appear under data/ whole or not at all (one PUT, or a multipart upload of equal parts) and
join the dataset with a Delta table commit; the log and three columns come back with ranged reads;
summary.json and _manifest.json are compare-and-swap writes that no racing writer can undo; two
writers holding the same offsets never both commit them (the table's app transactions decide).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline.errors import Fenced, OutputConfigMismatch
from pipeline.ledger import OutputLedger, load_summary, publish_summary, rebuild_aggregates
from pipeline.manifest import check_manifest
from pipeline.output import LocalOutput, OffsetRange, open_output
from pipeline.output.layout import CARD_NAME, MANIFEST_NAME, SUMMARY_NAME
from pipeline.output.s3 import S3Output
from pipeline.parquet import RollingParquetWriter
from pipeline.records import Segment, TranscribedAudio, to_table
from tests.consumer_process import TcpOutage
from tests.delta_tables import aggregates_of

pytestmark = pytest.mark.integration


def row(i: int, frames: int = 10, noise: bool = False) -> TranscribedAudio:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    tokens = (np.random.default_rng(i).integers(-32768, 32767, size=(8, frames)) if noise
              else np.arange(8 * frames).reshape(8, frames)).astype(np.int16)
    return TranscribedAudio(
        id=f"k{i}.flac", bucket="b", etag=f"e{i}", size_bytes=100, event_time=now, duration_sec=frames / 75,
        sampling_rate=16000, channels=1, transcription=f"text {i}", language="en",
        segments=[Segment(0.0, 1.0, f"text {i}")], tokens=tokens, tokenizer="synthetic", token_frame_rate=75.0,
        whisper_model="tiny.en", kafka_topic="t", kafka_partition=0, kafka_offset=i, processed_at=now,
    )



@pytest.fixture
def store(settings_factory, s3, unique, tmp_path):
    """A fresh s3:// output (its own bucket and prefix) with a local spool."""
    s3.create_bucket(Bucket=f"out-{unique}")
    st = settings_factory(output_dir=f"s3://out-{unique}/datasets/speech", spool_dir=str(tmp_path / "spool"))
    out = open_output(st.output_dir, st)
    yield out
    out.close()


def write_file(out, first: int, count: int, partition: int = 0, noise: bool = False, frames: int = 10,
               named_versions: bool = True) -> str:
    """`named_versions=False`: the commit does not name its object versions (a migrated 0.1 file)."""
    w = RollingParquetWriter(out, roll_max_rows=10**6, roll_max_seconds=3600)
    rows = [row(i, frames=frames, noise=noise) for i in range(first, first + count)]
    w.append(to_table(rows), [OffsetRange("t", partition, first, first + count - 1)], aggregates_of(rows))
    footer = w.finalize()
    w.close()
    if not named_versions:
        footer.versions = None
    OutputLedger(out).commit_file(footer)
    return footer.name


def keys(s3, out: S3Output) -> list[str]:
    found = s3.list_objects_v2(Bucket=out.bucket, Prefix=out.prefix).get("Contents", [])
    return sorted(o["Key"][len(out.prefix) + 1:] for o in found)


def test_a_finalized_file_is_uploaded_whole_under_data_and_read_back_from_its_footer(store, s3):
    name = write_file(store, 0, 3)
    assert isinstance(store, S3Output)
    assert [k for k in keys(s3, store) if not k.startswith("data/_delta_log/")] == [f"data/{name}"]  # no spool file, no claim
    assert store.finalized() == [name]
    footer = store.read_footer(name)
    assert footer.rows == 3 and [(r.first, r.last) for r in footer.offsets] == [(0, 2)]
    assert store.read_columns(name, ["id"]).column("id").to_pylist() == ["k0.flac", "k1.flac", "k2.flac"]
    assert not list(store.spool.glob("*.inprogress"))


@pytest.mark.parametrize("named_versions", [True, False], ids=["commits-name-versions", "migrated-commits"])
def test_recovery_reads_the_log_and_three_columns_never_whole_files(store, s3, services, named_versions):
    """The ledger learns offsets and object versions from an object store through a byte-counting
    relay: the table's log, and no data byte when the commits name their object versions; ranged
    reads of three small columns, a fraction of the files' bytes, for commits that do not."""
    names = [write_file(store, 0, 50, noise=True, frames=3000, named_versions=named_versions),
             write_file(store, 50, 50, noise=True, frames=3000, named_versions=named_versions)]
    total = sum(s3.head_object(Bucket=store.bucket, Key=store.key(f"data/{n}"))["ContentLength"] for n in names)
    relay = TcpOutage(int(services.s3_endpoint_url.rsplit(":", 1)[1]))
    try:
        counted = S3Output(store.location, spool=store.spool, client_kwargs={**_client_kwargs(store), "endpoint_url": relay.url})
        counted.table = store.table  # the log read directly: the relay counts what is read of the data files
        ledger = OutputLedger(counted)
        ledger.refresh()
        fetched = relay.bytes_from_server
    finally:
        relay.close()
    assert ledger.next_offset("t", 0) == 100 and len(ledger.index) == 100
    assert ledger.already_written("b", "k42.flac", "e42")
    assert fetched < total / 10, f"recovery fetched {fetched} bytes of {total}: whole files, not footers and columns"
    assert (ledger.files_read == 0 and fetched == 0) if named_versions else ledger.files_read == 2


def test_a_file_larger_than_a_part_is_a_multipart_upload_of_equal_parts(settings_factory, s3, unique, tmp_path):
    s3.create_bucket(Bucket=f"out-{unique}")
    st = settings_factory(output_dir=f"s3://out-{unique}", spool_dir=str(tmp_path / "spool"),
                          output_part_bytes=5 * 1024 * 1024)
    out = open_output(st.output_dir, st)
    parts: list[int] = []

    def part_size(params, **_):
        body = params["body"]
        if isinstance(body, bytes):
            parts.append(len(body))
        else:
            at = body.tell()
            parts.append(body.seek(0, 2) - at)
            body.seek(at)

    out.client.meta.events.register("before-call.s3.UploadPart", part_size)
    name = write_file(out, 0, 60, noise=True, frames=7000)  # 60 x 8 x 7000 int16 of noise: ~6.7 MB, incompressible
    size = s3.head_object(Bucket=out.bucket, Key=f"data/{name}")["ContentLength"]
    assert size > 5 * 1024 * 1024
    assert len(parts) >= 2 and len(set(parts[:-1])) == 1 and parts[0] == 5 * 1024 * 1024 and parts[-1] <= parts[0]
    assert sum(parts) == size
    assert out.read_footer(name).rows == 60
    assert not s3.list_multipart_uploads(Bucket=out.bucket).get("Uploads")


def test_two_summary_writers_racing_lose_no_update(store, monkeypatch):
    """Each writer finalizes files and publishes the summary; reads are slowed so that the writers'
    read-modify-write cycles overlap. Every file must be in the final summary exactly once."""
    real_read = S3Output._read_doc  # noqa: SLF001
    conflicts = []

    def slow_read(self, name):
        got = real_read(self, name)
        time.sleep(0.05)  # another writer lands its write between our read and our write
        return got

    real_write = S3Output._write_doc  # noqa: SLF001

    def counting_write(self, name, data, version):
        ok = real_write(self, name, data, version)
        if not ok:
            conflicts.append(name)
        return ok

    monkeypatch.setattr(S3Output, "_read_doc", slow_read)
    monkeypatch.setattr(S3Output, "_write_doc", counting_write)
    settings = store  # the same prefix, a second client: as a consumer on another machine would be
    other = S3Output(store.location, spool=store.spool.parent / "spool2",
                     client_kwargs=_client_kwargs(store), part_bytes=store.part_bytes)
    errors = []

    def writer(out, base):
        try:
            for k in range(4):
                write_file(out, base + 10 * k, 2, partition=base // 1000)
                publish_summary(out)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(o, b)) for o, b in ((settings, 0), (other, 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    state = load_summary(store)
    store.table.refresh()
    assert state.parquet_files == len(store.finalized()) == 8 and state.table_version == store.table.version
    summary = state.aggregates
    assert summary.files == 16
    assert conflicts, "the writers never raced: the test proves nothing"
    rebuilt, _ = rebuild_aggregates(store)
    assert rebuilt.files == summary.files


def test_compare_and_swap_updates_from_two_machines_lose_none(store, monkeypatch):
    """Two clients increment one document 10 times each, reads slowed so that cycles overlap: 20."""
    real_read = S3Output._read_doc  # noqa: SLF001

    def slow_read(self, name):
        got = real_read(self, name)
        time.sleep(0.03)
        return got

    monkeypatch.setattr(S3Output, "_read_doc", slow_read)
    other = S3Output(store.location, spool=store.spool, client_kwargs=_client_kwargs(store))

    def increment(out):
        for _ in range(10):
            out.update_doc("counter.json", lambda cur: orjson.dumps({"n": (orjson.loads(cur)["n"] if cur else 0) + 1}))

    threads = [threading.Thread(target=increment, args=(o,)) for o in (store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert orjson.loads(store.read_doc("counter.json"))["n"] == 20


def _client_kwargs(out: S3Output) -> dict:
    from metavoice.local_services import MOTO_CREDENTIALS, MOTO_REGION

    return {"endpoint_url": out.client.meta.endpoint_url, "region_name": MOTO_REGION,
            "aws_access_key_id": MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def test_the_manifest_is_created_once_and_a_different_configuration_is_refused(store, s3):
    ident = {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"}
    results, errors = [], []

    def start(identity):
        try:
            results.append(check_manifest(store, identity))
        except OutputConfigMismatch as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(ident if i % 2 else {**ident, "whisper_model": "large-v3"},))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # whichever configuration created the manifest, the other one was refused: never both
    assert len(results) == 2 and len(errors) == 2
    assert len({r["whisper_model"] for r in results}) == 1
    assert orjson.loads(store.read_doc(MANIFEST_NAME))["whisper_model"] == results[0]["whisper_model"]
    card = store.read_doc(CARD_NAME).decode()
    assert "configs:" in card and "data/*.parquet" in card


def test_a_writer_whose_offsets_another_writer_committed_is_fenced_and_publishes_nothing(store, s3):
    stale = RollingParquetWriter(store, roll_max_rows=10**6, roll_max_seconds=3600)
    rows = [row(i) for i in range(5)]
    stale.append(to_table(rows), [OffsetRange("t", 0, 0, 4)], aggregates_of(rows))
    owner = write_file(store, 0, 3)  # the partition's new owner commits offsets 0-2 first
    ledger = OutputLedger(store)
    with pytest.raises(Fenced):
        stale.finalize(ledger.check)
    assert store.finalized() == [owner]
    assert [k for k in keys(s3, store) if not k.startswith("data/_delta_log/")] == [f"data/{owner}"]
    assert not list(store.spool.glob("*.inprogress"))


def test_two_writers_committing_the_same_offsets_at_once_leave_one_file_and_remove_the_other(settings_factory, s3, unique, tmp_path):
    """Both read the table at the same version and upload a file for offsets 0-2; their commits race
    through the log's conditional put. One commit lands, the other is refused by the table, re-reads,
    finds the offsets taken, removes its upload and raises `Fenced`: never two files for one offset."""
    s3.create_bucket(Bucket=f"out-{unique}")
    st = settings_factory(output_dir=f"s3://out-{unique}/p", spool_dir=str(tmp_path / "spool"))
    outs = [open_output(st.output_dir, st) for _ in range(2)]
    outs[0].table.ensure()
    ledgers = [OutputLedger(o) for o in outs]
    footers = []
    for o in outs:
        w = RollingParquetWriter(o, roll_max_rows=10**6, roll_max_seconds=3600)
        rows = [row(i) for i in range(3)]
        w.append(to_table(rows), [OffsetRange("t", 0, 0, 2)], aggregates_of(rows))
        footers.append(w.finalize())
        w.close()
    for ledger in ledgers:
        ledger.refresh()
    barrier, results = threading.Barrier(2), []

    def commit(i):
        barrier.wait()
        try:
            results.append(("ok", ledgers[i].commit_file(footers[i])))
        except Fenced as exc:
            results.append(("fenced", exc))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["fenced", "ok"], results
    winner = outs[0].finalized()
    assert len(winner) == 1 and winner[0] in {f.name for f in footers}
    assert [k for k in keys(s3, outs[0]) if not k.startswith("data/_delta_log/")] == [f"data/{winner[0]}"]
    fresh = OutputLedger(open_output(st.output_dir, st))
    fresh.refresh()
    assert fresh.next_offset("t", 0) == 3


def test_an_object_store_output_leaves_a_dead_writers_spool_and_multipart_uploads_behind_no_more(store, s3, tmp_path):
    store.spool.mkdir(parents=True, exist_ok=True)
    orphan = store.spool / "part-20260101T000000-deadbeef-00001.parquet.inprogress"
    orphan.write_bytes(b"half")
    store.claim_ttl_s = 0.0  # every multipart upload is older than the TTL
    up = s3.create_multipart_upload(Bucket=store.bucket, Key=store.key("data/part-x.parquet"))
    removed = store.discard_orphans()
    assert orphan.name in removed and not orphan.exists()
    assert store.key("data/part-x.parquet") in removed
    assert not s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads"), up["UploadId"]


def test_a_local_output_reads_like_a_dataset_while_a_file_is_open(tmp_path):
    import datasets
    import pyarrow.dataset as ds

    out = LocalOutput(tmp_path / "out")
    check_manifest(out, {"topic": "t", "group": "g", "whisper_model": "tiny.en", "tokenizer": "synthetic"})
    write_file(out, 0, 3)
    publish_summary(out)
    w = RollingParquetWriter(out, roll_max_rows=10**6, roll_max_seconds=3600)  # a file being written
    w.append(to_table([row(9)]), [OffsetRange("t", 0, 9, 9)], aggregates_of([row(9)]))
    assert ds.dataset(out.data_dir, format="parquet").to_table().num_rows == 3
    loaded = datasets.load_dataset(str(out.root), split="train")
    assert loaded.num_rows == 3 and sorted(loaded["id"]) == ["k0.flac", "k1.flac", "k2.flac"]
    w.abort()
    w.close()


def test_the_output_store_takes_the_audio_stores_endpoint_and_keys_unless_given_its_own():
    from pipeline.config import Settings

    audio = Settings(s3_endpoint_url="http://audio", s3_region="auto", s3_access_key_id="ak", s3_secret_access_key="as")
    assert audio.output_s3_client_kwargs() == audio.s3_client_kwargs()
    other = audio.with_overrides(output_s3_endpoint_url="http://data", output_s3_region="eu-west-1",
                                 output_s3_access_key_id="dk", output_s3_secret_access_key="ds")
    assert other.output_s3_client_kwargs() == {"endpoint_url": "http://data", "region_name": "eu-west-1",
                                               "aws_access_key_id": "dk", "aws_secret_access_key": "ds"}
    assert other.s3_client_kwargs()["aws_access_key_id"] == "ak"  # downloads keep the audio's keys

"""Readers of the live table (README "Reading the dataset"): deltalake, duckdb's delta_scan (the
extension loaded offline from its wheel) and polars.scan_delta read what the real consumer wrote,
on a local directory and on an s3:// prefix (moto), the latest version and an older one alike."""

from __future__ import annotations

import os
from collections import Counter

import pyarrow as pa
import pytest

from pipeline.output.table import open_table, storage_options, table_uri
from tests.consumer_process import ConsumerProcess, create_topics, logs_on_failure, publish, upload_copies, versions

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def live_table(request, services, s3, bucket, settings_factory, speech_corpus, unique, tmp_path):
    """(settings, expected object versions) of a table the consumer (a child process) wrote: 8
    uploads in files of two rows, so the log holds several commits."""
    if request.param == "s3":
        s3.create_bucket(Bucket=f"out-{unique}")
        st = settings_factory(output_dir=f"s3://out-{unique}/dataset", spool_dir=str(tmp_path / "spool"),
                              batch_max_events=2, roll_max_rows=2, exit_when_idle=2.0)
    else:
        st = settings_factory(batch_max_events=2, roll_max_rows=2, exit_when_idle=2.0)
    events = upload_copies(s3, bucket, [c.path for c in speech_corpus[:3]], 8)
    create_topics(st)
    publish(st, events)
    proc = ConsumerProcess(services, st, tmp_path / "consumer.log").start()
    try:
        rc = proc.wait(timeout=180)
    finally:
        proc.kill()
    with logs_on_failure(proc):
        assert rc == 0
        assert open_table(st.output_dir, st).version() >= 2, "expected several commits"
    return st, versions(events)


def delta_extension(name: str) -> str:
    """The path of a duckdb extension shipped as a wheel (`duckdb-extension-<name>`), for LOAD."""
    import importlib

    import duckdb

    package = importlib.import_module(f"duckdb_extension_{name}")
    return os.path.join(os.path.dirname(package.__file__), "extensions", f"v{duckdb.__version__}",
                        f"{name}.duckdb_extension")


def duckdb_connection(st, services):
    """A duckdb that cannot download anything: delta (and httpfs, for S3 secrets) from their wheels."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.sql(f"LOAD '{delta_extension('delta')}'")
    if str(st.output_dir).startswith("s3://"):
        con.sql(f"LOAD '{delta_extension('httpfs')}'")
        endpoint = services.s3_endpoint_url.removeprefix("http://")
        con.sql(f"CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
                f"ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)")
    return con


def counted(rows) -> Counter:
    return Counter((r[0], r[1], r[2]) for r in rows)


def test_deltalake_duckdb_and_polars_read_every_row_of_the_live_table_once(live_table, services):
    import polars as pl
    from deltalake import DeltaTable

    st, expected = live_table
    uri, opts = table_uri(st.output_dir), storage_options(st.output_dir, st)
    once = Counter(dict.fromkeys(expected, 1))

    dataset = DeltaTable(uri, storage_options=opts or None).to_pyarrow_dataset()
    table = dataset.to_table(columns=["bucket", "id", "etag", "tokens"])
    assert counted(zip(*(table.column(c).to_pylist() for c in ("bucket", "id", "etag")))) == once
    tokens = table.schema.field("tokens").type
    assert pa.types.is_int16(tokens.value_type.value_type)  # Delta's short: the codes come back as written

    con = duckdb_connection(st, services)
    assert counted(con.sql(f"select bucket, id, etag from delta_scan('{uri}')").fetchall()) == once

    frame = pl.scan_delta(uri, storage_options=opts or None).select("bucket", "id", "etag").collect()
    assert counted(frame.iter_rows()) == once
    assert frame.height == len(expected)


def first_version_with_rows(uri: str, opts: dict) -> int:
    from deltalake import DeltaTable

    version = 0
    while DeltaTable(uri, version=version, storage_options=opts or None).to_pyarrow_dataset().count_rows() == 0:
        version += 1
    return version


def test_the_three_readers_agree_on_an_older_version(live_table, services):
    import polars as pl
    from deltalake import DeltaTable

    st, expected = live_table
    uri, opts = table_uri(st.output_dir), storage_options(st.output_dir, st)
    older = first_version_with_rows(uri, opts)
    rows = DeltaTable(uri, version=older, storage_options=opts or None).to_pyarrow_table(
        columns=["bucket", "id", "etag"]).to_pylist()
    by_deltalake = counted((r["bucket"], r["id"], r["etag"]) for r in rows)
    con = duckdb_connection(st, services)
    by_duckdb = counted(con.sql(f"select bucket, id, etag from delta_scan('{uri}', version => {older})").fetchall())
    by_polars = counted(pl.scan_delta(uri, version=older, storage_options=opts or None)
                        .select("bucket", "id", "etag").collect().iter_rows())
    assert by_deltalake == by_duckdb == by_polars
    assert 0 < sum(by_deltalake.values()) < len(expected)  # one commit's files: fewer rows than the latest
    assert set(by_deltalake) <= expected

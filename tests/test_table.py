"""The dataset's Delta table: one root and one way to open it for a local directory and an s3:// prefix."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction

from pipeline.output.table import app_id, open_table, storage_options, table_uri

SCHEMA = pa.schema([("id", pa.string()), ("tokens", pa.list_(pa.int16()))])


def test_the_table_root_is_data_under_the_output(tmp_path):
    assert table_uri(tmp_path) == str(tmp_path / "data")
    assert table_uri("s3://bucket/some/prefix/") == "s3://bucket/some/prefix/data"
    assert storage_options(tmp_path) == {}


def test_storage_options_name_the_endpoint_keys_and_an_etag_conditional_put_off_aws(settings_factory):
    st = settings_factory(s3_endpoint_url="http://127.0.0.1:9", s3_access_key_id="k", s3_secret_access_key="s")
    opts = storage_options("s3://b/p", st)
    assert opts["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and opts["AWS_ALLOW_HTTP"] == "true"
    assert (opts["AWS_ACCESS_KEY_ID"], opts["AWS_SECRET_ACCESS_KEY"]) == ("k", "s")
    assert opts["aws_conditional_put"] == "etag"
    aws = settings_factory(s3_endpoint_url="https://s3.eu-west-1.amazonaws.com")
    assert "aws_conditional_put" not in storage_options("s3://b/p", aws)
    forced = settings_factory(s3_endpoint_url="https://s3.eu-west-1.amazonaws.com", output_conditional_put="etag")
    assert storage_options("s3://b/p", forced)["aws_conditional_put"] == "etag"


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
def test_open_table_reads_back_app_transactions_and_int16_tokens(where, settings_factory, s3, unique, tmp_path):
    if where == "s3":
        s3.create_bucket(Bucket=f"out-{unique}")
        st = settings_factory(output_dir=f"s3://out-{unique}/speech")
    else:
        st = settings_factory(output_dir=tmp_path / "out")
    loc = st.output_dir
    assert open_table(loc, st) is None  # no table yet
    DeltaTable.create(table_uri(loc), SCHEMA, storage_options=storage_options(loc, st) or None)
    from deltalake import write_deltalake

    write_deltalake(table_uri(loc), pa.table({"id": ["a"], "tokens": [[-32768, 32767]]}, schema=SCHEMA), mode="append",
                    storage_options=storage_options(loc, st) or None,
                    commit_properties=CommitProperties(app_transactions=[Transaction(app_id("g", "t", 0), 41)]))
    table = open_table(loc, st)
    assert table.version() == 1 and table.transaction_version(app_id("g", "t", 0)) == 41
    assert table.transaction_version(app_id("g", "t", 1)) is None
    back = open_table(loc, st).to_pyarrow_table()
    assert back.schema.field("tokens").type == pa.list_(pa.int16())
    assert back.column("tokens").to_pylist() == [[-32768, 32767]]
    assert open_table(loc, st, version=0).to_pyarrow_table().num_rows == 0


def test_deltalake_polars_and_duckdb_read_the_rows_the_consumer_path_committed(tmp_path):
    """Files through the rolling writer and `OutputLedger.commit_file`, as a finalize does: every
    Delta reader sees the committed rows with int16 tokens, and not a file uploaded but never
    committed (a consumer killed between its upload and its commit)."""
    import duckdb
    import polars as pl

    from pipeline.ledger import OutputLedger
    from pipeline.output import LocalOutput, OffsetRange
    from pipeline.parquet import RollingParquetWriter
    from pipeline.records import to_table

    from .test_parquet_writer import agg, row

    out = LocalOutput(tmp_path)
    ledger = OutputLedger(out)
    w = RollingParquetWriter(out, roll_max_rows=100, roll_max_seconds=60)
    for first in (0, 2):
        rows = [row(first), row(first + 1)]
        w.append(to_table(rows), [OffsetRange("t", 0, first, first + 1)], agg(rows))
        ledger.commit_file(w.finalize())
    w.append(to_table([row(4)]), [OffsetRange("t", 0, 4, 4)], agg([row(4)]))
    w.finalize()  # uploaded, never committed
    w.close()
    uri = table_uri(tmp_path)
    want = ["k0.flac", "k1.flac", "k2.flac", "k3.flac"]
    assert sorted(DeltaTable(uri).to_pyarrow_dataset().to_table(columns=["id"]).column("id").to_pylist()) == want
    frame = pl.scan_delta(uri).select("id", "tokens").collect()
    assert sorted(frame["id"].to_list()) == want and frame.schema["tokens"] == pl.List(pl.List(pl.Int16))
    import os

    import duckdb_extension_delta  # the delta extension ships as a wheel matching the duckdb version

    ext = os.path.join(os.path.dirname(duckdb_extension_delta.__file__), "extensions", f"v{duckdb.__version__}",
                       "delta.duckdb_extension")
    con = duckdb.connect()
    con.execute(f"LOAD '{ext}'")
    got = sorted(r[0] for r in con.execute(f"select id from delta_scan('{uri}')").fetchall())
    assert got == want
    assert len(list((tmp_path / "data").glob("*.parquet"))) == 3  # what a glob reader would see

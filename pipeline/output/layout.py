"""Where everything lives under an output root (a directory or an s3:// prefix), and the dataset card.

    <root>/README.md        dataset card: Hugging Face `configs:` pointing at data/*.parquet
    <root>/summary.json     dataset statistics (pipeline/summary.py)
    <root>/_manifest.json   the configuration the dataset was built with (pipeline/manifest.py)
    <root>/_state/          the dedupe index's checkpoint (pipeline/ledger.py), outside the table root
    <root>/data/            the Delta table (pipeline/output/table.py): data files + `_delta_log/`
    <root>/_tmp/            in-progress files of a local output (hidden from readers: `_` prefix)
    <root>/_attempts/       crash-loop markers of a local output (consumer/crash_guard.py)

pyarrow, polars, duckdb and `datasets` skip names starting with `_` or `.`; `data/` never holds a
partial file, so every reader sees whole files only (a Delta reader: exactly the committed ones).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

DATA_DIR = "data"
SPOOL_DIR = "_tmp"
ATTEMPTS_DIR = "_attempts"
SUMMARY_NAME = "summary.json"
MANIFEST_NAME = "_manifest.json"
CARD_NAME = "README.md"
INPROGRESS_SUFFIX = ".parquet.inprogress"
PARQUET_SUFFIX = ".parquet"


def part_name(writer_id: str, seq: int, now: datetime | None = None) -> str:
    """`part-<utc time>-<writer>-<seq>.parquet`: unique per writer, sortable by time."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S")
    return f"part-{stamp}-{writer_id}-{seq:05d}{PARQUET_SUFFIX}"


def writer_of(name: str) -> str:
    """The writer id in a part name (in-progress or finalized); "" when it has none."""
    parts = name.split("-")
    return parts[2] if len(parts) >= 4 else ""


def dataset_card(schema: pa.Schema, location: str, data_files: list[str] | None = None, version: int | None = None) -> str:
    """README.md for the output root: `datasets.load_dataset(<root>)` reads data/*.parquet through
    its `configs:` (without it, the loader trips over summary.json), and people see the schema.

    `data_files` (names under data/): the files of table `version` instead of the glob, so a loader
    that cannot read the Delta log still reads one snapshot (`metavoice compact` writes it)."""
    rows = "\n".join(f"| `{f.name}` | `{f.type}` |" for f in schema)
    paths = "\n".join(f"    - {DATA_DIR}/{name}" for name in data_files) if data_files else f"    - {DATA_DIR}/*.parquet"
    snapshot = (f"\nThe `configs:` above name the files of table version {version} (`metavoice compact` rewrites "
                "this card): newer rows are in the Delta table, read it with a Delta reader.\n") if data_files else ""
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path:
{paths}
tags:
- audio
- speech
- metavoice-stream
---
# Speech dataset (Metavoice stream)

Written by [Metavoice stream](https://github.com/metavoice-stream) from audio uploads: one row per
audio object version, with its transcript, acoustic metadata and audio tokens. Files under `data/`
are complete Parquet files; new ones appear while the stream runs. `summary.json` holds the
dataset's statistics and `_manifest.json` the models it was built with.

Created {datetime.now(timezone.utc).isoformat(timespec="seconds")} at `{location}`.
{snapshot}
```python
import datasets
ds = datasets.load_dataset("{location}")          # the files `configs:` names; for s3:// pass storage_options
from deltalake import DeltaTable                   # the live table, or any older version (version=N)
DeltaTable("{location}/data").to_pyarrow_dataset()
```

| column | type |
|---|---|
{rows}
"""

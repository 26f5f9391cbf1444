"""What a finalized file's Parquet footer says about itself: the source offsets its epoch handled
and the aggregates of what it handled. Crash recovery and summary.json are rebuilt from footers
alone (a few KB each, read with ranged GETs in an object store), never from row data."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pyarrow.parquet as pq

from ..summary import Aggregates

META_OFFSETS = b"metavoice.offsets"
META_AGGREGATES = b"metavoice.aggregates"
META_WRITER = b"metavoice.writer"


@dataclass
class OffsetRange:
    """Source positions an epoch handled: every offset in [first, last] of one partition."""

    topic: str
    partition: int
    first: int
    last: int

    def to_dict(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "first": self.first, "last": self.last}


@dataclass
class FileFooter:
    """A finalized file as its footer describes it (`name` is its file name under data/)."""

    name: str
    rows: int
    offsets: list[OffsetRange]
    aggregates: Aggregates


def footer_metadata(offsets: list[OffsetRange], aggregates: Aggregates, writer_id: str) -> dict[bytes, bytes]:
    return {
        META_OFFSETS: orjson.dumps([r.to_dict() for r in offsets]),
        META_AGGREGATES: orjson.dumps(aggregates.to_state()),
        META_WRITER: writer_id.encode(),
    }


def parse_footer(name: str, md: pq.FileMetaData) -> FileFooter:
    kv = md.metadata or {}
    offsets = [OffsetRange(**d) for d in orjson.loads(kv.get(META_OFFSETS, b"[]"))]
    aggregates = Aggregates.from_state(orjson.loads(kv.get(META_AGGREGATES, b"{}")))
    return FileFooter(name, md.num_rows, offsets, aggregates)

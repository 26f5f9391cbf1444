"""What a finalized file's Parquet footer says about itself: the source offsets its epoch handled
and the aggregates of what it handled. The table commit that adds the file carries the same in
its commitInfo (pipeline/output/table.py), which is what recovery and summary.json read; the
footer keeps a file self-describing, and is what `metavoice migrate` reads in a 0.1 output.

A file also carries the dead letters of the records it covers (`PendingDeadLetter`, already
encoded) and where the dead-letter topic ended before they were sent (`dlq_marks`): they are
produced only after the file's commit is durable, and a restart that finds the table ahead of the
broker's commit reads the topic from the marks and sends the ones missing - one dead letter per
input, durable together with the rows (docs/guarantees.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import base64

import numpy as np
import orjson
import pyarrow.parquet as pq

from ..summary import Aggregates

META_OFFSETS = b"metavoice.offsets"
META_AGGREGATES = b"metavoice.aggregates"
META_WRITER = b"metavoice.writer"
META_DEAD_LETTERS = b"metavoice.dead_letters"
META_DLQ_MARKS = b"metavoice.dlq_marks"


@dataclass
class OffsetRange:
    """Source positions an epoch handled: every offset in [first, last] of one partition."""

    topic: str
    partition: int
    first: int
    last: int

    def to_dict(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "first": self.first, "last": self.last}


@dataclass(frozen=True)
class PendingDeadLetter:
    """One encoded DLQ message (`key`, `value`) for the input at (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes

    def to_dict(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "key": base64.b64encode(self.key).decode(), "value": base64.b64encode(self.value).decode()}

    @classmethod
    def from_dict(cls, d: dict) -> "PendingDeadLetter":
        return cls(d["topic"], d["partition"], d["offset"], base64.b64decode(d["key"]), base64.b64decode(d["value"]))


@dataclass
class FileFooter:
    """A finalized file as its footer describes it (`name` is its file name under data/)."""

    name: str
    rows: int
    offsets: list[OffsetRange]
    aggregates: Aggregates
    dead_letters: list[PendingDeadLetter] = field(default_factory=list)
    dlq_marks: dict[int, int] = field(default_factory=dict)  # DLQ partition -> an offset at or before its end then
    size: int = 0  # bytes of the file (its table Add action); a file of no row is never uploaded
    # the distinct object versions of its rows (records.version_hashes), known to the writer that
    # made it; None for a footer read back from a file (a migrate)
    versions: "np.ndarray | None" = None


def footer_metadata(offsets: list[OffsetRange], aggregates: Aggregates, writer_id: str,
                    dead_letters: list[PendingDeadLetter] = (), dlq_marks: dict[int, int] | None = None) -> dict[bytes, bytes]:
    md = {
        META_OFFSETS: orjson.dumps([r.to_dict() for r in offsets]),
        META_AGGREGATES: orjson.dumps(aggregates.to_state()),
        META_WRITER: writer_id.encode(),
    }
    if dead_letters:
        md[META_DEAD_LETTERS] = orjson.dumps([d.to_dict() for d in dead_letters])
        md[META_DLQ_MARKS] = orjson.dumps({str(p): o for p, o in (dlq_marks or {}).items()})
    return md


def parse_footer(name: str, md: pq.FileMetaData) -> FileFooter:
    kv = md.metadata or {}
    offsets = [OffsetRange(**d) for d in orjson.loads(kv.get(META_OFFSETS, b"[]"))]
    aggregates = Aggregates.from_state(orjson.loads(kv.get(META_AGGREGATES, b"{}")))
    dead_letters = [PendingDeadLetter.from_dict(d) for d in orjson.loads(kv.get(META_DEAD_LETTERS, b"[]"))]
    marks = {int(p): o for p, o in orjson.loads(kv.get(META_DLQ_MARKS, b"{}")).items()}
    return FileFooter(name, md.num_rows, offsets, aggregates, dead_letters, marks)

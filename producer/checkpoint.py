"""Backfill checkpoint: per prefix, the last key whose event Kafka acknowledged.

The file is rewritten atomically (temp file -> fsync -> rename -> fsync the directory) after
every acknowledged chunk, so a crash leaves either the previous or the next checkpoint, never
a torn one. A resumed run lists each unfinished prefix from `StartAfter=<last key>`; at most
the one chunk in flight at the crash is published again, which the consumer's
`(bucket, key, etag)` dedupe absorbs.

The run's parameters (bucket, suffix, time window) are stored too: resuming with other ones
would silently skip objects, so it is refused (`CheckpointMismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.durable import atomic_write_bytes

from .errors import CheckpointMismatch

VERSION = 1


@dataclass
class PrefixProgress:
    after: str | None = None  # last acknowledged (or filtered-out) key; listing resumes after it
    done: bool = False
    published: int = 0


class BackfillCheckpoint:
    def __init__(self, path: Path, params: dict[str, Any]) -> None:
        self.path = path
        self.params = params
        self.prefixes: dict[str, PrefixProgress] = {}

    @classmethod
    def load(cls, path: Path, params: dict[str, Any]) -> "BackfillCheckpoint":
        """The checkpoint at `path`, or a fresh one when the file does not exist yet."""
        ckpt = cls(path, params)
        if not path.exists():
            return ckpt
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise CheckpointMismatch(f"{path} is not a backfill checkpoint: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise CheckpointMismatch(f"{path} is not a version-{VERSION} backfill checkpoint")
        if doc.get("params") != params:
            raise CheckpointMismatch(
                f"{path} was written for {doc.get('params')}, this run is {params}: "
                "delete the file or choose another --checkpoint"
            )
        for prefix, p in (doc.get("prefixes") or {}).items():
            ckpt.prefixes[prefix] = PrefixProgress(p.get("after"), bool(p.get("done")), int(p.get("published", 0)))
        return ckpt

    def progress(self, prefix: str) -> PrefixProgress:
        return self.prefixes.setdefault(prefix, PrefixProgress())

    @property
    def published(self) -> int:
        return sum(p.published for p in self.prefixes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "params": self.params,
            "prefixes": {k: vars(v) for k, v in self.prefixes.items()},
        }

    def save(self) -> None:
        atomic_write_bytes(self.path, orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))

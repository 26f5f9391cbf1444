"""`_manifest.json`: what an output directory was built from, so runs never mix configurations.

A replay with a new Whisper model or tokenizer belongs in a new directory; writing it into an
old one would leave a dataset whose rows disagree. Mixing is refused unless forced.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import orjson

from .errors import OutputConfigMismatch
from .summary import atomic_write_bytes

MANIFEST_NAME = "_manifest.json"
CHECKED_KEYS = ("topic", "group", "whisper_model", "tokenizer")


def check_manifest(output_dir: Path, identity: dict[str, str], force: bool = False) -> dict:
    """Create the manifest, or verify that `identity` matches it; raise OutputConfigMismatch if not."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / MANIFEST_NAME
    if path.exists():
        existing = orjson.loads(path.read_bytes())
        diffs = {k: (existing.get(k), identity.get(k)) for k in CHECKED_KEYS if existing.get(k) != identity.get(k)}
        if not diffs:
            return existing
        if not force:
            detail = "; ".join(f"{k}: directory has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items())
            raise OutputConfigMismatch(
                f"{output_dir} was built with a different configuration ({detail}). "
                "Use a new --output directory for a reprocessing run, or --force to mix them."
            )
        history = existing.get("history", []) + [{k: existing.get(k) for k in CHECKED_KEYS}]
    else:
        history = []
    doc = {**identity, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "history": history}
    atomic_write_bytes(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return doc

"""`_manifest.json`: what an output was built from, so runs never mix configurations.

A replay with a new Whisper model or tokenizer belongs in a new output; writing it into an old
one would leave a dataset whose rows disagree. Mixing is refused unless forced. The manifest is
created once (create-only write) and changed only with --force (compare-and-swap), so consumers
starting together on different machines agree on it. The dataset card (README.md) is created
beside it the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import orjson

from .errors import OutputConfigMismatch
from .output import Output, as_output
from .output.layout import CARD_NAME, MANIFEST_NAME, dataset_card
from .records import SCHEMA

# An output written before segmentation and the analysis models has none of their keys: the first run with
# them finds a mismatch and needs --force (its rows would hold scores the older ones lack).
CHECKED_KEYS = ("topic", "group", "whisper_model", "tokenizer", "segmentation", "vad_model", "dnsmos_model",
                "speaker_model")


def check_manifest(output: Output | str | Path, identity: dict[str, str], force: bool = False) -> dict:
    """Create the manifest, or verify that `identity` matches it; raise OutputConfigMismatch if not."""
    output = as_output(output)

    def change(current: bytes | None) -> bytes | None:
        history = []
        if current is not None:
            existing = orjson.loads(current)
            diffs = {k: (existing.get(k), identity.get(k)) for k in CHECKED_KEYS if existing.get(k) != identity.get(k)}
            if not diffs:
                return None
            if not force:
                detail = "; ".join(f"{k}: the output has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items())
                raise OutputConfigMismatch(
                    f"{output.location} was built with a different configuration ({detail}). "
                    "Use a new --output for a reprocessing run, or --force to mix them."
                )
            history = existing.get("history", []) + [{k: existing.get(k) for k in CHECKED_KEYS}]
        doc = {**identity, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "history": history}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    doc = orjson.loads(output.update_doc(MANIFEST_NAME, change) or b"{}")
    output.update_doc(CARD_NAME, lambda cur: None if cur is not None else dataset_card(SCHEMA, output.location).encode())
    return doc

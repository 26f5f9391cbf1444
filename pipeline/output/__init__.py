"""Where the dataset is written: a local directory or an object-store prefix, behind one interface.

`open_output(settings)` picks the implementation from `output_dir` (`s3://bucket/prefix` or a
path); see store.py for the contract, layout.py for the names under the root.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from .footer import FileFooter, OffsetRange
from .layout import DATA_DIR, SUMMARY_NAME, MANIFEST_NAME, CARD_NAME
from .local import LocalOutput
from .store import Output
from .table import is_object_store

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Output", "LocalOutput", "FileFooter", "OffsetRange", "open_output", "as_output", "is_object_store",
           "DATA_DIR", "SUMMARY_NAME", "MANIFEST_NAME", "CARD_NAME"]


def open_output(location: str | Path, settings: "Settings | None" = None) -> Output:
    """The output at `location`; an s3:// one takes its endpoint and keys from `settings`
    (the output store's own, else the audio store's)."""
    if not is_object_store(location):
        return LocalOutput(location)
    from ..config import Settings
    from .s3 import S3Output, parse_s3_url
    from .table import conditional_put

    st = settings or Settings()
    bucket, prefix = parse_s3_url(str(location))
    spool = Path(st.spool_dir) if st.spool_dir else Path(".metavoice-spool") / _spool_name(bucket, prefix)
    return S3Output(str(location), spool=spool, client_kwargs=st.output_s3_client_kwargs(),
                    part_bytes=st.output_part_bytes, claim_ttl_s=st.output_claim_ttl_s,
                    retry_attempts=st.s3_retry_attempts, conditional_put=conditional_put(st))


def as_output(output: "Output | str | Path") -> Output:
    """An Output as is; a location opened (with settings from the environment)."""
    return output if isinstance(output, Output) else open_output(output)


def _spool_name(bucket: str, prefix: str) -> str:
    return f"{bucket}-{hashlib.blake2b(prefix.encode(), digest_size=4).hexdigest()}"

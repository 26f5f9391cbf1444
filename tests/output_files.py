"""Reading an output back in tests (a local directory, or an `Output` such as an S3 prefix)."""

from __future__ import annotations

from pathlib import Path

from pipeline.output import FileFooter, LocalOutput, Output, as_output
from pipeline.output.layout import INPROGRESS_SUFFIX

Where = Output | Path | str


def finalized_files(output_dir: Path | str) -> list[Path]:
    """A local output's finalized files as paths."""
    out = LocalOutput(output_dir)
    return [out.data_dir / name for name in out.finalized()]


def read_footer(path: Path) -> FileFooter:
    return LocalOutput(Path(path).parent.parent).read_footer(Path(path).name)


def inprogress_files(output: Where) -> list[Path]:
    """In-progress files: in the output's hidden spool, never under data/."""
    return sorted(as_output(output).spool.glob(f"*{INPROGRESS_SUFFIX}"))

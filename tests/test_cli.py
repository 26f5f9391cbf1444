"""The command line speaks plainly: one `metavoice` command (and the module commands it
gathers), and a bad setting stopped in one line naming it, before anything connects or loads.

The refusals run the real commands in child processes with the broker and the S3 endpoint
pointed at a listening socket that records connections: a command that got past its settings
would connect there (or load a model) and fail the time limit or the no-contact check.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError

from pipeline.cli_support import CliError, entry_point, setting_problems, settings_from
from pipeline.config import TOKENIZERS, Settings
from pipeline.errors import BucketMissing, OutputConfigMismatch
from pipeline.timeutil import parse_iso_time
from tests.test_producer_support import cli_logging  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
FAST_S = 5.0  # a refusal takes well under this; loading Whisper or waiting on a broker takes longer
COMMANDS = ("consume", "produce", "demo", "bench", "report", "summary", "compact", "migrate", "tokens")


# --- a listener that tells whether anything connected -------------------------------------------


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening port that accepts nothing: a client's connection waits in its backlog."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    sock.setblocking(False)
    yield sock
    sock.close()


def contacted(trap: socket.socket) -> bool:
    try:
        conn, _ = trap.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def run_cli(argv: list[str], trap: socket.socket, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python ARGV` with no METAVOICE_* from this environment but `env`, Kafka and S3 at the trap."""
    port = trap.getsockname()[1]
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METAVOICE_")},
        "PYTHONPATH": str(REPO),
        "METAVOICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "METAVOICE_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "METAVOICE_OUTPUT_DIR": str(tmp_path / "output"),
        **env,
    }
    started = time.monotonic()
    try:  # cwd: a directory without a .env file
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=child_env, capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv} did not stop at its settings: still running after 60 s\n{exc.stderr}") from None
    return done, time.monotonic() - started


def assert_refused_in_one_line(done: subprocess.CompletedProcess, took: float, trap: socket.socket,
                               name: str, *says: str) -> None:
    err = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert len(err) == 1, f"expected one line on stderr, got {len(err)}:\n{done.stderr[-3000:]}"
    assert err[0].startswith(f"error: {name}: "), err[0]
    for text in says:
        assert text in err[0], (text, err[0])
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert took < FAST_S, f"took {took:.1f}s to refuse a setting: it got past the settings"
    assert not contacted(trap), "the broker or S3 endpoint was contacted before the settings were checked"


# --- each bad setting, by environment variable and by flag ----------------------------------------

BAD_SETTINGS = [
    # (environment variable, flag, bad value, what the line says)
    ("METAVOICE_BATCH_MAX_EVENTS", "--batch-max-events", "abc", ["input should be a valid integer", "got 'abc'"]),
    ("METAVOICE_BATCH_MAX_EVENTS", "--batch-max-events", "0", ["must be >= 1", "got 0"]),
    ("METAVOICE_DEVICE", "--device", "gpu", ["must be 'auto', 'cpu' or 'cuda'", "got 'gpu'"]),
    ("METAVOICE_LOG_LEVEL", "--log-level", "verbose", ["'DEBUG'", "'INFO'", "'CRITICAL'", "got 'verbose'"]),
    ("METAVOICE_FROM_TIMESTAMP", "--from-timestamp", "yesterday", ["not ISO-8601", "got 'yesterday'"]),
    ("METAVOICE_TOKENIZER", "--tokenizer", "encodek", ["unknown tokenizer", "encodec", "got 'encodek'"]),
]


@pytest.mark.parametrize(("env", "flag", "value", "says"), BAD_SETTINGS, ids=[f"{b[1]}={b[2]}" for b in BAD_SETTINGS])
def test_a_bad_environment_variable_stops_the_consumer_in_one_line_before_it_connects(
    env, flag, value, says, trap, tmp_path
):
    done, took = run_cli(["-m", "consumer"], trap, tmp_path, **{env: value})
    assert_refused_in_one_line(done, took, trap, env, *says)


@pytest.mark.parametrize(("env", "flag", "value", "says"), BAD_SETTINGS, ids=[f"{b[1]}={b[2]}" for b in BAD_SETTINGS])
def test_a_bad_flag_stops_the_consumer_in_one_line_naming_the_flag(env, flag, value, says, trap, tmp_path):
    done, took = run_cli(["-m", "consumer", flag, value], trap, tmp_path)
    assert_refused_in_one_line(done, took, trap, flag, *says)


@pytest.mark.parametrize("argv", [
    ["-m", "metavoice", "consume"],
    ["-m", "producer", "create-topic"],
    ["-m", "metavoice", "produce", "backfill", "--bucket", "b"],
    ["-m", "metavoice", "demo"],
    ["-m", "metavoice", "bench", "--quick"],
    ["-m", "benchmark", "--quick"],
    ["-m", "metavoice", "summary", "."],
], ids=lambda argv: " ".join(argv[1:]))
def test_every_command_refuses_a_bad_setting_the_same_way(argv, trap, tmp_path):
    done, took = run_cli(argv, trap, tmp_path, METAVOICE_DEVICE="gpu")
    assert_refused_in_one_line(done, took, trap, "METAVOICE_DEVICE", "must be 'auto', 'cpu' or 'cuda', got 'gpu'")


def test_producer_and_metavoice_name_their_own_flags(trap, tmp_path):
    done, took = run_cli(["-m", "metavoice", "produce", "--partitions", "0", "create-topic"], trap, tmp_path)
    assert_refused_in_one_line(done, took, trap, "--partitions", "must be >= 1, got 0")
    done, took = run_cli(["-m", "producer", "webhook", "--max-body-bytes", "lots"], trap, tmp_path)
    assert_refused_in_one_line(done, took, trap, "--max-body-bytes", "input should be a valid integer, got 'lots'")
    done, took = run_cli(["-m", "metavoice", "demo", "--tokenizer", "dacc"], trap, tmp_path)
    assert_refused_in_one_line(done, took, trap, "--tokenizer", "unknown tokenizer", "got 'dacc'")


def test_a_bad_time_for_a_backfill_filter_is_one_line_too(trap, tmp_path):
    done, took = run_cli(["-m", "producer", "backfill", "--bucket", "b", "--modified-since", "last week"], trap, tmp_path)
    assert_refused_in_one_line(done, took, trap, "argument --modified-since", "not ISO-8601", "'last week'")


def test_an_unknown_flag_is_one_line_that_points_at_help(trap, tmp_path):
    done, took = run_cli(["-m", "consumer", "--batch-size", "3"], trap, tmp_path)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: unrecognized arguments: --batch-size 3 (see python -m consumer --help)"
    ], done.stderr
    assert took < FAST_S and not contacted(trap)


# --- the one command ----------------------------------------------------------------------------


def metavoice(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """What the `metavoice` console script runs: `sys.exit(metavoice.cli.main())` as `metavoice`."""
    code = "import sys; sys.argv[0] = 'metavoice'; from metavoice.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_the_console_script_is_metavoice_cli_main():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["metavoice"] == "metavoice.cli:main"


def test_metavoice_version_prints_the_installed_version():
    done = metavoice("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"metavoice {version('metavoice-stream')}"


def test_metavoice_help_lists_every_command():
    done = metavoice("--help")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^    ([a-z-]+)\s", done.stdout, re.M)
    assert listed == list(COMMANDS), done.stdout


@pytest.mark.parametrize(("argv", "usage", "flag"), [
    (["-m", "metavoice", "bench", "--help"], "usage: python -m metavoice bench", "--quick"),
    (["-m", "benchmark", "--help"], "usage: python -m benchmark", "--quick"),
    (["-m", "metavoice", "consume", "--help"], "usage: python -m metavoice consume", "--from-timestamp"),
    (["-m", "consumer", "--help"], "usage: python -m consumer", "--from-timestamp"),
    (["-m", "metavoice", "produce", "backfill", "--help"], "usage: python -m metavoice produce backfill", "--modified-since"),
    (["-m", "producer", "--help"], "usage: python -m producer", "create-topic"),
    (["-m", "metavoice", "tokens", "decode", "--help"], "usage: python -m metavoice tokens decode", "--parquet"),
    (["-m", "metavoice", "demo", "--help"], "usage: python -m metavoice demo", "--clips"),
], ids=lambda v: " ".join(v[1:]) if isinstance(v, list) else None)
def test_each_command_has_its_help(argv, usage, flag):
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage) and flag in done.stdout, done.stdout[:2000]


def test_a_flag_names_its_environment_variable_and_choices_in_help():
    done = subprocess.run([sys.executable, "-m", "consumer", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert "--device {auto,cpu,cuda}" in done.stdout and "(METAVOICE_BATCH_MAX_EVENTS)" in done.stdout
    assert "--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL}" in done.stdout


# --- a typed failure at the boundary: one line, exit 1, never a traceback -------------------------


@pytest.mark.slow  # the consumer loads its (small) models before it opens the output
def test_the_consumer_reports_an_output_built_otherwise_in_one_line(trap, tmp_path):
    from pipeline.manifest import check_manifest

    out = tmp_path / "output"
    check_manifest(str(out), {"topic": "r2-object-events", "group": "metavoice-consumer", "whisper_model": "large-v3",
                              "tokenizer": "dac"})
    done, _ = run_cli(["-m", "consumer", "--output", str(out), "--no-transcribe", "--no-prefect"], trap, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(errors) == 1 and "OutputConfigMismatch" in errors[0] and "'dac'" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not contacted(trap), "the output's manifest is checked before the broker is contacted"


def test_a_typed_error_in_a_producer_command_is_one_line_and_exit_1(monkeypatch, capsys, cli_logging):
    import producer.cli

    def missing(settings, args):
        raise BucketMissing("bucket 'audio' does not exist at http://127.0.0.1:9000")

    def grouped(settings, args):
        raise ExceptionGroup("tasks", [OutputConfigMismatch("first"), ExceptionGroup("inner", [BucketMissing("second")])])

    monkeypatch.setitem(producer.cli.COMMANDS, "create-topic", missing)
    assert producer.cli.main(["create-topic"]) == 1
    assert capsys.readouterr().err.splitlines()[-1:] == [
        "error: BucketMissing: bucket 'audio' does not exist at http://127.0.0.1:9000"
    ]
    monkeypatch.setitem(producer.cli.COMMANDS, "create-topic", grouped)
    assert producer.cli.main(["create-topic"]) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == ["error: OutputConfigMismatch: first", "error: BucketMissing: second"]


def test_an_untyped_bug_still_shows_its_traceback():
    @entry_point
    def broken() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        broken()


def test_a_missing_optional_dependency_names_the_extra(capsys):
    @entry_point
    def needs_torch() -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    assert needs_torch() == 1
    assert capsys.readouterr().err == "error: this command needs 'torch': pip install 'metavoice-stream[consumer]'\n"


# --- the settings themselves ---------------------------------------------------------------------


def test_settings_from_names_the_flag_for_a_flag_and_the_variable_for_the_environment(monkeypatch):
    monkeypatch.setenv("METAVOICE_ROLL_MAX_ROWS", "many")
    with pytest.raises(CliError) as caught:
        settings_from({"batch_max_events": "0"})
    assert str(caught.value) == "METAVOICE_ROLL_MAX_ROWS: input should be a valid integer, got 'many'"
    monkeypatch.delenv("METAVOICE_ROLL_MAX_ROWS")
    with pytest.raises(CliError) as caught:
        settings_from({"batch_max_events": "0", "pipeline_depth": "-2", "topic": None})
    assert str(caught.value).splitlines() == ["--batch-max-events: must be >= 1, got 0", "--pipeline-depth: must be >= 1, got -2"]
    assert settings_from({"batch_max_events": "7", "topic": None}).batch_max_events == 7


def test_a_secret_is_never_shown_in_a_settings_error():
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"webhook_token": 424242, "cf_api_token": ["x9y8z7"]})
    lines = setting_problems(caught.value)
    assert len(lines) == 2 and lines[0].startswith("METAVOICE_WEBHOOK_TOKEN: ")
    assert not any("424242" in line or "x9y8z7" in line for line in lines), lines


def test_log_level_takes_any_case_and_nothing_else():
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert Settings(log_level=" Warning ").log_level == "WARNING"
    with pytest.raises(ValidationError):
        Settings(log_level="verbose")


def test_a_tokenizer_is_a_known_family_or_family_and_checkpoint():
    assert Settings(tokenizer="encodec:facebook/encodec_24khz@12kbps").tokenizer.startswith("encodec:")
    with pytest.raises(ValidationError, match="unknown tokenizer"):
        Settings(tokenizer="snac")


def test_checking_the_tokenizer_imports_no_torch():
    code = ("import sys; from pipeline.config import Settings; Settings(tokenizer='dac'); "
            "assert 'torch' not in sys.modules and 'pipeline.tokenizers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_settings_know_every_tokenizer_the_registry_builds():
    from pipeline.tokenizers import available

    assert "synthetic" in available() and set(available()) <= set(TOKENIZERS)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    assert set(available()) == set(TOKENIZERS)


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-05-01", datetime(2024, 5, 1, tzinfo=timezone.utc)),
    ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
    (" 2024-05-01T12:00:00z ", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
    ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
    ("2024-05-01T12:00:00.250", datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)),
])
def test_one_iso_time_parser_reads_dates_zones_and_naive_times_as_utc(text, expected):
    t = parse_iso_time(text)
    assert t == expected and t.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["yesterday", "", "2024-13-01", "9999-12-31T23:00:00-05:00"])
def test_one_iso_time_parser_refuses_what_is_not_a_time(text):
    with pytest.raises(ValueError):
        parse_iso_time(text)


def test_from_timestamp_is_checked_with_the_settings_and_read_as_utc():
    assert Settings(from_timestamp="2024-05-01T14:00:00+02:00").from_timestamp_utc() == datetime(2024, 5, 1, 12,
                                                                                                  tzinfo=timezone.utc)
    assert Settings(from_timestamp=" ").from_timestamp is None
    with pytest.raises(ValidationError, match="from_timestamp"):
        Settings(from_timestamp="2024-05-01 noon")

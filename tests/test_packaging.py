"""The producers install and run without the processing stack.

A fresh virtual environment (no system site-packages) gets the project the way the producer image
does: `pip install -c deploy/constraints.txt .`, no extra, from a copy of the files the image build
sees, so the wheel, its metadata and its entry point are the real ones. There the producers'
commands must run while torch, faster-whisper, Prefect, ctranslate2, Arrow and NumPy are not
installed at all: a base dependency that drags one of them in, or a producer import chain that
needs one, fails here. About 30 s (a venv, then ~40 small wheels from the pip cache or the index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Distribution name -> module: none of them may be in the producers' install.
PROCESSING_STACK = {
    "torch": "torch",
    "faster-whisper": "faster_whisper",
    "ctranslate2": "ctranslate2",
    "prefect": "prefect",
    "pyarrow": "pyarrow",
    "numpy": "numpy",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "transformers": "transformers",
    "prometheus-client": "prometheus_client",
}
PRODUCER_COMMANDS = ("backfill", "r2-queue", "webhook", "create-topic")


def _copy_build_inputs(dest: Path) -> None:
    """pyproject.toml, the files it names and every package it installs, nothing generated."""
    project = PYPROJECT["project"]
    for name in ("pyproject.toml", project["readme"], *project.get("license-files", [])):
        shutil.copy2(ROOT / name, dest / name)
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for d in sorted(ROOT.iterdir()):
        if (d / "__init__.py").is_file() and any(re.fullmatch(p.replace("*", ".*"), d.name) for p in patterns):
            shutil.copytree(d, dest / d.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the source tree on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


@pytest.fixture(scope="module")
def producers_venv(tmp_path_factory) -> Path:
    """A venv holding the project's base install only; returns its python."""
    base = tmp_path_factory.mktemp("producers-install")
    src = base / "src"
    src.mkdir()
    _copy_build_inputs(src)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "-c", str(ROOT / "deploy" / "constraints.txt"), str(src)],
        capture_output=True, text=True, timeout=900, env=_clean_env(), cwd=base,
    )
    assert install.returncode == 0, f"pip install . failed:\n{install.stdout}\n{install.stderr}"
    # Nothing of the source tree may answer an import: the runs below happen in an empty directory.
    shutil.rmtree(src)
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=cwd)


def test_the_producers_install_holds_none_of_the_processing_stack(producers_venv, tmp_path):
    listed = _run(producers_venv, "-m", "pip", "list", "--format=json", "--disable-pip-version-check", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    installed = {re.sub(r"[-_.]+", "-", d["name"]).lower() for d in json.loads(listed.stdout)}
    assert "metavoice-stream" in installed
    assert not installed & set(PROCESSING_STACK), f"the base install brings {sorted(installed & set(PROCESSING_STACK))}"
    probe = f"import importlib.util; print([m for m in {sorted(PROCESSING_STACK.values())!r} if importlib.util.find_spec(m)])"
    found = _run(producers_venv, "-c", probe, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]", f"importable in the producers' install: {found.stdout.strip()}"


@pytest.mark.parametrize("command", PRODUCER_COMMANDS)
def test_every_producer_command_runs_in_the_producers_install(producers_venv, tmp_path, command):
    out = _run(producers_venv, "-m", "producer", command, "--help", cwd=tmp_path)
    assert out.returncode == 0, f"python -m producer {command} --help failed:\n{out.stderr}"
    assert "usage:" in out.stdout and command in out.stdout


def test_every_producer_module_imports_from_the_installed_wheel(producers_venv, tmp_path):
    modules = sorted(f"producer.{p.stem}" for p in (ROOT / "producer").glob("*.py") if p.stem != "__main__")
    probe = (
        f"import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"import producer\n"
        f"print(producer.__file__)\n"
        f"print([m for m in {sorted(PROCESSING_STACK.values())!r} if m in sys.modules])\n"
    )
    out = _run(producers_venv, "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, f"a producer module does not import in the producers' install:\n{out.stderr}"
    location, loaded = out.stdout.splitlines()
    assert "site-packages" in location, f"producer came from {location}, not the installed wheel"
    assert loaded == "[]"


def test_the_installed_distribution_carries_its_name_version_license_and_command(producers_venv, tmp_path):
    probe = (
        "import importlib.metadata as md, json\n"
        "d = md.distribution('metavoice-stream')\n"
        "print(json.dumps({'version': d.version, 'license': d.metadata.get('License-Expression'),\n"
        "  'license_files': [str(f) for f in d.files if 'licenses/' in str(f)],\n"
        "  'scripts': {e.name: e.value for e in d.entry_points if e.group == 'console_scripts'}}))\n"
    )
    out = _run(producers_venv, "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    assert meta["version"] == PYPROJECT["project"]["version"]
    assert meta["license"] == "Apache-2.0" and any(f.endswith("LICENSE") for f in meta["license_files"])
    assert meta["scripts"] == {"metavoice": "metavoice.cli:main"}
    assert (producers_venv.parent / "metavoice").is_file()


def test_the_metavoice_command_runs_in_the_producers_install(producers_venv, tmp_path):
    metavoice = producers_venv.parent / "metavoice"
    version = subprocess.run([str(metavoice), "--version"], capture_output=True, text=True, timeout=120,
                             env=_clean_env(), cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert PYPROJECT["project"]["version"] in version.stdout
    produce = subprocess.run([str(metavoice), "produce", "backfill", "--help"], capture_output=True, text=True,
                             timeout=120, env=_clean_env(), cwd=tmp_path)
    assert produce.returncode == 0, produce.stderr
    assert "usage:" in produce.stdout

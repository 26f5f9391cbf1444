"""The layout is a direction: a package imports only what sits below it.

    metavoice/   benchmark/    the tools: the `metavoice` command, demo, report, summary,
                               tokens, embedded services; the benchmark (above metavoice/)
         |
    consumer/    producer/     the two sides of the stream, which never import each other
         |
    broker/                    the one Kafka module both share
         |
    pipeline/                  the processing core: knows nothing of Kafka, of either side or of
                               the tools (pipeline/cli_support.py is the command lines' shared core)

Read with `ast` from every .py file, nothing imported or executed: `import x`, `from x import y`,
relative imports (resolved against the file's package), imports inside functions and
`importlib.import_module("x")` / `__import__("x")` with a literal name all count.

One exception, and it is lazy: `metavoice bench` (metavoice/cli.py) imports `benchmark.cli`
inside the function that runs it, so `metavoice` never loads the benchmark unless asked; at module
level metavoice/ imports no benchmark/.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the top-level packages it must not import
FORBIDDEN: dict[str, set[str]] = {
    "pipeline": {"consumer", "producer", "broker", "metavoice", "benchmark"},
    "broker": {"consumer", "producer", "metavoice", "benchmark"},
    "consumer": {"producer", "metavoice", "benchmark"},
    "producer": {"consumer", "metavoice", "benchmark"},
    "metavoice": {"benchmark"},
    "benchmark": set(),  # the top: it drives everything
}
PACKAGES = tuple(FORBIDDEN)
# (file, imported top-level package) allowed only inside a function: the `metavoice bench` dispatch.
LAZY_EXCEPTIONS = {("metavoice/cli.py", "benchmark")}
# What the command lines' shared core may import: it sits below consumer/ and producer/, and the
# producers' base install (no torch, no NumPy) runs it.
CLI_SUPPORT = "pipeline/cli_support.py"
CLI_SUPPORT_MAY_IMPORT = {"pipeline.config", "pipeline.errors", "pydantic"}
ABOVE_TOP = "<above top level>"


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, e.g. "pipeline/flows.py"
    line: int
    module: str  # absolute dotted name, e.g. "consumer.app"
    in_function: bool

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        where = " (inside a function)" if self.in_function else ""
        return f"{self.file}:{self.line} imports {self.module}{where}"


def module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _resolve(relative_to: Path, root: Path, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` in `relative_to`; one that climbs
    above its top-level package (an ImportError at run time) is named `<above top level>`."""
    package = module_name(relative_to, root)
    if relative_to.name != "__init__.py":
        package = package[:-1]
    if level > len(package):
        return ABOVE_TOP
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in one file, with the function scope it sits in."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(rel, node.lineno, a.name, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(path, root, node.level, node.module)
                if node.module is None:  # `from . import x`: x may be a module of the package
                    found.extend(Import(rel, node.lineno, f"{base}.{a.name}", in_function) for a in node.names)
                else:
                    found.append(Import(rel, node.lineno, base, in_function))
            else:
                found.append(Import(rel, node.lineno, node.module or "", in_function))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append(Import(rel, node.lineno, node.args[0].value, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def violations(root: Path) -> list[str]:
    """Every import against the direction, as `file:line imports module`."""
    out: list[str] = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for imp in imports_of(path, root):
                if imp.module.startswith(ABOVE_TOP):
                    out.append(f"{imp}: a relative import cannot leave {package}/")
                    continue
                if imp.top not in forbidden:
                    continue
                if (imp.file, imp.top) in LAZY_EXCEPTIONS and imp.in_function:
                    continue
                out.append(f"{imp}: {package}/ must not import {imp.top}/")
    cli_support = root / CLI_SUPPORT
    if cli_support.is_file():
        for imp in imports_of(cli_support, root):
            allowed = imp.top in sys.stdlib_module_names or imp.module == "__future__" or any(
                imp.module == m or imp.module.startswith(m + ".") for m in CLI_SUPPORT_MAY_IMPORT)
            if not allowed:
                out.append(f"{imp}: {CLI_SUPPORT} imports only {sorted(CLI_SUPPORT_MAY_IMPORT)} and the standard library")
    return out


# --- the repository ------------------------------------------------------------------------------


def test_every_import_follows_the_layout():
    found = violations(ROOT)
    assert not found, "imports against the layout (README.md, Layout):\n" + "\n".join(found)


def test_every_top_level_package_has_a_place_in_the_layout():
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests"}
    assert packages == set(PACKAGES), f"packages without a rule here: {sorted(packages - set(PACKAGES))}"


def test_the_scan_sees_every_module_of_every_package():
    """Sanity of the scanner itself: the imports the layout is built on are found."""
    seen = {(i.file, i.module) for p in PACKAGES for f in (ROOT / p).rglob("*.py") for i in imports_of(f, ROOT)}
    assert ("consumer/cli.py", "pipeline.cli_support") in seen
    assert ("producer/cli.py", "pipeline.cli_support") in seen
    assert ("metavoice/cli.py", "benchmark.cli") in seen  # the lazy dispatch, inside a function
    assert ("benchmark/cli.py", "pipeline.cli_support") in seen


def test_the_core_has_no_command():
    assert not (ROOT / "pipeline" / "__main__.py").exists(), "pipeline/ is the core: commands live in metavoice/"
    assert not (ROOT / "pipeline" / "bench").exists(), "the benchmark lives in benchmark/"


def test_metavoice_loads_the_benchmark_only_when_bench_is_called():
    lazy = [i for i in imports_of(ROOT / "metavoice" / "cli.py", ROOT) if i.top == "benchmark"]
    assert lazy and all(i.in_function for i in lazy), [str(i) for i in lazy]


# --- the check itself fails where it should --------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "says"), [
    ({"pipeline/flows.py": "from consumer.app import StreamConsumer\n"}, "pipeline/flows.py:1 imports consumer.app"),
    ({"pipeline/flows.py": "def f():\n    import broker.topics\n"}, "imports broker.topics (inside a function)"),
    ({"pipeline/output/s3.py": "from ...metavoice import cli\n"}, "a relative import cannot leave pipeline/"),
    ({"metavoice/report.py": "from . import samples\nfrom ..benchmark import x\n"}, "metavoice/report.py:2 imports"),
    ({"pipeline/x.py": "import importlib\nimportlib.import_module('producer.kafka')\n"}, "imports producer.kafka"),
    ({"broker/topics.py": "from consumer import app\n"}, "broker/ must not import consumer/"),
    ({"consumer/app.py": "from producer.kafka import event_publisher\n"}, "consumer/ must not import producer/"),
    ({"producer/cli.py": "async def f():\n    from consumer.cli import main\n"}, "producer/ must not import consumer/"),
    ({"metavoice/demo.py": "from benchmark import run\n"}, "metavoice/ must not import benchmark/"),
    ({"metavoice/cli.py": "from benchmark.cli import main\n"}, "metavoice/cli.py:1 imports benchmark.cli:"),
    ({"pipeline/cli_support.py": "import numpy\n"}, "pipeline/cli_support.py imports only"),
    ({"pipeline/cli_support.py": "from .storage import s3_client\n"}, "imports pipeline.storage"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_an_import_against_the_layout_is_found(tmp_path, files, says):
    found = violations(_tree(tmp_path, files))
    assert len(found) == 1 and says in found[0], found


def test_what_the_layout_allows_is_not_flagged(tmp_path):
    root = _tree(tmp_path, {
        "consumer/app.py": "from broker.topics import ensure_topics\nfrom pipeline.flows import x\nfrom . import batcher\n",
        "producer/cli.py": "from pipeline.cli_support import Parser\nfrom broker import topics\n",
        "metavoice/cli.py": "import consumer.cli\ndef bench():\n    from benchmark.cli import main\n",
        "metavoice/demo.py": "from consumer.app import StreamConsumer\nfrom producer.backfill import run_backfill\n",
        "benchmark/run.py": "from metavoice.samples import SampleClip\nfrom consumer.app import StreamConsumer\n",
        "pipeline/cli_support.py": "import argparse\nfrom pydantic import ValidationError\nfrom .config import Settings\n"
                                   "from .errors import PipelineError\n",
        "pipeline/output/store.py": "from ..errors import OutputWriteFailed\n",
    })
    assert violations(root) == []

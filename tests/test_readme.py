"""The README is the newcomer's contract: it must describe what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import Settings
from pipeline.records import SCHEMA

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    documented = set(re.findall(r"`(METAVOICE_[A-Z0-9_]+)`", README))
    missing = [f"METAVOICE_{n.upper()}" for n in Settings.model_fields if f"METAVOICE_{n.upper()}" not in documented]
    assert not missing, f"undocumented settings: {missing}"


def test_every_parquet_column_is_in_the_schema_table():
    for name in SCHEMA.names:
        assert f"`{name}`" in README, name


def test_the_two_commands_exist():
    root = Path(__file__).parent.parent
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert script in README and (root / script).exists()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()


# --- the layout table matches the tree ------------------------------------------------------------

ROOT = Path(__file__).parent.parent
PACKAGES = ("pipeline", "consumer", "producer", "broker", "metavoice", "benchmark")


def layout_entries() -> list[tuple[str, str]]:
    """(path, description) for each line of the "Layout" section's block; nesting by two spaces."""
    section = README.split("## Layout: where things happen", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    entries, parents = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"layout line not indented by twos: {line!r}"
        name, _, description = line.strip().partition(" ")
        assert name.endswith(("/", ".py")), f"a layout line names one package or one module first: {line!r}"
        assert description.strip() and not description.strip().split()[0].endswith(".py"), \
            f"one module per line, with what it does: {line!r}"
        depth = indent // 2
        assert depth <= len(parents), f"layout line nested under nothing: {line!r}"
        parents = parents[:depth]
        path = "".join(parents) + name
        entries.append((path, description.strip()))
        if name.endswith("/"):
            parents.append(name)
    return entries


def test_every_module_is_in_the_layout_table():
    listed = {path for path, _ in layout_entries()}
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES for p in (ROOT / package).rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    packages = sorted(
        p.parent.relative_to(ROOT).as_posix() + "/"
        for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")
    )
    missing = [m for m in packages + modules if m not in listed]
    assert not missing, f"not in README.md's layout table: {missing}"


def test_everything_the_layout_table_names_exists():
    entries = layout_entries()
    gone = [path for path, _ in entries if not (ROOT / path.rstrip("/")).exists()]
    assert not gone, f"README.md's layout table names what is not there: {gone}"
    paths = [path for path, _ in entries]
    assert len(paths) == len(set(paths)), f"listed twice: {sorted({p for p in paths if paths.count(p) > 1})}"

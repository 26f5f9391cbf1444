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

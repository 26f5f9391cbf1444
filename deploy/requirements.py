"""Requirement lists read from pyproject.toml, and the pinned constraints the images install with.

    python deploy/requirements.py                    the base install: what the producers need
    python deploy/requirements.py consumer codec     the base and those extras (an extra naming
                                                     the project itself, like dev, is followed)
    python deploy/requirements.py --freeze consumer codec > deploy/constraints.txt
        every distribution that list needs, transitively, pinned at the version installed in this
        environment (local labels like +cpu dropped: the Dockerfile picks torch's CUDA build)

The Dockerfile installs the printed list in a layer of its own (kept while only the code changes),
then the project with --no-deps; tests/test_packaging.py checks the constraints against
pyproject.toml. Listing needs only the standard library (it runs before anything is installed);
--freeze needs `packaging`, which any environment with pip-installed packages has.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """The normalized distribution name a requirement string starts with (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def requirements(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The base dependencies and those of `extras`, self-references (`name[a,b]`) expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own, optional = _name(project["name"]), project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has {', '.join(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            if _name(requirement) == own:
                todo += [e.strip() for e in re.search(r"\[(.*)\]", requirement).group(1).split(",")]
            elif requirement not in out:
                out.append(requirement)
    return out


def freeze(roots: list[str]) -> list[str]:
    """`name==version` for every installed distribution `roots` need, transitively, sorted."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = default_environment()

    def applies(requirement: Requirement, extra: str) -> bool:
        return requirement.marker is None or requirement.marker.evaluate({**environment, "extra": extra})

    pins: dict[str, str] = {}
    walked: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements are queued
    todo = [r for r in map(Requirement, roots) if applies(r, "")]
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed but not installed here: install the extras first") from None
        pins[name] = dist.version.split("+", 1)[0]
        for extra in ["", *sorted(requirement.extras)]:
            if (name, extra) not in walked:
                walked.add((name, extra))
                todo += [r for r in map(Requirement, dist.requires or []) if applies(r, extra)]
    return [f"{name}=={pins[name]}" for name in sorted(pins)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("extras", nargs="*", help="extras of pyproject.toml to add to the base dependencies")
    p.add_argument("--freeze", action="store_true", help="print pinned constraints (transitive) instead")
    args = p.parse_args(argv)
    listed = requirements(args.extras)
    if not args.freeze:
        print("\n".join(listed))
        return 0
    import platform

    print(
        f"# Pinned for the images: `python deploy/requirements.py --freeze {' '.join(args.extras)}`\n"
        f"# in the development environment scripts/install.sh sets up (Python {platform.python_version()}, {sys.platform},\n"
        f"# {platform.machine()}). Used as `pip install -c deploy/constraints.txt ...` by the Dockerfile;\n"
        "# tests/test_packaging.py checks every pin against pyproject.toml. torch is pinned without its\n"
        "# local label: the Dockerfile installs that version's CUDA 12 build from TORCH_INDEX."
    )
    print("\n".join(freeze(listed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

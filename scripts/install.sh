#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine (or a CI runner).
#   scripts/install.sh          system tools + the project with its dev extra
# System tools: espeak-ng and sox make the sample speech; flac and libsndfile read it; PostgreSQL
# (initdb, pg_ctl: Debian keeps them in /usr/lib/postgresql/<version>/bin) backs the real Prefect
# server of tests/test_prefect_outage.py, which initdb's a private cluster (the package's own is unused).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in espeak-ng sox flac; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
ldconfig -p 2>/dev/null | grep -q libsndfile || need_apt+=(libsndfile1)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build. The CPU wheel is
# enough for the demo and the tests; GPU images install a cu12 build instead (see Dockerfile).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e '.[dev]'
# Resemblyzer's weights without its dependencies (see pyproject.toml, consumer extra).
$PY -m pip install -q --no-deps "resemblyzer==0.1.4"

#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (unit + integration against a real
# broker and S3 server the tests start themselves). Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not slow"      the fast layer only
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"   # a private Prefect database per run
exec "${PYTHON:-python3}" -m pytest -p no:cacheprovider "$@"

#!/usr/bin/env bash
# One command from a fresh clone to a streamed dataset: installs, then runs the demo on
# embedded defaults (local Kafka-protocol broker, local S3 server, spoken sample clips).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${PYTHON:-python3}" -m metavoice demo "$@"

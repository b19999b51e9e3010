#!/usr/bin/env bash
# The main job, on a fresh machine: install emq-green into .venv and run the
# demo (emq-green --standalone, a local HTTP server, a batch of IO-bound jobs,
# progress, jobs/s and latency, clean stop).
#   bash scripts/demo.sh [--jobs N] [--concurrency J]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e .
exec .venv/bin/emq-green-demo "$@"

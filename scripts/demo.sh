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
# pip's notes (setuptools' build warnings, ignored index locations) are kept
# out of the output unless pip fails.
PIPLOG=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip \
       && .venv/bin/python -m pip install -q -e .; } >"$PIPLOG" 2>&1; then
  cat "$PIPLOG" >&2
  rm -f "$PIPLOG"
  echo "demo.sh: installing emq-green failed" >&2
  exit 1
fi
rm -f "$PIPLOG"
exec .venv/bin/emq-green-demo "$@"

#!/usr/bin/env bash
# The test command: sets everything up on a machine that has only Python and
# the package registries, then runs ruff and the test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's notes (setuptools' build warnings) are shown only when pip fails.
pip_quiet() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "test.sh: pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}
pip_quiet --upgrade pip
pip_quiet -e '.[test]'
# EventMQ 0.3.13 is a test-only interop peer. Its pinned dependencies do not
# build on current Python, so it is installed without them.
if ! .venv/bin/python -c "import eventmq" 2>/dev/null; then
  pip_quiet --no-deps eventmq==0.3.13
  pip_quiet six future croniter psutil pyzmq
fi
# EventMQ's emq-scheduler imports the redis client at start (and exits
# without it); no Redis server is needed: it logs that it cannot persist.
if ! .venv/bin/python -c "import redis" 2>/dev/null; then
  pip_quiet redis
fi
# The interop tests need that peer: without it the run fails here, it does
# not quietly drop them.
if ! .venv/bin/python -c "import eventmq"; then
  echo "test.sh: EventMQ 0.3.13 (the interop test peer) is not importable; not running" >&2
  exit 1
fi
# The dashboard's browser tests drive Debian's headless Chromium (no browser
# download). Installed here when missing and apt is there; otherwise those
# tests are skipped, with the reason listed by -rs.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
      --no-install-recommends chromium; } >/dev/null 2>&1 \
    || echo "test.sh: could not install chromium with apt-get; the browser tests will skip" >&2
fi
.venv/bin/ruff check emq_green tests scripts examples
# The whole suite in one pytest process, as users run it (testpaths = tests).
# -rs: every skipped test is listed with its reason.
.venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
# A run without chromium passes with the browser tests skipped: the last line
# says so, where nobody can miss it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "test.sh: passed, but WITHOUT the browser tests (chromium is not installed:" \
       "tests/test_dashboard_browser.py was skipped)"
fi

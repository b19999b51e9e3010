#!/usr/bin/env bash
# The documentation: sets up what it needs on a machine that has only Python
# and the package registries (reusing .venv when there is one), builds the
# HTML pages into docs/_build/html with warnings as errors and nitpicky
# cross-references, runs the code examples of the pages as doctests (against
# a real emq-green --standalone on loopback), and checks the built pages
# against the code (scripts/check_docs.py).
#   bash scripts/docs.sh [sphinx-build args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's notes (ignored index locations, the editable-install warning) are
# kept out of the output unless pip fails.
PIPLOG=$(mktemp)
trap 'rm -f "$PIPLOG"' EXIT
if ! { .venv/bin/python -m pip install -q --upgrade pip \
       && .venv/bin/python -m pip install -q -e . -r docs/requirements.txt; } >"$PIPLOG" 2>&1; then
  cat "$PIPLOG" >&2
  echo "docs.sh: installing what the docs need failed" >&2
  exit 1
fi
# Built from scratch each time: a page that did not change still shows its
# warnings.
rm -rf docs/_build
SPHINX=(.venv/bin/python -m sphinx -W --keep-going -n -q -d docs/_build/doctrees)
"${SPHINX[@]}" -b html docs docs/_build/html "$@"
"${SPHINX[@]}" -b doctest docs docs/_build/doctest "$@"
sed -n '/^Doctest summary/,$p' docs/_build/doctest/output.txt
.venv/bin/python scripts/check_docs.py docs/_build/html
echo "docs.sh: docs/_build/html/index.html"

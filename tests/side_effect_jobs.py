"""A job module whose import has a side effect: it creates the file named by
``$EMQ_SIDE_EFFECT_FILE``. A refused request must never import it."""

import os
from pathlib import Path

_path = os.environ.get("EMQ_SIDE_EFFECT_FILE")
if _path:
    Path(_path).write_text(f"imported by {os.getpid()}\n")


def run():
    return "ran"

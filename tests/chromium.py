"""Headless Chromium (Debian's ``chromium``) driven from the command line:
``--dump-dom`` for what the page shows after its scripts ran,
``--screenshot`` for a picture. No browser download: ``scripts/test.sh``
installs the Debian package when it is missing."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

#: flags that work on a closed network, as root, with no screen
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def executable() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, extra: list[str], budget_ms: int, timeout: float) -> str:
    exe = executable()
    assert exe is not None
    with tempfile.TemporaryDirectory(prefix="emq-chromium-") as profile:
        done = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             *extra, url],
            capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dom(url: str, budget_ms: int = 2500, timeout: float = 30.0) -> str:
    """The page's DOM once its scripts had ``budget_ms`` of (virtual) time."""
    return _run(url, ["--dump-dom"], budget_ms, timeout)


def screenshot(url: str, path: Path, size: str = "1000,1000", budget_ms: int = 2500,
               timeout: float = 30.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={path}", f"--window-size={size}"], budget_ms, timeout)
    assert path.exists() and path.stat().st_size > 1000, f"no screenshot at {path}"
    return path

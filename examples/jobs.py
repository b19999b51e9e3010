"""Sample IO-bound jobs for emq-green: what the demo, the benchmark and the
run-mode tests send.

The worker imports them by module path (``examples.jobs.fetch_page``), so the
directory holding ``examples/`` must be on the worker's ``PYTHONPATH`` (or be
its current directory). They use only the standard library; under emq-green
gevent has patched ``socket`` and ``time``, so a thousand of them wait on the
network or the clock at once in one process.

Completion is observed for real: :func:`fetch_page` reports to the demo's
HTTP server, :func:`mark` and :func:`sleep_and_mark` append one line to a
file with a single ``os.write`` on an ``O_APPEND`` descriptor, which keeps
lines whole when many greenlets or processes write at once.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from html.parser import HTMLParser


class _PageSummary(HTMLParser):
    """Title, word count and links of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.words = 0
        self.links: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        self.words += len(data.split())


def fetch_page(base_url: str, page: int, timeout: float = 10.0) -> dict:
    """Fetch ``/page/<page>``, summarise it, and post the summary to
    ``/done/<page>`` (errors included, so the demo sees every job end)."""
    summary: dict = {"page": page}
    try:
        with urllib.request.urlopen(f"{base_url}/page/{page}", timeout=timeout) as resp:
            page_bytes = resp.read()
            parser = _PageSummary()
            parser.feed(page_bytes.decode("utf-8", "replace"))
        summary.update(title=parser.title.strip(), words=parser.words,
                       links=len(parser.links), bytes=len(page_bytes))
    except Exception as exc:  # reported, then raised for the worker's log
        summary["error"] = f"{type(exc).__name__}: {exc}"
    body = json.dumps(summary).encode()
    req = urllib.request.Request(f"{base_url}/done/{page}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
    if "error" in summary:
        raise RuntimeError(summary["error"])
    return summary


def noop(*args: object) -> None:
    """Does nothing: for measuring the cost of a job's round trip."""


def mark(path: str, tag: str) -> str:
    """Append ``TAG PID UNIX_TIME`` to ``path``; returns the tag."""
    line = f"{tag} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return tag


def sleep_and_mark(seconds: float, path: str, tag: str) -> str:
    """``time.sleep(seconds)`` (an IO wait under gevent), then :func:`mark`."""
    time.sleep(seconds)
    return mark(path, tag)

"""The HTML pages shipped in the package (``web/``) and one HTTP answer:
what the router's dashboard and the worker's page both serve. Pages are
single self-contained files (no CDN, no build step)."""

from __future__ import annotations

from importlib import resources
from typing import Any


def page(name: str) -> bytes:
    """A page shipped in this package (``emq_green/web/NAME``)."""
    return resources.files(__package__).joinpath(name).read_bytes()


def answer(start_response: Any, status: str, body: bytes,
           content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    """A WSGI answer that no cache keeps (the figures change every second)."""
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


__all__ = ["answer", "page"]

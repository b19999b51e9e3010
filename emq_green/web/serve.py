"""Where the HTTP pages listen, and whom they answer: shared by the worker's
``--metrics-addr`` and the router's ``--dashboard-addr``.

Addresses. One parser for both (:func:`parse_http_addr`): ``PORT`` and
``:PORT`` mean loopback (``127.0.0.1``), never every interface; ``HOST:PORT``
binds ``HOST`` (``[::1]:PORT`` for IPv6). Binding a wildcard or another
non-loopback address works, with a WARNING (:func:`exposure_warning`): the
pages have no authentication.

Hosts. A web page anywhere can make a browser send requests to
``127.0.0.1:9300`` under a name it controls (DNS rebinding) and read the
answers. :class:`HostCheck` wraps a WSGI app and answers ``421 Misdirected
Request`` to any request whose ``Host`` header names something else than:
the bound address, ``localhost``, a loopback address, a name listed in
``http_allowed_hosts``, or, when bound to a wildcard address, an IP
address (a rebinding page always sends its own domain name). A request
without a ``Host`` header (HTTP/1.0 tools) is answered.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable, Optional

#: Connections a page server serves at once; more wait in the kernel's
#: accept queue (not in this process's file descriptors) until one ends.
MAX_CONNECTIONS = 64
#: Seconds a connection may stay silent (a request's headers not finished,
#: an idle keep-alive) before it is closed. Without both bounds a peer that
#: opens connections and never finishes a request held them for ever, and
#: took every file descriptor of the router or the worker (a probe: 20,000).
IDLE_TIMEOUT = 10.0


def page_server(host: str, port: int, app: Callable[..., Iterable[bytes]],
                error_log: Any) -> Any:
    """A ``gevent.pywsgi.WSGIServer`` for the pages, bounded as above (not
    started)."""
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class _Handler(WSGIHandler):
        def _handle_client_error(self, ex: BaseException) -> Any:
            if isinstance(ex, TimeoutError):  # silent too long: closed, not logged
                return ("408", _TIMED_OUT)  # (gevent printed a traceback for each)
            return super()._handle_client_error(ex)

    class _Server(WSGIServer):
        handler_class = _Handler

        def handle(self, sock: Any, address: Any) -> None:
            sock.settimeout(IDLE_TIMEOUT)
            try:
                super().handle(sock, address)
            except TimeoutError:  # before a request line, or between requests
                sock.close()

    return _Server((host, port), app, log=None, error_log=error_log,
                   spawn=Pool(MAX_CONNECTIONS))


_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")


#: host names that always mean this machine
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def parse_http_addr(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT`` (both loopback), ``HOST:PORT`` or ``[V6]:PORT``
    -> ``(host, port)``. Raises ValueError naming what is wrong."""
    text = text.strip()
    if text.isdigit():
        text = ":" + text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be PORT, :PORT (loopback) or HOST:PORT like 127.0.0.1:9100")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, what: str) -> Optional[str]:
    """The WARNING to log when ``what`` binds beyond loopback, else None."""
    if is_loopback(host):
        return None
    where = "every interface" if host in _WILDCARDS else host
    return (f"{what} listens on {where}: anyone who can reach it reads it (no "
            "authentication); bind it to 127.0.0.1 (PORT or :PORT) unless a firewall "
            "or a private network keeps it in")


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (port and brackets taken off), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    host, sep, port = header.rpartition(":")
    return host if sep and port.isdigit() else header


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """A WSGI app answering only requests addressed to us (see the module text).

    ``bound``: the host the server is bound to; ``names``: more host names
    (the ``http_allowed_hosts`` setting).
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], bound: str,
                 names: Iterable[str] = ()) -> None:
        self.app = app
        self.wildcard = bound in _WILDCARDS
        self.allowed = frozenset({*LOOPBACK_NAMES, bound.lower(),
                                  *(n.strip().lower() for n in names)}) - {""}
        #: requests refused for their Host header
        self.refused = 0

    def allows(self, header: Optional[str]) -> bool:
        if header is None:
            return True
        host = _host_of(header)
        if host in self.allowed:
            return True
        return (self.wildcard or is_loopback(host)) and _is_ip(host)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if self.allows(environ.get("HTTP_HOST")):
            return self.app(environ, start_response)
        self.refused += 1
        body = b"misdirected request: this server answers only to its own address\n"
        start_response("421 Misdirected Request", [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]


__all__ = ["HostCheck", "IDLE_TIMEOUT", "LOOPBACK_NAMES", "MAX_CONNECTIONS", "exposure_warning",
           "is_loopback", "page_server", "parse_http_addr"]

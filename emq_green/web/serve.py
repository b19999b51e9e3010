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
import logging
import socket
from typing import Any, Callable, Iterable, Optional

from ..limits import LogLimiter
from ..protocol import printable

#: Connections a page server serves at once; more wait in the kernel's
#: accept queue (not in this process's file descriptors) until one ends.
MAX_CONNECTIONS = 128
#: Seconds a connection may take to send a whole request's line and
#: headers, counted from when the server starts waiting for it (an idle
#: keep-alive included), before it is closed. Without that bound a peer
#: that opens connections and never finishes a request held them for ever,
#: and took every file descriptor of the router or the worker (a probe:
#: 20,000); one that sent a byte a second held them too (slowloris: the
#: bound was per read), and 64 such connections kept Prometheus out.
IDLE_TIMEOUT = 5.0
#: characters of a client's bad request a log line shows
ERROR_PREVIEW = 200


def page_server(host: str, port: int, app: Callable[..., Iterable[bytes]],
                error_log: Any) -> Any:
    """A ``gevent.pywsgi.WSGIServer`` for the pages, bounded as above (not
    started)."""
    import gevent
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIHandler, WSGIServer

    # a client's bad requests: one line each, cut short and escaped, at most
    # LOG_BURST per window (a probe's flood of 8,000 NUL bytes per request
    # wrote 742 MB of ERROR lines in 10 s)
    limiter = LogLimiter(error_log if isinstance(error_log, logging.Logger)
                         else logging.getLogger(__name__),
                         summary="%d more bad HTTP request(s) not logged one by one: %s")

    class _Handler(WSGIHandler):
        _deadline: Any = None

        def handle_one_request(self) -> Any:
            limiter.flush()  # the summary of bad requests, once its window is over
            # the whole request line and headers within IDLE_TIMEOUT
            self._deadline = gevent.Timeout(IDLE_TIMEOUT, TimeoutError)
            self._deadline.start()
            try:
                return super().handle_one_request()
            finally:
                self._deadline.close()

        def read_request(self, raw_requestline: Any) -> Any:
            try:
                read = super().read_request(raw_requestline)
            finally:
                self._deadline.cancel()  # the answer takes the time it takes
            if read and (self.content_length or "transfer-encoding" in self.headers):
                # the pages take no body: 400, closed unread (gevent read what
                # was left of one after the answer, a byte a second for ever)
                return False
            return read

        def _handle_client_error(self, ex: BaseException) -> Any:
            if isinstance(ex, TimeoutError):  # silent too long: closed, not logged
                return ("408", _TIMED_OUT)  # (gevent printed a traceback for each)
            return super()._handle_client_error(ex)

        def log_error(self, msg: str, *args: Any) -> None:
            try:
                text = msg % args if args else msg
            except Exception:
                text = f"{msg!r} {args!r}"
            limiter.warning("bad_request", "HTTP: %s", printable(text, ERROR_PREVIEW))

    class _Server(WSGIServer):
        handler_class = _Handler

        def handle(self, sock: Any, address: Any) -> None:
            sock.settimeout(IDLE_TIMEOUT)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # headers and body leave in two sends: without it Nagle's
                # algorithm held the body for the client's delayed ACK, 40 ms
                # a request on a kept-alive connection
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                super().handle(sock, address)
            except TimeoutError:  # before a request line, or between requests
                sock.close()

    return _Server((host, port), _plain_http(app), log=None, error_log=error_log,
                   spawn=Pool(MAX_CONNECTIONS))


def _plain_http(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """``app``, whose answers to HEAD keep their headers and lose their body
    (it went out after the headers, and a kept-alive client read it as the
    next answer), and which reads a request in absolute form (``GET
    http://host:port/metrics``, as ``curl --proxy`` sends it) as its path,
    with that host as its ``Host`` (it was a 404)."""
    def serve(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(("http://", "https://")):
            netloc, _, rest = path.partition("://")[2].partition("/")
            environ["PATH_INFO"], environ["HTTP_HOST"] = "/" + rest, netloc
        result = app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "HEAD":
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()
        return []  # the Content-Length the page set stays (every page sets one)

    return serve


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
        host, _, rest = header[1:].partition("]")
        # "[::1]evil" is no address of ours: the whole header, refused
        return host if not rest or (rest[0] == ":" and rest[1:].isdigit()) else header
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

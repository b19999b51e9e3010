"""eMQP/1.0 as EventMQ 0.3.13 puts it on the wire.

Every message is ``['', 'eMQP/1.0', COMMAND, MSGID, *body]``; a ROUTER socket
adds the peer identity in front. Messages are small immutable values: build
them with :meth:`Message.new`, read them with :meth:`Message.parse`, put them
on a socket with :meth:`Message.frames`.

Two quirks of the released code are kept on purpose: REPLY from a worker is
``[reply_json, orig_msgid]`` (reply first), and a leaving worker says ``KBYE``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from .limits import (
    MAX_INFORM_QUEUES,
    MAX_INFORM_TEXT,
    MAX_QUEUE_NAME_BYTES,
    MAX_QUEUE_WEIGHT,
    frames_preview,
)

PROTOCOL_VERSION = "eMQP/1.0"
_VERSION_FRAME = PROTOCOL_VERSION.encode()
#: the body of the KBYE an emq-green worker sends when it stops or reloads:
#: emq-green's router answers it with a KBYE once it has let the worker go,
#: so the worker knows that no REQUEST follows (EventMQ's router ignores the
#: body, and answers nothing)
KBYE_LEAVING = "leaving"
#: the second body frame of ``HEARTBEAT [time, "flush"]`` a client sends on
#: the router's frontend (it is no scheduler's HEARTBEAT): emq-green's router
#: answers ``HEARTBEAT [time, "flush", msgid]`` when it reads it, so every
#: request the client sent before it on that socket has been read
#: (:mod:`emq_green.client.flush`); EventMQ's router ignores it
CLIENT_FLUSH = "flush"


class ProtocolError(ValueError):
    """A frame sequence or field that is not valid eMQP/1.0."""


class Command(str, Enum):
    """Every command EventMQ 0.3.13 sends or accepts."""

    INFORM = "INFORM"
    ACK = "ACK"
    READY = "READY"
    REQUEST = "REQUEST"
    REPLY = "REPLY"
    HEARTBEAT = "HEARTBEAT"
    KBYE = "KBYE"
    DISCONNECT = "DISCONNECT"
    SCHEDULE = "SCHEDULE"
    UNSCHEDULE = "UNSCHEDULE"
    STATUS = "STATUS"
    ROUTER_SHOW_WORKERS = "ROUTER_SHOW_WORKERS"
    ROUTER_SHOW_SCHEDULERS = "ROUTER_SHOW_SCHEDULERS"


_COMMANDS = {c.value.encode(): c for c in Command}
_COMMAND_FRAMES = {c: frame for frame, c in _COMMANDS.items()}


def new_msgid() -> str:
    """A fresh message id in uuid4 text form: 122 random bits (the other 6
    are uuid4's version and variant), unguessable.

    A msgid names a job's result: whoever knows a pending one could try to
    take its place, so ids are not derived from a counter or a per-process
    prefix. ``uuid.uuid4()`` costs about 2.7 us (a system call per id);
    here ``os.urandom`` is read :data:`_ID_BLOCK` ids at a time and each id
    is cut from the hex of that block: about 0.57 us, against 0.24 us for the
    old counter (two ids per job; docs/benchmarks.md). Safe across threads:
    every call takes a distinct index of a counter (atomic in CPython), so no
    two calls cut the same place of the same block.
    """
    block, offset = divmod(next(_id_counter), _ID_BLOCK)
    text, current = _id_block
    if current != block:
        text = _fill_id_block(block)
    at = offset * 32
    h = text[at:at + 32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: ids cut from one read of os.urandom
_ID_BLOCK = 512
# uuid4 layout over a whole block: the version nibble 4 and the variant bits 10
_ID_MASK = int.from_bytes((0xFFFFFFFF_FFFF_0FFF_3FFF_FFFFFFFFFFFF).to_bytes(16, "big")
                          * _ID_BLOCK, "big")
_ID_BITS = int.from_bytes((0x00000000_0000_4000_8000_000000000000).to_bytes(16, "big")
                          * _ID_BLOCK, "big")
_id_counter = itertools.count()
_id_block: tuple[str, int] = ("", -1)


def _fill_id_block(block: int) -> str:
    global _id_block
    bits = int.from_bytes(os.urandom(16 * _ID_BLOCK), "big") & _ID_MASK | _ID_BITS
    text = bits.to_bytes(16 * _ID_BLOCK, "big").hex()
    _id_block = (text, block)
    return text


def _forget_id_block() -> None:
    """In a forked child: never cut ids from the parent's random bytes."""
    global _id_block
    _id_block = ("", -1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_id_block)


def worker_process(identity: bytes) -> Optional[bytes]:
    """``name:pid`` of an emq-green worker's socket identity
    (``name:pid:count-random``, one per connection of one process), else
    None: the connections of one process are told apart from another's."""
    head, sep, tail = identity.rpartition(b":")
    count, dash, random = tail.partition(b"-")
    if not (sep and dash and count.isdigit() and len(random) == 8 and b":" in head):
        return None
    return head


def same_worker(identity: bytes, other: bytes) -> bool:
    """Whether two socket identities are one emq-green worker process's
    (that process reconnected: its REPLYs for jobs handed to the first
    come under the second)."""
    process = worker_process(identity)
    return process is not None and process == worker_process(other)


def printable(text: object, limit: int = 120) -> str:
    """Peer-supplied text made safe for a log line: control and other
    non-printable characters escaped (``\\n``, ``\\x1b``), bytes shown
    escaped, at most ``limit`` characters kept."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: limit * 4]).decode("utf-8", "backslashreplace")
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


_new_tuple = tuple.__new__
#: a frame's text (strict UTF-8, as ``frame.decode()``)
_utf8 = bytes.decode


def _decode(frame: bytes, what: str) -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8: {frame[:40]!r}") from exc


class Message(NamedTuple):
    """One eMQP/1.0 message without the envelope (identity, '', version).

    A named tuple rather than a frozen dataclass: the worker builds three
    per job, and a tuple is built in a third of the time.
    """

    command: Command
    msgid: str
    body: tuple[str, ...] = ()

    @classmethod
    def new(cls, command: Command, *body: str) -> Message:
        return cls(command, new_msgid(), body)

    @classmethod
    def parse(cls, frames: Sequence[bytes]) -> Message:
        """Read ``['', version, COMMAND, MSGID, *body]`` (no identity frame).

        Raises :class:`ProtocolError` naming what is wrong.
        """
        if len(frames) < 4:
            # never the repr of whole frames: one of 16 MiB was a 67 MB string
            raise ProtocolError(f"expected at least 4 frames, got {frames_preview(frames)}")
        if frames[0] != b"":
            raise ProtocolError(f"first frame must be empty, got {frames[0][:40]!r}")
        if frames[1] != _VERSION_FRAME:
            raise ProtocolError(f"unsupported protocol version {frames[1][:40]!r}")
        command = _COMMANDS.get(frames[2]) or _COMMANDS.get(frames[2].upper())
        if command is None:
            raise ProtocolError(f"unknown command {frames[2][:40]!r}")
        try:
            return cls(command, frames[3].decode(), tuple([f.decode() for f in frames[4:]]))
        except UnicodeDecodeError:
            _decode(frames[3], "message id")
            for f in frames[4:]:
                _decode(f, "body frame")
            raise  # not reached: one of the frames above is not UTF-8

    @classmethod
    def parse_routed(cls, frames: Sequence[bytes]) -> tuple[bytes, Message]:
        """``(identity, message)`` of what a ROUTER socket received:
        ``[identity, '', version, COMMAND, MSGID, *body]``. The router's path
        for every message (one call, no copy of the frames); anything not
        well-formed goes through :func:`split_identity` and :meth:`parse`,
        which raise :class:`ProtocolError` naming the fault."""
        if len(frames) > 4 and not frames[1] and frames[2] == _VERSION_FRAME:
            command = _COMMANDS.get(frames[3])
            if command is not None:
                try:
                    # the tuple built directly (no call of the named tuple's
                    # __new__), the frames decoded in C: this runs per message
                    return frames[0], _new_tuple(cls, (
                        command, frames[4].decode(),
                        tuple(map(_utf8, frames[5:])) if len(frames) > 5 else ()))
                except UnicodeDecodeError:
                    pass
        identity, rest = split_identity(frames)
        return identity, cls.parse(rest)

    def frames(self) -> list[bytes]:
        return [b"", _VERSION_FRAME, _COMMAND_FRAMES[self.command], self.msgid.encode(),
                *[part.encode() for part in self.body]]


def request_parts(frames: Sequence[bytes]) -> Optional[tuple[str, tuple[str, str, str]]]:
    """``(msgid, (queue, headers, payload))`` of a well-formed REQUEST, or
    None for anything else (which :meth:`Message.parse` then reads, or
    rejects with the reason). The worker's path for the one message it
    gets per job, without building a :class:`Message`."""
    if len(frames) != 7 or frames[2] != b"REQUEST" or frames[1] != _VERSION_FRAME or frames[0]:
        return None
    try:
        return frames[3].decode(), (frames[4].decode(), frames[5].decode(), frames[6].decode())
    except UnicodeDecodeError:
        return None


def ready_frames(msgid: Optional[str] = None) -> list[bytes]:
    """A READY (sent once per job). Its msgid is new, or that of the job
    sent without reply-requested whose end it offers (``msgid``): EventMQ's
    router reads no READY's msgid; emq-green's ends exactly that job, where
    it would otherwise take the worker's oldest such job as the one ended."""
    return [b"", _VERSION_FRAME, b"READY", (msgid or new_msgid()).encode()]


def ack_frames(identity: bytes, msgid: str) -> list[bytes]:
    """A router's acknowledgement ``REPLY [msgid]`` to ``identity`` (a ROUTER
    socket's frames, the identity first)."""
    return [identity, b"", _VERSION_FRAME, b"REPLY", new_msgid().encode(), msgid.encode()]


def relayed_reply_frames(identity: bytes, reply_json: str, orig_msgid: str,
                         msgid: Optional[str] = None) -> list[bytes]:
    """A worker's REPLY relayed to the client ``identity`` that asked for the
    result: ``REPLY [reply_json, orig_msgid]`` (a ROUTER socket's frames).
    ``msgid``: the REPLY's own id (the worker's, relayed as it is); default
    a new one."""
    return [identity, b"", _VERSION_FRAME, b"REPLY", (msgid or new_msgid()).encode(),
            reply_json.encode(), orig_msgid.encode()]


def request_frames(identity: bytes, msgid: str, body: Sequence[str]) -> list[bytes]:
    """A REQUEST to ``identity`` (a ROUTER socket's frames, the identity first)."""
    if len(body) == 3:  # [queue, headers, payload]: the router's path, once per job
        return [identity, b"", _VERSION_FRAME, b"REQUEST", msgid.encode(), body[0].encode(),
                body[1].encode(), body[2].encode()]
    return [identity, b"", _VERSION_FRAME, b"REQUEST", msgid.encode(),
            *[part.encode() for part in body]]


def reply_frames(reply_json: str, orig_msgid: str) -> list[bytes]:
    """A new REPLY from a worker: ``[reply_json, orig_msgid]``."""
    return [b"", _VERSION_FRAME, b"REPLY", new_msgid().encode(), reply_json.encode(),
            orig_msgid.encode()]


def split_identity(frames: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """Split what a ROUTER socket received into (identity, message frames)."""
    if not frames:
        raise ProtocolError("empty message")
    return frames[0], list(frames[1:])


# ---------------------------------------------------------------------------
# REQUEST bodies

@dataclass(frozen=True)
class Headers:
    """The ``headers_csv`` frame of a REQUEST.

    ``timeout`` is None when the header is absent or 0 (EventMQ then falls
    back to ``global_timeout``). Unknown headers are kept in ``extra``.
    """

    reply_requested: bool = False
    guarantee: bool = False
    retry_count: int = 0
    timeout: Optional[float] = None
    extra: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Headers:
        """Read a header text; raises :class:`ProtocolError` on a bad value.

        Senders use a handful of distinct texts, so results are cached (the
        objects are immutable)."""
        headers = _HEADERS_SEEN.get(text)
        if headers is None:
            if len(text) > MAX_HEADERS_CHARS:  # a second of splitting, and the cache's memory
                raise ProtocolError(f"bad headers: {len(text)} characters, at most "
                                    f"{MAX_HEADERS_CHARS}")
            headers = cls._parse(text)
            if len(_HEADERS_SEEN) >= _HEADERS_SEEN_MAX:
                _HEADERS_SEEN.clear()
            _HEADERS_SEEN[text] = headers
        return headers

    @classmethod
    def _parse(cls, text: str) -> Headers:
        reply = guarantee = False
        retry = 0
        timeout: Optional[float] = None
        extra: list[str] = []
        for item in (h.strip() for h in text.split(",")):
            if not item:
                continue
            name, _, value = item.partition(":")
            try:
                if name == "reply-requested":
                    reply = True
                elif name == "guarantee":
                    guarantee = True
                elif name == "retry-count":
                    retry = int(value)
                    if not 0 <= retry <= MAX_RETRY_COUNT:
                        raise ValueError(f"must be 0 to {MAX_RETRY_COUNT}")
                elif name == "timeout":
                    timeout = float(value)
                    if not 0 <= timeout < math.inf:  # NaN fails this too
                        raise ValueError("must be a finite number of seconds, 0 or more")
                    timeout = timeout or None
                else:
                    extra.append(item)
            except ValueError as exc:
                raise ProtocolError(f"bad header {_short(item)}: {exc}") from exc
        return cls(reply, guarantee, retry, timeout, tuple(extra))

    def text(self) -> str:
        parts: list[str] = []
        if self.reply_requested:
            parts.append("reply-requested")
        if self.guarantee:
            parts.append("guarantee")
        if self.retry_count > 0:
            parts.append(f"retry-count:{self.retry_count}")
        if self.timeout:
            parts.append(f"timeout:{self.timeout:g}")
        parts.extend(self.extra)
        return ",".join(parts)


#: the largest ``retry-count`` a REQUEST may ask for; more is an invalid request
MAX_RETRY_COUNT = 100


def check_job_options(retry_count: Any, timeout: Any, queue: Any = None) -> None:
    """The client's check of a job's options a worker would refuse (and,
    with no reply asked, drop with nothing said to the caller: a probe).
    Raises TypeError or ValueError naming the argument."""
    if isinstance(retry_count, bool) or not isinstance(retry_count, int):
        raise TypeError(f"retry_count must be an int, not {type(retry_count).__name__}")
    if not 0 <= retry_count <= MAX_RETRY_COUNT:
        raise ValueError(f"retry_count must be 0 to {MAX_RETRY_COUNT}, not {retry_count}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 <= timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds, 0 or more (0: the "
                         f"worker's global_timeout), not {timeout!r}")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise TypeError(f"queue must be a non-empty str, not {queue!r:.40}")

#: the longest headers frame a REQUEST may have (EventMQ's are a few dozen
#: characters); longer is an invalid request
MAX_HEADERS_CHARS = 64 * 1024

_HEADERS_SEEN: dict[str, Headers] = {}
_HEADERS_SEEN_MAX = 512


#: the REQUEST header asking emq-green's router to send the job's result back
#: to the client (an emq-green extension; EventMQ's router ignores it)
RESULT_HEADER = "result-requested"


def _has_header(headers_csv: str, name: str) -> bool:
    # senders use a handful of distinct header texts: the answers are kept
    # (bounded like Headers.parse's), as splitting costs a microsecond
    key = (headers_csv, name)
    found = _HAS_SEEN.get(key)
    if found is None:
        # any(h.strip() == name for h in ...split(",")), iterated in C
        found = headers_csv == name or name in map(str.strip, headers_csv.split(","))
        if len(_HAS_SEEN) >= _HEADERS_SEEN_MAX:
            _HAS_SEEN.clear()
        _HAS_SEEN[key] = found
    return found


_HAS_SEEN: dict[tuple[str, str], bool] = {}


def result_requested_in(headers_csv: str) -> bool:
    """Whether a REQUEST's header text asks for the result."""
    return RESULT_HEADER in headers_csv and _has_header(headers_csv, RESULT_HEADER)


def guarantee_in(headers_csv: str) -> bool:
    """Whether a REQUEST's header text carries ``guarantee`` (run at least once)."""
    return "guarantee" in headers_csv and _has_header(headers_csv, "guarantee")


def with_reply_requested(headers_csv: str) -> str:
    """The header text with ``reply-requested`` added (unchanged if present)."""
    if reply_requested_in(headers_csv):
        return headers_csv
    return f"{headers_csv},reply-requested" if headers_csv.strip() else "reply-requested"


def reply_requested_in(text: str) -> bool:
    """Whether a (possibly malformed) header text asks for a reply."""
    return "reply-requested" in text and _has_header(text, "reply-requested")


#: the default ``kwargs`` and ``class_kwargs``: empty and read-only
NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


_tuple_new = tuple.__new__  # a named tuple built without its __new__'s Python frame
_scan_once = json.JSONDecoder().scan_once


def _loads(text: str) -> Any:
    """``json.loads`` for a str, without its two whitespace regex matches
    when the text is plain JSON (the C scanner reads one value from offset
    0); anything else goes to json.loads, which also words the error."""
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


class RunRequest(NamedTuple):
    """The options of a ``["run", {...}]`` payload (a named tuple: one is
    built per job)."""

    path: str
    callable: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = NO_KWARGS
    class_args: tuple[Any, ...] = ()
    class_kwargs: Mapping[str, Any] = NO_KWARGS
    subprocess: bool = False

    @property
    def name(self) -> str:
        """``path.callable``, the name used in logs, metrics and settings."""
        return f"{self.path}.{self.callable}"

    @classmethod
    def parse(cls, payload_json: str) -> RunRequest:
        try:
            payload = _loads(payload_json)
        except ValueError as exc:
            raise ProtocolError(f"payload is not JSON: {exc}") from exc
        except RecursionError:
            raise ProtocolError("payload is nested too deeply") from None
        if type(payload) is not list or len(payload) != 2 or type(payload[1]) is not dict:
            raise ProtocolError('payload must be ["run", {options}]')
        if payload[0] != "run":
            raise ProtocolError(f"unknown subcommand {_short(payload[0])}")
        # Every value here is JSON's (a str is a str, an array a list, an
        # object a dict; never a subclass), so exact type tests decide what
        # isinstance would, and key tests replace dict.get: no call per
        # option, this runs per job. An option that is absent, or empty
        # (or any false value), takes its default.
        opts = payload[1]
        path = opts["path"] if "path" in opts else None
        name = opts["callable"] if "callable" in opts else None
        if type(path) is not str or not path or type(name) is not str or not name:
            raise ProtocolError("options need non-empty 'path' and 'callable' strings")
        args = opts["args"] if "args" in opts else None
        class_args = opts["class_args"] if "class_args" in opts else None
        if (args and type(args) is not list) or (class_args and type(class_args) is not list):
            raise ProtocolError("'args' and 'class_args' must be lists")
        kwargs = opts["kwargs"] if "kwargs" in opts else None
        class_kwargs = opts["class_kwargs"] if "class_kwargs" in opts else None
        if (kwargs and type(kwargs) is not dict) or (
                class_kwargs and type(class_kwargs) is not dict):
            raise ProtocolError("'kwargs' and 'class_kwargs' must be objects")
        return _tuple_new(cls, (path, name, tuple(args) if args else (), kwargs or NO_KWARGS,
                                tuple(class_args) if class_args else (),
                                class_kwargs or NO_KWARGS,
                                bool(opts["subprocess"]) if "subprocess" in opts else False))

    def payload(self) -> str:
        opts: dict[str, Any] = {
            "callable": self.callable,
            "path": self.path,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "class_args": list(self.class_args),
            "class_kwargs": dict(self.class_kwargs),
        }
        if self.subprocess:
            opts["subprocess"] = True
        return json.dumps(["run", opts])


def heartbeat() -> Message:
    """A new HEARTBEAT carrying the sender's clock, as EventMQ sends it."""
    return Message.new(Command.HEARTBEAT, f"{time.time():.6f}")


Queues = tuple[tuple[int, str], ...]


def parse_queues(text: str) -> Queues:
    """Read ``[[weight, name], ...]`` JSON (an INFORM's ``queues_json``, the
    ``queues`` setting); ``[name, weight]`` pairs are accepted too, as
    EventMQ's settings allow. Raises :class:`ProtocolError` naming the fault.

    At most :data:`~emq_green.limits.MAX_INFORM_QUEUES` pairs, each name at
    most :data:`~emq_green.limits.MAX_QUEUE_NAME_BYTES` bytes; a text too long
    to hold a valid list is refused before it is parsed (one INFORM of
    200,000 names held the router's loop for seconds)."""
    if len(text) > MAX_INFORM_TEXT:
        raise ProtocolError(f"queues text of {len(text)} characters is longer than any "
                            f"list of {MAX_INFORM_QUEUES} queues")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"queues are not JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError("queues are nested too deeply") from None
    return queue_pairs(raw)


def queue_pairs(raw: Any) -> Queues:
    """``[[weight, name], ...]`` (lists or tuples) as a tuple of pairs."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ProtocolError('queues must be a non-empty list like [[10, "default"]]')
    if len(raw) > MAX_INFORM_QUEUES:
        raise ProtocolError(f"{len(raw)} queues; at most {MAX_INFORM_QUEUES} are accepted")
    queues = []
    for item in raw:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ProtocolError(f"queue entry {_short(item)} is not a [weight, name] pair")
        weight, name = item
        if isinstance(weight, str) and not isinstance(name, str):
            weight, name = name, weight
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise ProtocolError(f"queue entry {_short(item)}: the name is not a string")
        name = str(name)
        if len(name) > MAX_QUEUE_NAME_BYTES // 4 and \
                len(name.encode("utf-8", "surrogatepass")) > MAX_QUEUE_NAME_BYTES:
            raise ProtocolError(f"queue name {_short(name)} is longer than "
                                f"{MAX_QUEUE_NAME_BYTES} bytes")
        try:
            number = int(weight)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"queue entry {_short(item)}: {exc}") from exc
        if not -MAX_QUEUE_WEIGHT <= number <= MAX_QUEUE_WEIGHT:
            raise ProtocolError(f"queue entry {_short(item)}: the weight is beyond "
                                f"{MAX_QUEUE_WEIGHT:,} either way")
        queues.append((number, name))
    return tuple(queues)


def _short(value: Any) -> str:
    """At most a short prefix of a peer's value, for an error text."""
    text = repr(value) if not isinstance(value, str) else repr(value[:80])
    return text[:80] + ("..." if len(text) > 80 else "")


_QUEUE_SEPARATORS = re.compile(r"[,\s]+")
#: spaces around a weight's colon (``a: 20``, ``a :20``) belong to no name
_AROUND_COLON = re.compile(r"\s*:\s*")


def queue_names(items: Sequence[str], default_weight: int) -> Queues:
    """Queue names as the command line gives them: ``name`` or
    ``name:weight``, each item possibly comma- or space-separated (``a,b:20``,
    ``"a b:20"``: one argument quoted in a unit file, ``-Q "$QUEUES"``).

    Text that opens with ``[`` is the JSON ``[[weight, name], ...]`` of the
    INI's ``queues`` (``-Q '[[10, "default"]]'``), read as such, not cut at
    its commas into names such as ``[[10``; the shell may have split it
    into several items."""
    if items and items[0].lstrip().startswith("["):
        return parse_queues(" ".join(items))
    queues = []
    for item in items:
        for part in _QUEUE_SEPARATORS.split(_AROUND_COLON.sub(":", item)):
            if not part:
                continue
            name, sep, weight = part.partition(":")
            if not name:
                raise ProtocolError(f"empty queue name in {item!r}")
            if any(c in name for c in '[]"'):
                raise ProtocolError(f"queue name {name!r} in {item!r} looks like a piece "
                                    'of JSON; give names (a b:20) or [[10, "a"], ...] whole')
            try:
                queues.append((int(weight) if sep else default_weight, name))
            except ValueError as exc:
                raise ProtocolError(f"bad weight in {part!r}: {exc}") from exc
    if not queues:
        raise ProtocolError("no queue names given")
    return queue_pairs(queues)


def queues_json(queues: Sequence[tuple[int, str]]) -> str:
    return json.dumps([[w, n] for w, n in queues])

"""eMQP/1.0 as EventMQ 0.3.13 puts it on the wire.

Every message is ``['', 'eMQP/1.0', COMMAND, MSGID, *body]``; a ROUTER socket
adds the peer identity in front. Messages are small immutable values: build
them with :meth:`Message.new`, read them with :meth:`Message.parse`, put them
on a socket with :meth:`Message.frames`.

Two quirks of the released code are kept on purpose: REPLY from a worker is
``[reply_json, orig_msgid]`` (reply first), and a leaving worker says ``KBYE``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence

PROTOCOL_VERSION = "eMQP/1.0"
_VERSION_FRAME = PROTOCOL_VERSION.encode()


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
    """A fresh message id in uuid4 form, as EventMQ makes them.

    Ids need to be unique, not secret, so they come from ``random`` (about
    twice as fast as ``uuid.uuid4()``, which reads the OS's entropy source
    for every id); ``random`` is re-seeded in a forked child.
    """
    h = f"{_bits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_bits = random.getrandbits
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _decode(frame: bytes, what: str) -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8: {frame[:40]!r}") from exc


@dataclass(frozen=True)
class Message:
    """One eMQP/1.0 message without the envelope (identity, '', version)."""

    command: Command
    msgid: str
    body: tuple[str, ...] = ()

    @classmethod
    def new(cls, command: Command, *body: str) -> Message:
        return cls(command, new_msgid(), tuple(body))

    @classmethod
    def parse(cls, frames: Sequence[bytes]) -> Message:
        """Read ``['', version, COMMAND, MSGID, *body]`` (no identity frame).

        Raises :class:`ProtocolError` naming what is wrong.
        """
        if len(frames) < 4:
            raise ProtocolError(f"expected at least 4 frames, got {len(frames)}: {list(frames)!r}")
        if frames[0] != b"":
            raise ProtocolError(f"first frame must be empty, got {frames[0][:40]!r}")
        if frames[1] != _VERSION_FRAME:
            raise ProtocolError(f"unsupported protocol version {frames[1][:40]!r}")
        command = _COMMANDS.get(frames[2].upper())
        if command is None:
            raise ProtocolError(f"unknown command {frames[2][:40]!r}")
        msgid = _decode(frames[3], "message id")
        body = tuple(_decode(f, "body frame") for f in frames[4:])
        return cls(command, msgid, body)

    def frames(self) -> list[bytes]:
        return [b"", _VERSION_FRAME, _COMMAND_FRAMES[self.command], self.msgid.encode(),
                *[part.encode() for part in self.body]]


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
                    retry = max(0, int(value))
                elif name == "timeout":
                    timeout = float(value) or None
                    if timeout is not None and timeout < 0:
                        raise ValueError("negative")
                else:
                    extra.append(item)
            except ValueError as exc:
                raise ProtocolError(f"bad header {item!r}: {exc}") from exc
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


def reply_requested_in(text: str) -> bool:
    """Whether a (possibly malformed) header text asks for a reply."""
    return any(h.strip() == "reply-requested" for h in text.split(","))


@dataclass(frozen=True)
class RunRequest:
    """The options of a ``["run", {...}]`` payload."""

    path: str
    callable: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_args: tuple[Any, ...] = ()
    class_kwargs: dict[str, Any] = field(default_factory=dict)
    subprocess: bool = False

    @property
    def name(self) -> str:
        """``path.callable``, the name used in logs, metrics and settings."""
        return f"{self.path}.{self.callable}"

    @classmethod
    def parse(cls, payload_json: str) -> RunRequest:
        try:
            payload = json.loads(payload_json)
        except ValueError as exc:
            raise ProtocolError(f"payload is not JSON: {exc}") from exc
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not isinstance(payload[1], dict)
        ):
            raise ProtocolError('payload must be ["run", {options}]')
        if payload[0] != "run":
            raise ProtocolError(f"unknown subcommand {payload[0]!r}")
        opts = payload[1]
        path, name = opts.get("path"), opts.get("callable")
        if not isinstance(path, str) or not path or not isinstance(name, str) or not name:
            raise ProtocolError("options need non-empty 'path' and 'callable' strings")
        args, kwargs = opts.get("args") or (), opts.get("kwargs") or {}
        class_args, class_kwargs = opts.get("class_args") or (), opts.get("class_kwargs") or {}
        if not isinstance(args, (list, tuple)) or not isinstance(class_args, (list, tuple)):
            raise ProtocolError("'args' and 'class_args' must be lists")
        if not isinstance(kwargs, dict) or not isinstance(class_kwargs, dict):
            raise ProtocolError("'kwargs' and 'class_kwargs' must be objects")
        return cls(
            path=path,
            callable=name,
            args=tuple(args),
            kwargs=kwargs,
            class_args=tuple(class_args),
            class_kwargs=class_kwargs,
            subprocess=bool(opts.get("subprocess", False)),
        )

    def payload(self) -> str:
        opts: dict[str, Any] = {
            "callable": self.callable,
            "path": self.path,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "class_args": list(self.class_args),
            "class_kwargs": self.class_kwargs,
        }
        if self.subprocess:
            opts["subprocess"] = True
        return json.dumps(["run", opts])


def parse_queues(text: str) -> tuple[tuple[int, str], ...]:
    """Read the ``queues_json`` of an INFORM: ``[[weight, name], ...]``."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"queues are not JSON: {exc}") from exc
    try:
        return tuple((int(w), str(n)) for w, n in raw)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"queues must be [[weight, name], ...], got {text!r}") from exc


def queues_json(queues: Sequence[tuple[int, str]]) -> str:
    return json.dumps([[w, n] for w, n in queues])

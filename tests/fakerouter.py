"""A small eMQP/1.0 router for tests: a real ROUTER socket on loopback.

It runs in the test's own gevent hub (``zmq.green``), records every message
a worker sends with its arrival time, answers INFORM with ACK (unless told
not to), can send HEARTBEATs, and lets a test send REQUESTs and wait for
what comes back, each wait bounded by a deadline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gevent
import gevent.event
import zmq.green as zmq

from emq_green.protocol import Command, Message, RunRequest


@dataclass(frozen=True)
class Received:
    identity: bytes
    message: Message
    at: float

    @property
    def command(self) -> Command:
        return self.message.command


class FakeRouter:
    def __init__(
        self,
        *,
        auto_ack: bool = True,
        heartbeat_interval: Optional[float] = None,
        addr: str = "tcp://127.0.0.1:0",
    ) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.bind(addr)
        self.addr = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.auto_ack = auto_ack
        self.received: list[Received] = []
        self.raw: list[list[bytes]] = []
        self.identities: list[bytes] = []  # in INFORM order
        self._changed = gevent.event.Event()
        self._reader = gevent.spawn(self._read)
        self._interval = heartbeat_interval
        self._beater = (
            gevent.spawn(self._beat, heartbeat_interval) if heartbeat_interval else None
        )
        self.closed = False

    # -- background greenlets ------------------------------------------------
    def _read(self) -> None:
        while True:
            frames = self.socket.recv_multipart()
            now = time.monotonic()
            self.raw.append(frames)
            msg = Message.parse(frames[1:])
            self.received.append(Received(frames[0], msg, now))
            if msg.command is Command.INFORM:
                if frames[0] not in self.identities:
                    self.identities.append(frames[0])
                if self.auto_ack:
                    try:
                        self.send(frames[0], Command.ACK, msg.msgid)
                    except zmq.ZMQError:
                        # a peer gone again at once (another test's worker that
                        # reconnects to a port this one reuses): this reader
                        # died with it, and no later message was recorded
                        pass
            self._changed.set()
            self._changed.clear()

    def _beat(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            for identity in list(self.identities):
                try:
                    self.send(identity, Command.HEARTBEAT, f"{time.time():.3f}")
                except zmq.ZMQError:
                    pass

    # -- sending --------------------------------------------------------------
    def send(self, identity: bytes, command: Command, *body: str) -> str:
        msg = Message.new(command, *body)
        self.socket.send_multipart([identity, *msg.frames()])
        return msg.msgid

    def send_raw(self, identity: bytes, frames: list[bytes]) -> None:
        self.socket.send_multipart([identity, *frames])

    def request(
        self,
        identity: bytes,
        path: str,
        name: str,
        *,
        args: Any = (),
        kwargs: Optional[dict] = None,
        headers: str = "",
        queue: str = "default",
        **options: Any,
    ) -> str:
        req = RunRequest(path=path, callable=name, args=tuple(args), kwargs=kwargs or {},
                         class_args=tuple(options.pop("class_args", ())),
                         class_kwargs=options.pop("class_kwargs", {}),
                         subprocess=options.pop("subprocess", False))
        assert not options, options
        return self.send(identity, Command.REQUEST, queue, headers, req.payload())

    # -- waiting --------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            self._changed.wait(min(left, 0.1))

    def messages(self, command: Optional[Command] = None,
                 identity: Optional[bytes] = None) -> list[Received]:
        return [r for r in self.received
                if (command is None or r.command is command)
                and (identity is None or r.identity == identity)]

    def count(self, command: Command, identity: Optional[bytes] = None) -> int:
        return len(self.messages(command, identity))

    def wait_count(self, command: Command, n: int, timeout: float = 10.0,
                   identity: Optional[bytes] = None) -> list[Received]:
        self.wait_until(lambda: self.count(command, identity) >= n, timeout)
        return self.messages(command, identity)

    def wait_inform(self, timeout: float = 10.0, index: int = 0) -> bytes:
        self.wait_until(lambda: len(self.identities) > index, timeout)
        return self.identities[index]

    def replies(self) -> dict[str, Any]:
        """orig_msgid -> decoded reply document."""
        return {r.message.body[1]: json.loads(r.message.body[0])
                for r in self.messages(Command.REPLY)}

    def wait_reply(self, msgid: str, timeout: float = 10.0) -> Any:
        return self.wait_until(lambda: self.replies().get(msgid), timeout)

    def longest_silence(self, identity: bytes, since: float, until: float) -> float:
        """Longest gap between messages from ``identity`` in [since, until]."""
        times = [since] + [r.at for r in self.received
                           if r.identity == identity and since <= r.at <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:]))

    def fall_silent(self) -> None:
        """Act dead while still listening: no more HEARTBEAT, no ACK. The
        worker's messages are still recorded, so a test sees where it goes."""
        self.auto_ack = False
        if self._beater is not None:
            self._beater.kill()
            self._beater = None

    def wake_up(self) -> None:
        """Undo :meth:`fall_silent`."""
        self.auto_ack = True
        if self._beater is None and self._interval:
            self._beater = gevent.spawn(self._beat, self._interval)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reader.kill()
        if self._beater is not None:
            self._beater.kill()
        self.socket.close(linger=0)

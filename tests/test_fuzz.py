"""Property-based tests: random and mutated frames thrown at a real worker and
a real router over loopback. Whatever arrives, the worker's READY count
stays exact (one READY back per REQUEST it was sent) and a valid job still
runs; the router keeps routing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hardening import REPLY, Credit, settled
from test_router import Harness, make_router  # noqa: F401 (fixture)

from emq_green.jobmanager import State
from emq_green.protocol import Command, ProtocolError, RunRequest, queue_names

JOBS = "jobs_for_tests"
VALID = [b"", b"eMQP/1.0", b"REQUEST", b"msgid", b"default", REPLY.encode(),
         RunRequest(path=JOBS, callable="add", args=(1, 2)).payload().encode()]

numbers = st.sampled_from(["nan", "inf", "-inf", "1e999", "-1", "0", "0.5", "1e-300", "x",
                           "9" * 400, "", "1_000", " 3 ", "٣"])
header_items = st.one_of(
    st.sampled_from(["reply-requested", "guarantee", "", " ", ",", "timeout", "retry-count",
                     "result-requested", " result-requested "]),
    numbers.map(lambda n: f"timeout:{n}"),
    st.one_of(numbers, st.integers(-5, 200).map(str)).map(lambda n: f"retry-count:{n}"),
    st.text(max_size=12),
)
headers = st.lists(header_items, max_size=5).map(",".join)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)
names = st.sampled_from([(JOBS, "add"), (JOBS, "echo"), (JOBS, "boom"), (JOBS, "nap"),
                         (JOBS, "wait_gate"), ("os", "system"), ("os", "_exit"),
                         (f"{JOBS}:Greeter", "greet"), ("no_such_module", "f"), ("", ""),
                         ("builtins", "eval"), (JOBS, "__class__")])


@st.composite
def payloads(draw) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        depth = draw(st.integers(900, 5000))
        return ("[" * depth + "]" * depth).encode()
    path, name = draw(names)
    options = {"path": path, "callable": name, "args": draw(st.lists(json_values, max_size=3)),
               "kwargs": draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))}
    if draw(st.booleans()):
        options[draw(st.sampled_from(["class_args", "class_kwargs", "subprocess", "x"]))] = \
            draw(json_values)
    return json.dumps([draw(st.sampled_from(["run", "RUN", "stop"])), options]).encode()


@st.composite
def mutated_requests(draw) -> list[bytes]:
    frames = list(VALID)
    frames[3] = draw(st.one_of(st.binary(min_size=1, max_size=16),
                               st.text(min_size=1, max_size=16).map(str.encode)))
    frames[5] = draw(headers).encode()
    frames[6] = draw(payloads())
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add", "utf8"]))
        at = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "replace" and frames:
            frames[at] = draw(st.binary(max_size=24))
        elif op == "drop" and frames:
            del frames[at]
        elif op == "add":
            frames.insert(at, draw(st.binary(max_size=24)))
        elif op == "utf8" and frames:
            frames[at] = frames[at] + b"\xc3\x28"
    return frames


other_messages = st.lists(
    st.one_of(st.binary(max_size=24),
              st.sampled_from([b"", b"eMQP/1.0", b"HEARTBEAT", b"ACK", b"READY", b"REPLY",
                               b"INFORM", b"STATUS", b"SCHEDULE"])),
    max_size=8)


@st.composite
def worker_replies(draw) -> list[bytes]:
    """REPLYs a worker could send: any msgid, any number of body frames,
    some naming a msgid the storm used (so the result relay has to act)."""
    frame = st.one_of(st.binary(max_size=24),
                      st.sampled_from([b"msgid", b"null", b'{"value": 1}', b"\xc3\x28"]))
    return [b"", b"eMQP/1.0", b"REPLY", draw(frame), *draw(st.lists(frame, max_size=4))]


def is_request(frames: list[bytes]) -> bool:
    """What costs the router a slot: anything it sent as a REQUEST."""
    return len(frames) > 2 and frames[2].upper() == b"REQUEST"


@pytest.mark.timeout(300)
def test_random_and_mutated_frames_never_cost_the_worker_a_slot(router, make_manager):
    # Hypothesis draws its examples in this greenlet, holding the loop the
    # fake router shares with the worker: on a busy machine for longer than
    # the fast heartbeats' dead-router limit (1.5 s), and the worker then
    # reconnected. This test is about frames: the limit is 15 s here.
    manager = make_manager(concurrent_jobs=3, global_timeout=5, heartbeat_timeout=5.0,
                           allowed_callables=(f"{JOBS}.add", f"{JOBS}.echo", f"{JOBS}.boom",
                                              f"{JOBS}:Greeter.greet"))
    ident = router.wait_inform()
    credit = Credit(router, ident)

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.one_of(mutated_requests(), other_messages))
    def throw(frames: list[bytes]) -> None:
        if is_request(frames):
            credit.wait()
        router.send_raw(ident, frames)
        assert manager.state is State.RUNNING

    throw()
    # three slots at start, one back per REQUEST; a last job proves none is owed
    settled(router, manager, 3 + credit.sent)
    assert manager.counters["connections"] == 1 and manager.state is State.RUNNING
    assert manager.counters["invalid_requests"] + manager.counters["refused"] > 0


@pytest.mark.timeout(300)
def test_random_frames_on_every_socket_leave_the_router_routing(make_router):  # noqa: F811
    h: Harness = make_router(hwm=1000)
    client = h.peer("frontend")
    stranger = h.peer("backend")
    worker = h.worker(slots=0)
    admin = h.peer("administrative")
    peers = {"frontend": client, "backend": stranger, "worker": worker, "admin": admin}

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(sorted(peers)),
           st.one_of(mutated_requests(), other_messages, worker_replies(),
                     st.sampled_from([VALID[:2] + [b"DISCONNECT", b"m"],
                                      VALID[:2] + [b"KBYE", b"m"]])))
    def throw(peer: str, frames: list[bytes]) -> None:
        if peer == "admin" and len(frames) > 2 and frames[2].upper() == b"DISCONNECT":
            return  # the one message that is meant to stop it
        if not frames:
            frames = [b""]
        peers[peer].sock.send_multipart(frames)

    throw()
    # the router answers, and a worker that joins now gets a client's job
    status = h.admin(Command.STATUS)
    assert "waiting_messages_by_queue" in status
    fresh = h.worker(slots=0)
    sent = client.send(Command.REQUEST, "default", "", VALID[6].decode())
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the client's job never reached a worker"
        fresh.send(Command.READY)  # buffered requests from the storm go first
        got = fresh.recv(timeout=5)
        if got.command is Command.REQUEST and got.msgid == sent.msgid:
            break
    # and results still come back to a client that asks for one
    asked = client.send(Command.REQUEST, "default", "reply-requested,result-requested",
                        VALID[6].decode())
    while True:
        assert time.monotonic() < deadline, "the result-requested job never reached a worker"
        fresh.send(Command.READY)
        got = fresh.recv(timeout=5)
        if got.command is Command.REQUEST and got.msgid == asked.msgid:
            break
    fresh.send(Command.REPLY, '{"value": 3}', asked.msgid)
    while True:
        assert time.monotonic() < deadline, "the result never came back"
        answer = client.recv(timeout=5)
        if answer.command is Command.REPLY and answer.body == ('{"value": 3}', asked.msgid):
            break


@pytest.mark.timeout(60)
@given(headers)
@settings(max_examples=400, deadline=None)
def test_header_flags_read_each_name_exactly(text):
    """The router's header checks (iterated in C for speed) say what a plain
    reading of the comma-separated names says, for whatever header text."""
    from emq_green.protocol import guarantee_in, reply_requested_in, result_requested_in

    names = [h.strip() for h in text.split(",")]
    assert guarantee_in(text) == ("guarantee" in names)
    assert reply_requested_in(text) == ("reply-requested" in names)
    assert result_requested_in(text) == ("result-requested" in names)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.one_of(
    st.text(max_size=40),
    st.text(alphabet='[]"0123456789, :ab', max_size=40),
    st.recursive(st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=4)).map(json.dumps)),
    min_size=1, max_size=4))
def test_queue_names_from_a_command_line_are_queues_or_one_clear_error(items):
    """-Q (and JobManager(queues=...)) take anything a shell gives: names,
    name:weight, JSON whole or cut up. The answer is queues whose names hold
    no piece of JSON, or a ProtocolError (a ValueError) naming the fault."""
    try:
        queues = queue_names(items, 10)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert queues and all(isinstance(w, int) and isinstance(n, str) for w, n in queues)
    if not items[0].lstrip().startswith("["):
        assert all(n and not set(n) & set('[]"') for _, n in queues)


def _reference_run_request(options: dict) -> object:
    """The run options as RunRequest.parse read them before its per-job trim
    (isinstance tests, dict.get): a RunRequest's fields, or "refused"."""
    from types import MappingProxyType

    path, name = options.get("path"), options.get("callable")
    if not isinstance(path, str) or not path or not isinstance(name, str) or not name:
        return "refused"
    args, kwargs = options.get("args") or (), options.get("kwargs") or {}
    class_args, class_kwargs = options.get("class_args") or (), options.get("class_kwargs") or {}
    if not isinstance(args, (list, tuple)) or not isinstance(class_args, (list, tuple)):
        return "refused"
    mappings = (dict, MappingProxyType)
    if not isinstance(kwargs, mappings) or not isinstance(class_kwargs, mappings):
        return "refused"
    return (path, name, tuple(args), dict(kwargs), tuple(class_args), dict(class_kwargs),
            bool(options.get("subprocess", False)))


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.dictionaries(
    st.sampled_from(["path", "callable", "args", "kwargs", "class_args", "class_kwargs",
                     "subprocess", "other"]),
    st.one_of(json_values, st.sampled_from(["", "m", 0, 1, [], {}, None, False, True])),
    max_size=8))
def test_run_options_are_read_as_the_plain_reading_reads_them(options):
    """The worker's payload reading was rewritten for speed (exact JSON type
    tests, key lookups): any options a REQUEST can carry give the same job,
    or the same refusal, as the plain reading."""
    expected = _reference_run_request(options)
    try:
        got = RunRequest.parse(json.dumps(["run", options]))
    except ProtocolError:
        assert expected == "refused", options
        return
    assert (got.path, got.callable, got.args, dict(got.kwargs), got.class_args,
            dict(got.class_kwargs), got.subprocess) == expected, options

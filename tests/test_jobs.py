"""The job path's parts, in-process: deadlines, reply encoding, parsing, ids.

These pieces were rewritten for speed (docs/benchmarks.md); each test pins
the behaviour the slower, obvious version had.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import gevent
import pytest

from emq_green.jobs import Deadlines, JobOutcome, JobRunner, JobTimeout, Status, encode_reply
from emq_green.protocol import (
    Headers,
    ProtocolError,
    RunRequest,
    _loads,
    new_msgid,
    ready_frames,
    reply_frames,
    request_parts,
)

JOBS = "jobs_for_tests"


def run(runner: JobRunner, callable_name: str, *args, headers: str = ""):
    request = RunRequest(JOBS, callable_name, args)
    return gevent.spawn(runner.run, request, Headers.parse(headers)).get(timeout=30)


# -- deadlines ------------------------------------------------------------------

class WatchedDeadlines(Deadlines):
    """Deadlines that count their checks: those that found a job past its
    deadline, and those that found jobs all within theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.early_checks = self.late_checks = 0

    def _check(self) -> None:
        now = time.monotonic()
        if any(deadline <= now for deadline, _ in self._attempts.values()):
            self.late_checks += 1
        elif self._attempts:
            self.early_checks += 1
        super()._check()


def test_a_job_stops_close_to_its_timeout():
    """Close: the check runs every timeout/20 (5% of it), and the first check
    past the deadline stops the job. Both are read from the mechanism, not
    from the clock; how late a check comes on a busy box is not this test's."""
    deadlines = WatchedDeadlines()
    runner = JobRunner(global_timeout=0, deadlines=deadlines)
    started = time.monotonic()
    outcome = run(runner, "nap", 30, headers="timeout:0.4")
    took = time.monotonic() - started
    assert outcome.status is Status.TIMED_OUT and outcome.value == "TimeoutError"
    assert "0.4 s" in outcome.error_message
    assert runner.deadlines.period == pytest.approx(0.4 / 20)
    assert deadlines.late_checks == 1  # stopped by the first check past its deadline
    assert 0.4 <= took < 30, took  # cut short, never early
    assert len(runner.deadlines) == 0


def test_global_timeout_applies_and_a_header_overrides_it():
    runner = JobRunner(global_timeout=0.3)
    assert run(runner, "nap", 5).status is Status.TIMED_OUT
    assert run(runner, "nap", 0.5, headers="timeout:2").status is Status.SUCCEEDED


def test_a_shorter_timeout_arriving_later_makes_the_check_more_frequent():
    deadlines = WatchedDeadlines()
    runner = JobRunner(global_timeout=0, deadlines=deadlines)
    assert run(runner, "nap", 0, headers="timeout:100").status is Status.SUCCEEDED
    assert deadlines.period == Deadlines.MAX_PERIOD
    before = deadlines.early_checks
    assert run(runner, "nap", 30, headers="timeout:0.2").status is Status.TIMED_OUT
    # the timer was re-armed at the new period: checks ran while the job was
    # within its 0.2 s (the old 1 s timer would run one at most), and the
    # first check past the deadline stopped the job
    assert deadlines.period == pytest.approx(0.01)
    assert deadlines.early_checks - before >= 2
    assert deadlines.late_checks == 1


def test_a_job_cannot_swallow_its_timeout_with_except_exception():
    runner = JobRunner(global_timeout=0)
    outcome = run(runner, "swallow_everything", 30, headers="timeout:0.3")
    assert outcome.status is Status.TIMED_OUT


def test_a_job_that_holds_the_loop_past_its_timeout_is_reported_timed_out():
    # no check can run while the loop is held: the job ends on its own, late,
    # and its value is not taken for a success
    from blocking_jobs import block_unpatched

    jobs_module = __import__(JOBS)
    jobs_module.block_unpatched = block_unpatched
    try:
        runner = JobRunner(global_timeout=0)
        late = run(runner, "block_unpatched", 0.4, headers="timeout:0.1")
        in_time = run(runner, "block_unpatched", 0.01, headers="timeout:5")
    finally:
        del jobs_module.block_unpatched
    assert late.status is Status.TIMED_OUT and "0.1 s" in late.error_message
    assert in_time.status is Status.SUCCEEDED and in_time.value == 0.01
    assert len(runner.deadlines) == 0


def test_jobs_that_arrive_while_their_module_is_imported_wait_for_the_import(tmp_path,
                                                                            monkeypatch):
    # the import pauses (IO at import time, as a module opening a connection,
    # or one that imports emq_green.client for @job): the other greenlets
    # got the half-imported module and failed with AttributeError
    name = f"slow_import_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import gevent\n"
        "gevent.sleep(0.2)\n"
        "def double(x):\n"
        "    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = JobRunner(global_timeout=30)
    try:
        greenlets = [gevent.spawn(runner.run, RunRequest(name, "double", (n,)), Headers.parse(""))
                     for n in range(5)]
        outcomes = [g.get(timeout=30) for g in greenlets]
    finally:
        __import__("sys").modules.pop(name, None)
    assert [(o.status, o.value) for o in outcomes] == [(Status.SUCCEEDED, 2 * n)
                                                       for n in range(5)]


def test_a_module_whose_import_fails_fails_every_job_waiting_for_it(tmp_path, monkeypatch):
    name = f"broken_import_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import gevent\n"
        "gevent.sleep(0.1)\n"
        "raise RuntimeError('no database')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = JobRunner(global_timeout=30)
    greenlets = [gevent.spawn(runner.run, RunRequest(name, "f", ()), Headers.parse(""))
                 for _ in range(3)]
    outcomes = [g.get(timeout=30) for g in greenlets]
    assert [(o.status, o.error_type) for o in outcomes] == [(Status.FAILED, "RuntimeError")] * 3
    assert all("no database" in o.error_message for o in outcomes)


def test_a_timeout_of_the_job_s_own_is_not_taken_for_the_job_s():
    def own_timeout():
        with gevent.Timeout(0.05, False):
            gevent.sleep(1)
        return "survived"

    runner = JobRunner(global_timeout=5)
    jobs_module = __import__(JOBS)
    jobs_module.own_timeout = own_timeout
    try:
        outcome = run(runner, "own_timeout")
    finally:
        del jobs_module.own_timeout
    assert outcome.status is Status.SUCCEEDED and outcome.value == "survived"


def test_a_stray_job_timeout_is_not_reported_as_this_attempt_s():
    def raises_foreign():
        raise JobTimeout(object())

    jobs_module = __import__(JOBS)
    jobs_module.raises_foreign = raises_foreign
    try:
        with pytest.raises(JobTimeout):
            run(JobRunner(global_timeout=5), "raises_foreign")
    finally:
        del jobs_module.raises_foreign


def test_many_concurrent_deadlines_each_stop_their_own_job():
    runner = JobRunner(global_timeout=0)
    greenlets = [gevent.spawn(runner.run, RunRequest(JOBS, "nap", (0.05 if i % 2 else 30,)),
                              Headers.parse("timeout:0.3")) for i in range(200)]
    outcomes = [g.get(timeout=10) for g in greenlets]
    assert [o.status for o in outcomes[1::2]] == [Status.SUCCEEDED] * 100
    assert [o.status for o in outcomes[0::2]] == [Status.TIMED_OUT] * 100
    assert len(runner.deadlines) == 0


# -- reply encoding ---------------------------------------------------------------

@pytest.mark.parametrize("value", [None, True, 3, -2.5, "é", "a\"b\n", [1, {"k": [None]}],
                                   {"nested": {"x": 1.0e300}}, float("nan"), 10**30])
def test_replies_are_encoded_exactly_as_json_dumps_does(value):
    reply = {"value": value}
    assert encode_reply(reply) == json.dumps(reply)


def test_unencodable_values_become_their_error_text():
    reply = json.loads(encode_reply({"value": object()}))
    assert reply["value"] == "Object of type object is not JSON serializable"
    assert reply["error"]["type"] == "TypeError"
    circular: list = []
    circular.append(circular)
    reply = json.loads(encode_reply({"value": circular}))
    assert reply["value"] == "Circular reference detected"
    assert reply["error"]["type"] == "ValueError"


def test_a_success_whose_value_cannot_be_sent_is_the_failure_its_reply_is():
    outcome = JobOutcome(Status.SUCCEEDED, {"when": object()}, attempts=2).sendable()
    assert (outcome.status, outcome.error_type, outcome.attempts) == (Status.FAILED,
                                                                      "TypeError", 2)
    assert outcome.reply() == json.loads(encode_reply({"value": {"when": object()}}))
    big = JobOutcome(Status.SUCCEEDED, 10 ** 5000).sendable()  # over str()'s digit limit
    assert (big.status, big.error_type) == (Status.FAILED, "ValueError")
    for value in (None, "x", 3, 10 ** 4000, [1, {"k": 2.5}]):
        plain = JobOutcome(Status.SUCCEEDED, value)
        assert plain.sendable() is plain


# -- parsing and ids -----------------------------------------------------------------

@pytest.mark.parametrize("text", ['["run", {}]', ' ["run", {}]', '["run", {}] ', '{"a": 1}',
                                  '"x"', "1.5e3", "[1,]", "", "nul", '["run"] x', "[1, 2"])
def test_payload_json_reads_as_json_loads_does(text):
    try:
        expected = json.loads(text)
    except ValueError as exc:
        with pytest.raises(type(exc)) as got:
            _loads(text)
        assert str(got.value) == str(exc)
    else:
        assert _loads(text) == expected


def test_run_request_parse_checks_types():
    req = RunRequest.parse('["run", {"path": "m", "callable": "f", "args": [1], '
                           '"kwargs": {"a": 2}, "subprocess": true}]')
    assert req == RunRequest("m", "f", (1,), {"a": 2}, (), {}, True)
    assert req.name == "m.f"
    for bad in ('["run", {"path": "m", "callable": "f", "kwargs": [1]}]',
                '["run", {"path": "m", "callable": "f", "args": {"a": 1}}]',
                '["run", {"path": "", "callable": "f"}]', '["walk", {}]', "[]"):
        with pytest.raises(ProtocolError):
            RunRequest.parse(bad)


def test_request_parts_takes_only_well_formed_requests():
    good = [b"", b"eMQP/1.0", b"REQUEST", b"id", b"default", b"reply-requested", b"[]"]
    assert request_parts(good) == ("id", ("default", "reply-requested", "[]"))
    assert request_parts(good[:-1]) is None
    assert request_parts([b"x", *good[1:]]) is None
    assert request_parts([b"", b"eMQP/2.0", *good[2:]]) is None
    assert request_parts([*good[:2], b"HEARTBEAT", *good[3:]]) is None
    assert request_parts([*good[:3], b"\xff", *good[4:]]) is None


def test_headers_are_cached_and_bounded():
    first = Headers.parse("reply-requested,timeout:3")
    assert Headers.parse("reply-requested,timeout:3") is first
    assert first.reply_requested and first.timeout == 3
    for i in range(2000):
        Headers.parse(f"retry-count:{i % 100},timeout:{i}")
    from emq_green import protocol

    assert len(protocol._HEADERS_SEEN) <= protocol._HEADERS_SEEN_MAX
    with pytest.raises(ProtocolError):
        Headers.parse("timeout:x")


def test_message_ids_are_unique_uuid4_strings_and_differ_after_fork():
    ids = [new_msgid() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids[:100])
    frames = reply_frames('{"value": 1}', "orig")
    assert frames[:3] == [b"", b"eMQP/1.0", b"REPLY"] and frames[4:] == [b'{"value": 1}',
                                                                         b"orig"]
    assert ready_frames()[:3] == [b"", b"eMQP/1.0", b"READY"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, new_msgid().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_id[:24] != new_msgid()[:24]

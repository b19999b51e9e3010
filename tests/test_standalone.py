"""Run modes end to end, as real processes: ``emq-green --standalone`` with a
second worker on its backend, ``emq-green-submit``, and the demo command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_client import BIN, REPO, Stack, admin_request, lines, stack, wait_until

from emq_green.protocol import Command

__all__ = ["stack"]  # the fixture, shared with test_client


@pytest.mark.timeout(90)
def test_standalone_runs_jobs_and_takes_other_workers(stack: Stack, tmp_path: Path):
    standalone = stack.spawn("standalone", [
        str(BIN / "emq-green"), "--standalone", "-J", "5", "-n", "embedded",
        "--frontend-addr", stack.front, "--backend-addr", stack.back,
        "--administrative-addr", stack.admin])
    stack.wait_for_worker(slots=5)
    # another worker, for a queue the embedded one does not serve
    stack.spawn("other", [str(BIN / "emq-green"), "-B", stack.back, "-J", "2",
                          "-Q", "other", "-n", "other"])

    def two_workers() -> bool:
        shown = admin_request(stack.admin, Command.ROUTER_SHOW_WORKERS) or {}
        return set(shown.get("connected_queues", {})) == {"default", "other"}

    wait_until(two_workers, 20, "the second worker on the embedded router's backend")

    marks = tmp_path / "marks"
    submit = subprocess.run(
        [str(BIN / "emq-green-submit"), "examples.jobs.mark", "--args",
         json.dumps([str(marks)]), "--tag-arg", "--count", "20", "--addr", stack.front,
         "--admin-addr", stack.admin],
        capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    assert "sent 20/20" in submit.stderr
    other = subprocess.run(
        [str(BIN / "emq-green-submit"), "examples.jobs.mark", "--args",
         json.dumps([str(marks), "to-other"]), "--queue", "other", "--addr", stack.front],
        capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    try:
        wait_until(lambda: len(lines(marks)) == 21, 30, "21 jobs done")
    except AssertionError as exc:
        status = admin_request(stack.admin, Command.STATUS)
        raise AssertionError(f"{exc}; marks {lines(marks)}; STATUS {status}\n"
                             f"{stack.logs()}") from None

    tags = {line.split()[0] for line in lines(marks)}
    assert tags == {str(i) for i in range(20)} | {"to-other"}
    status = admin_request(stack.admin, Command.STATUS)
    by_worker = status["processed_messages_by_worker"]
    assert sum(by_worker.values()) == 21
    assert any(name.startswith("other") and count == 1 for name, count in by_worker.items())

    standalone.send_signal(signal.SIGTERM)
    assert standalone.wait(timeout=20) == 0
    assert "router: stopping -> stopped" in (tmp_path / "standalone.log").read_text()


@pytest.mark.timeout(120)
def test_demo_command_short_run():
    demo = subprocess.run(
        [sys.executable, "-m", "emq_green.demo", "--jobs", "150", "--concurrency", "50",
         "--timeout", "60"],
        cwd=str(REPO), capture_output=True, text=True, timeout=110)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "150/150 jobs done (0 failed)" in demo.stdout
    assert "jobs/s" in demo.stdout and "p99" in demo.stdout
    assert "emq-green stopped (exit status 0)" in demo.stdout


@pytest.mark.timeout(90)
def test_an_administrators_disconnect_drains_a_standalone_box_first(stack: Stack,
                                                                    tmp_path: Path):
    """emq-cli's shutdown stopped the router under the job manager: a WARNING
    (send queue full) and an ERROR (messages dropped at close) for a normal
    stop, and the running job's REPLY lost; and a second one, once it
    drained, killed the running jobs."""
    box = stack.spawn("standalone", [
        # --job: emq-jobmanager's abbreviation, for the router's settings too
        str(BIN / "emq-green"), "--standalone", "--job", "3", "--frontend-addr", stack.front,
        "--backend-addr", stack.back, "--administrative-addr", stack.admin,
        "--kill-grace-period", "20", "--allowed-callables", '["examples.jobs.*"]'])
    stack.wait_for_worker(slots=3)
    marks = tmp_path / "marks"
    submit = subprocess.run(
        [str(BIN / "emq-green-submit"), "examples.jobs.sleep_and_mark", "--args",
         json.dumps([1.5, str(marks), "slow"]), "--addr", stack.front],
        capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    wait_until(lambda: _running(stack) == 1, 20, "the job running")
    admin_request(stack.admin, Command.DISCONNECT)  # (answered with an ACK)
    admin_request(stack.admin, Command.DISCONNECT)  # again: the drain goes on
    assert box.wait(timeout=30) == 0, stack.logs()
    assert [line.split()[0] for line in lines(marks)] == ["slow"]  # it ran to its end
    log = (stack.tmp / "standalone.log").read_text()
    assert " ERROR " not in log and " WARNING " not in log, log


def _running(stack: Stack) -> int:
    shown = admin_request(stack.admin, Command.ROUTER_SHOW_WORKERS) or {}
    workers = shown.get("connected_workers", {}).values()
    return sum(3 - w["available_slots"] for w in workers)

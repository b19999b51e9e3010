"""Both pages in headless Chromium while jobs run, as a person sees them:
the worker's name, the jobs-done figures moving, the chart drawn, and, once
the jobs are done, the same figures as STATUS and ``/status``.

Screenshots of both pages are kept under ``artifacts/screenshots/``
(gitignored)."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import chromium
import pytest
import requests
from test_client import BIN, REPO, Stack, admin_request, free_ports, lines, stack, wait_until

from emq_green.protocol import Command

__all__ = ["stack"]

SHOTS = REPO / "artifacts" / "screenshots"
JOBS = 1500
STAGE = 500  # jobs per stage (see staged_jobs)
CALLABLE = "staged_jobs.staged_mark"
pytestmark = pytest.mark.skipif(
    chromium.executable() is None,
    reason="chromium is not installed and could not be (scripts/test.sh installs Debian's "
           "chromium with apt-get where apt is available)")


def text_of(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found, f"no #{element_id} on the page"
    return html.unescape(found.group(1))


def number(dom: str, element_id: str) -> int:
    value = text_of(dom, element_id)
    assert value.isdigit(), f"#{element_id} shows {value!r}"
    return int(value)


def row_cells(dom: str, attribute: str, key: str) -> list[str]:
    found = re.search(rf'<tr[^>]*data-{attribute}="{re.escape(key)}"[^>]*>(.*?)</tr>', dom)
    assert found, f"no row for {key} on the page"
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", found.group(1))]


def chart_points(dom: str) -> int:
    path = re.search(r'<path id="rate-line"[^>]*\sd="([^"]*)"', dom)
    assert path, "no chart line"
    return len(re.findall(r"[ML]\d", path.group(1)))


def look(url: str, timeout: float = 30) -> str:
    """One look at the page: its DOM once it has drawn at least twice."""
    dom = chromium.dom(url, budget_ms=2500, timeout=timeout)
    assert 'data-updates="' in dom, f"the page never drew: {dom[-2000:]}"
    return dom


@pytest.mark.timeout(150)
def test_both_pages_in_chromium_while_jobs_run(stack: Stack, tmp_path: Path):
    dash_port, metrics_port = free_ports(2)
    router_url = f"http://127.0.0.1:{dash_port}/"
    worker_url = f"http://127.0.0.1:{metrics_port}/"
    stack.spawn("router", [str(BIN / "emq-green-router"), "--frontend-addr", stack.front,
                           "--backend-addr", stack.back, "--administrative-addr", stack.admin,
                           "--dashboard-addr", str(dash_port)])
    stack.spawn("worker", [str(BIN / "emq-green"), "-B", stack.back, "-J", "20",
                           "-n", "browser-box", "--metrics-addr", f"127.0.0.1:{metrics_port}"],
                PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    stack.wait_for_worker(slots=20)
    marks = tmp_path / "marks"
    # three stages of 500 jobs, each held until the test opens its gate: the
    # looks below land while jobs run, however slow the box
    gates = tmp_path / "stage"
    Path(f"{gates}-0").touch()
    submit = subprocess.Popen(
        [str(BIN / "emq-green-submit"), CALLABLE, "--args",
         json.dumps([0.05, str(gates), STAGE, str(marks)]), "--tag-arg", "--count", str(JOBS),
         "--reply-requested", "--addr", stack.front],
        env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(lines(marks)) >= STAGE, 60, "the first stage done")

        # -- two looks at each page while the jobs run: after the first stage,
        # and after the second
        first = look(router_url)
        handed_first = number(first, "handed-out")
        assert 0 < handed_first < JOBS, "the first look came after the jobs were done"
        worker_first = look(worker_url)
        assert text_of(worker_first, "name") == "browser-box"
        done_first = number(worker_first, "done")
        assert done_first < JOBS
        (SHOTS / "router-running.png").unlink(missing_ok=True)
        chromium.screenshot(router_url, SHOTS / "router-running.png", size="1000,720")

        Path(f"{gates}-1").touch()
        wait_until(lambda: len(lines(marks)) >= 2 * STAGE, 60, "the second stage done")
        second = look(router_url)
        assert number(second, "handed-out") > handed_first
        worker_second = look(worker_url)
        assert number(worker_second, "done") > done_first
        assert chart_points(second) >= 2, "the router's chart has no line"
        assert chart_points(worker_second) >= 2, "the worker's chart has no line"
        identity = next(w for w in admin_request(stack.admin, Command.ROUTER_SHOW_WORKERS)
                        ["connected_workers"])
        assert identity.startswith("browser-box:")
        assert row_cells(second, "identity", identity)[0] == identity
        queue = row_cells(second, "queue", "default")
        assert re.fullmatch(r"\d+(\.\d+)?", queue[6]), f"no latency p50 shown: {queue}"
        chromium.screenshot(worker_url, SHOTS / "worker-running.png", size="1000,720")

        assert number(second, "handed-out") < JOBS and number(worker_second, "done") < JOBS

        # -- once all jobs are done: the pages and STATUS / /status agree
        Path(f"{gates}-2").touch()
        wait_until(lambda: len(lines(marks)) >= JOBS, 60, f"{JOBS} jobs done")
        assert submit.wait(timeout=30) == 0, submit.stderr.read()

        def worker_done() -> bool:
            status = requests.get(worker_url + "status", timeout=5).json()
            return not status["jobs_in_flight"] and sum(
                j["succeeded"] for j in status["jobs"]) == JOBS

        wait_until(worker_done, 20, "the worker's books to settle")
        final = look(router_url)
        assert chart_points(final) > chart_points(second), "the router's chart did not grow"
        status = admin_request(stack.admin, Command.STATUS)
        assert number(final, "handed-out") == sum(status["processed_messages_by_queue"].values())
        assert number(final, "handed-out") == JOBS
        cells = row_cells(final, "identity", identity)
        assert int(cells[4]) == status["processed_messages_by_worker"][identity]
        assert (int(cells[2]), int(cells[3])) == (0, 20)  # busy, free
        assert number(final, "waiting") == 0 and number(final, "dropped") == 0

        worker_final = look(worker_url)
        worker_status = requests.get(worker_url + "status", timeout=5).json()
        [row] = [j for j in worker_status["jobs"]
                 if j["callable"] == CALLABLE]
        cells = row_cells(worker_final, "callable", CALLABLE)
        assert int(cells[2]) == row["started"] == JOBS
        assert int(cells[3]) == row["succeeded"] == JOBS
        assert number(worker_final, "done") == JOBS
        assert number(worker_final, "slots") == worker_status["concurrent_jobs"] == 20
        assert number(worker_final, "free") == worker_status["free_slots"]
        pid = requests.get(worker_url + "dashboard.json", timeout=5).json()["pid"]
        assert row_cells(worker_final, "pid", str(pid))[2] == str(JOBS)
        chromium.screenshot(router_url, SHOTS / "router.png", size="1000,720")
        chromium.screenshot(worker_url, SHOTS / "worker.png", size="1000,720")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait(timeout=10)


@pytest.mark.timeout(120)
def test_worker_page_shows_loop_blocks_and_subprocess_children(stack: Stack, tmp_path: Path):
    metrics_port, = free_ports(1)
    worker_url = f"http://127.0.0.1:{metrics_port}/"
    stack.spawn("router", [str(BIN / "emq-green-router"), "--frontend-addr", stack.front,
                           "--backend-addr", stack.back, "--administrative-addr", stack.admin])
    stack.spawn("worker", [str(BIN / "emq-green"), "-B", stack.back, "-J", "4",
                           "-n", "blocky-box", "--block-threshold", "0.2",
                           "--subprocess-pool-size", "1",
                           "--metrics-addr", f"127.0.0.1:{metrics_port}"],
                PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    stack.wait_for_worker(slots=4)
    marks = tmp_path / "marks"
    for args in (["blocking_jobs.cpu_loop", "--args", "[0.5]"],
                 ["examples.jobs.mark", "--args", json.dumps([str(marks)]), "--tag-arg",
                  "--count", "3", "--subprocess"]):
        sent = subprocess.run([str(BIN / "emq-green-submit"), *args, "--addr", stack.front],
                              env=stack.env, capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr

    def settled() -> dict | None:
        data = requests.get(worker_url + "dashboard.json", timeout=5).json()
        blocks = data["loop_blocks"]["by_callable"].get("blocking_jobs.cpu_loop")
        children = set(data["pid_distribution"]) - {str(data["pid"])}
        if blocks and children and sum(data["pid_distribution"][c] for c in children) == 3 \
                and not data["jobs_in_flight"]:
            return data
        return None

    try:
        wait_until(settled, 60, "a loop block and 3 subprocess jobs on /dashboard.json")
        data = settled()
        assert data is not None
        dom = look(worker_url)
        assert text_of(dom, "name") == "blocky-box"
        culprit = row_cells(dom, "culprit", "blocking_jobs.cpu_loop")
        assert int(culprit[1]) == data["loop_blocks"]["by_callable"][
            "blocking_jobs.cpu_loop"]["incidents"] >= 1
        assert number(dom, "blocks") == data["loop_blocks"]["incidents"]
        [child] = set(data["pid_distribution"]) - {str(data["pid"])}
        cells = row_cells(dom, "pid", child)
        assert cells[1] == "subprocess child" and cells[2] == "3"
        chromium.screenshot(worker_url, SHOTS / "worker-blocks.png", size="1000,800")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None

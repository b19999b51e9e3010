"""The router's dashboard and the worker's page, over real sockets and HTTP
(the browser tests are in test_dashboard_browser.py), the dashboard
settings, and the Grafana dashboard's metric names against a live worker."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gevent
import pytest
import setproctitle
from test_metrics import endpoint_manager, http_get
from test_router import make_router, wait_until

from emq_green.protocol import Command
from emq_green.router.dashboard import RouterDashboard, parse_dashboard_addr, percentile
from emq_green.settings import SettingsError, load_settings

__all__ = ["endpoint_manager", "make_router"]

GRAFANA = Path(__file__).resolve().parent.parent / "conf" / "grafana" / "emq-green.json"


@pytest.fixture
def dashboard_for(make_router):
    made: list[RouterDashboard] = []

    def make(**settings):
        harness = make_router(**settings)
        dashboard = RouterDashboard(harness.router, "127.0.0.1:0")
        dashboard.start()
        made.append(dashboard)
        return harness, dashboard

    yield make
    for dashboard in made:
        dashboard.stop()


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


@pytest.mark.timeout(30)
def test_snapshot_follows_workers_queues_latency_and_draining(dashboard_for):
    harness, dashboard = dashboard_for()
    worker = harness.worker(slots=2, name="dash-worker")
    client = harness.peer("frontend", "dash-client")
    sent = [harness.request(client, headers="reply-requested") for _ in range(3)]
    wait_until(lambda: harness.router.waiting.get("default"), what="the third request waits")
    got = [worker.recv(), worker.recv()]
    assert {m.msgid for m in got} == {m.msgid for m in sent[:2]}

    snap = dashboard.snapshot()
    [row] = snap["workers"]
    assert (row["identity"], row["state"], row["busy"], row["free"], row["handed_out"]) == (
        "dash-worker", "connected", 2, 0, 2)
    assert row["queues"] == [[10, "default"]]
    [queue] = snap["queues"]
    assert (queue["name"], queue["waiting"], queue["in_flight"], queue["handed_out"]) == (
        "default", 1, 2, 2)
    assert queue["latency_p50"] is None  # no reply yet
    assert snap["handed_out"] == 2 and snap["waiting"] == 1
    assert snap["status"]["waiting_messages_by_queue"] == {"default": 1}

    gevent.sleep(0.05)  # so that the third request has waited measurably
    worker.send(Command.REPLY, json.dumps({"value": 1}), got[0].msgid)
    worker.send(Command.READY)
    third = worker.recv()
    assert third.msgid == sent[2].msgid
    wait_until(lambda: dashboard.snapshot()["queues"][0]["latency_p50"] is not None,
               what="a latency")
    snap = dashboard.snapshot()
    [queue] = snap["queues"]
    assert queue["handed_out"] == 3 and queue["waiting"] == 0 and queue["replies"] == 1
    assert queue["latency_p50"] >= 50.0  # the reply came after the 0.05 s sleep
    assert queue["wait_p99"] >= 50.0  # the third request waited as long in the buffer
    assert queue["wait_p50"] < queue["wait_p99"]

    worker.send(Command.KBYE)
    wait_until(lambda: not harness.router.workers, what="the worker to leave")
    [row] = dashboard.snapshot()["workers"]
    assert row["state"] == "draining" and row["identity"] == "dash-worker"
    assert row["handed_out"] == 3
    assert (row["busy"], row["free"]) == (2, 0)  # its two jobs still running there
    for job in (got[1], third):  # its jobs end: the row follows (it was frozen: a probe)
        worker.send(Command.REPLY, json.dumps({"value": 1}), job.msgid)
    wait_until(lambda: dashboard.snapshot()["workers"][0]["busy"] == 0,
               what="the draining worker's row to follow its jobs")


@pytest.mark.timeout(30)
def test_history_gives_the_rate_of_handed_out_jobs(dashboard_for):
    harness, dashboard = dashboard_for()
    worker = harness.worker(slots=50)
    client = harness.peer("frontend")
    dashboard._sample()
    first = len(dashboard.history) - 1
    for _ in range(10):
        harness.request(client)
    wait_until(lambda: sum(harness.router.processed_by_queue.values()) == 10, what="10 sent")
    dashboard._sample()
    snap = dashboard.snapshot()
    # the rates since the first sample (the sampler may have added one in
    # between), times their spans, give back the 10 jobs, however long it took
    times = [t for t, _counts in list(dashboard.history)[first:]]
    rates = dashboard._rates()[-(len(times) - 1):]  # what the snapshot shows
    assert [t for t, _rate, _by_queue in rates] == times[1:]
    handed = sum(rate * (t1 - t0) for (_t, rate, _q), t0, t1 in zip(rates, times, times[1:]))
    assert handed == pytest.approx(10, abs=0.05)
    assert snap["history"][-1][1] == rates[-1][1] > 0
    assert snap["queues"][0]["rate"] == snap["history"][-1][1]
    assert len(worker.pending()) == 10


@pytest.mark.timeout(30)
def test_http_page_json_and_methods(dashboard_for):
    harness, dashboard = dashboard_for()
    harness.worker(slots=1, name="http-worker")
    host, port = dashboard.address
    assert host == "127.0.0.1"
    base = f"http://{host}:{port}"
    page = http_get(base + "/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"(src|href)=\"?(https?:)?//", page.text)
    assert "<svg" in page.text and "dashboard.json" in page.text
    data = http_get(base + "/dashboard.json").json()
    status = harness.admin(Command.STATUS)
    assert data["status"] == status
    assert [w["identity"] for w in data["workers"]] == ["http-worker"]
    post = gevent.get_hub().threadpool.apply(
        __import__("requests").post, (base + "/dashboard.json",), {"timeout": 5})
    assert post.status_code == 405
    assert http_get(base + "/nope").status_code == 404
    dashboard.stop()
    assert harness.router.observer is None


def test_a_taken_dashboard_port_is_an_error_line_and_the_router_routes_on(make_router,
                                                                          caplog):
    """It killed the router with a traceback, after "router listening"."""
    import socket

    from emq_green.router.dashboard import start_dashboard

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        h = make_router()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        assert start_dashboard(h.router, addr) is None
        assert h.router.observer is None
        assert any(r.levelname == "ERROR" and f"cannot listen on {addr}" in r.getMessage()
                   for r in caplog.records)
        worker = h.worker(slots=1)
        sent = h.request(h.peer("frontend"))
        got = worker.recv()
        assert got.command is Command.REQUEST and got.msgid == sent.msgid
    finally:
        taken.close()


def test_dashboard_addr_setting(tmp_path: Path):
    # load_settings swaps os.environ's contents, which moves the C environment;
    # setproctitle, when first used after that, finds no room for a title
    # (test_metrics' process-title test would then fail). Let it set up first.
    setproctitle.getproctitle()

    def loaded(argv, env=None):
        return load_settings(argv, env or {"EVENTMQ_CONFIG_FILE": str(tmp_path / "none")},
                             section="router")[0].dashboard_addr

    assert loaded([]) == ""
    assert loaded(["--dashboard-addr", "9400"]) == ":9400"
    assert loaded(["--dashboard-addr", "0.0.0.0:9400"]) == "0.0.0.0:9400"
    assert loaded([], {"EVENTMQ_DASHBOARD_ADDR": ":9401",
                       "EVENTMQ_CONFIG_FILE": str(tmp_path / "none")}) == ":9401"
    conf = tmp_path / "eventmq.conf"
    conf.write_text("[router]\ndashboard_addr = 127.0.0.1:9402\n")
    assert loaded(["-C", str(conf)]) == "127.0.0.1:9402"
    with pytest.raises(SettingsError, match="dashboard_addr"):
        loaded(["--dashboard-addr", "here"])
    assert parse_dashboard_addr(":9400") == ("127.0.0.1", 9400)
    assert parse_dashboard_addr("0.0.0.0:9400") == ("0.0.0.0", 9400)


@pytest.mark.timeout(30)
def test_worker_page_at_root_status_stays_json(router, endpoint_manager):
    manager, endpoint = endpoint_manager(concurrent_jobs=2, name="page-worker")
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    msgid = router.request(ident, "jobs_for_tests", "add", args=[1, 2],
                           headers="reply-requested")
    router.wait_reply(msgid)
    page = http_get(endpoint.base + "/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"?(https?:)?//", page.text)
    assert endpoint.status()["name"] == "page-worker"
    data = http_get(endpoint.base + "/dashboard.json").json()
    assert data["name"] == "page-worker"
    assert data["pid_distribution"] == {str(data["pid"]): 1}
    assert [(j["callable"], j["succeeded"]) for j in data["jobs"]] == [
        ("jobs_for_tests.add", 1)]


def grafana_expressions() -> list[str]:
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return exprs


@pytest.mark.timeout(30)
def test_grafana_panels_name_only_metrics_a_live_worker_exports(router, endpoint_manager):
    manager, endpoint = endpoint_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    router.wait_reply(router.request(ident, "jobs_for_tests", "add", args=[1, 2],
                                     headers="reply-requested"))
    text = http_get(endpoint.base + "/metrics").text
    exported = set(re.findall(r"^(emq_green_\w+)", text, re.M))
    for name, kind in re.findall(r"^# TYPE (emq_green_\w+) (\w+)", text, re.M):
        exported.add(name)  # families that have no sample yet (no loop block so far)
        if kind == "counter":
            exported.add(name if name.endswith("_total") else name + "_total")
        if kind == "histogram":
            exported.update(name + s for s in ("_bucket", "_sum", "_count"))
    assert "emq_green_job_duration_seconds_bucket" in exported  # the scrape is real
    exprs = grafana_expressions()
    assert len(exprs) >= 10
    used = {name for e in exprs for name in re.findall(r"\b(emq_green_\w+)", e)}
    assert used - exported == set(), f"panels name metrics that do not exist: {used - exported}"
    assert {"emq_green_jobs_finished_total", "emq_green_job_duration_seconds_bucket",
            "emq_green_free_slots", "emq_green_loop_blocks_total"} <= used


@pytest.mark.timeout(60)
def test_standalone_serves_the_dashboard_from_the_environment(tmp_path: Path):
    import requests
    from test_client import BIN, Stack, free_ports
    from test_client import wait_until as wait_real

    stack = Stack(tmp_path)
    port, = free_ports(1)
    try:
        stack.spawn("standalone", [str(BIN / "emq-green"), "--standalone", "-J", "3",
                                   "-n", "solo", "--frontend-addr", stack.front,
                                   "--backend-addr", stack.back,
                                   "--administrative-addr", stack.admin],
                    EVENTMQ_DASHBOARD_ADDR=str(port))
        stack.wait_for_worker(slots=3)
        url = f"http://127.0.0.1:{port}/dashboard.json"
        found: dict = {}

        def shown() -> bool:
            found.update(requests.get(url, timeout=5).json())
            return any(w["free"] == 3 for w in found["workers"])

        wait_real(shown, 20, "the worker on the standalone dashboard")
        [worker] = found["workers"]
        assert worker["identity"].startswith("solo:") and worker["state"] == "connected"
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text.startswith(
            "<!doctype html>")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    finally:
        stack.close()


@pytest.mark.timeout(60)
def test_slow_connections_are_bounded_and_closed(dashboard_for, monkeypatch):
    """Connections that never finish a request held a file descriptor each
    for ever: 20,000 took every descriptor of the router (a probe)."""
    import socket

    import psutil

    from emq_green.web import serve

    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(serve, "IDLE_TIMEOUT", 1.0)
    harness, dashboard = dashboard_for()
    host, port = dashboard.address
    slow = []
    for _ in range(30):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        slow.append(sock)

    def served_connections() -> int:
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)

    wait_until(lambda: served_connections() >= 8, what="eight connections served")
    # for the next half second (the silent ones not yet timed out) no more
    watch_until = time.monotonic() + 0.5
    while time.monotonic() < watch_until:
        assert served_connections() <= 8
        gevent.sleep(0.05)  # the server runs in this hub; an observation window
    # the silent ones are closed: a whole page comes through once they are
    assert http_get(f"http://{host}:{port}/dashboard.json").status_code == 200
    def end_of(sock: socket.socket) -> bytes:
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk

    for sock in slow[:8]:  # closed, with at most a 408 first
        ended = gevent.get_hub().threadpool.apply(end_of, (sock,))
        assert ended in (b"", serve._TIMED_OUT), ended
    for sock in slow:
        sock.close()


@pytest.mark.timeout(60)
def test_head_answers_have_no_body_and_the_connection_goes_on(dashboard_for):
    """HEAD was answered with the page after its headers: a kept-alive client
    read that body as its next answer (BadStatusLine)."""
    import socket

    _harness, dashboard = dashboard_for()
    host, port = dashboard.address

    def pipelined() -> bytes:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"HEAD /dashboard.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"GET /dashboard.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    data = gevent.get_hub().threadpool.apply(pipelined)
    head, after_head = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head
    assert after_head.startswith(b"HTTP/1.1 200"), after_head[:80]  # no body between
    get, body = after_head.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"Content-Length: (\d+)", get).group(1))
    assert len(body) == length and json.loads(body)


@pytest.mark.timeout(60)
def test_a_request_dripped_a_byte_at_a_time_is_cut_at_its_deadline(dashboard_for, monkeypatch):
    """Slowloris: a byte every 0.2 s kept a connection (the bound was per
    read), and 64 of them kept every scrape out. The request's line and
    headers now have IDLE_TIMEOUT in all."""
    import socket

    from emq_green.web import serve

    monkeypatch.setattr(serve, "IDLE_TIMEOUT", 1.0)
    _harness, dashboard = dashboard_for()
    host, port = dashboard.address

    def drip() -> float:
        started = time.monotonic()
        sock = socket.create_connection((host, port), timeout=10)
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
            for _ in range(60):  # 12 s of a byte every 0.2 s, unless cut
                sock.sendall(b"a")
                time.sleep(0.2)  # the peer's pace, not a wait for an event
        except OSError:
            pass
        finally:
            sock.close()
        return time.monotonic() - started

    assert gevent.get_hub().threadpool.apply(drip) < 6


@pytest.mark.timeout(60)
def test_bad_requests_make_a_bounded_number_of_short_lines(dashboard_for, caplog):
    """8,000 NUL bytes per request made one ERROR line of 32,000 characters
    each, unthrottled (a probe: 742 MB of log in 10 s)."""
    import logging
    import socket

    from emq_green.limits import LOG_BURST

    _harness, dashboard = dashboard_for()
    host, port = dashboard.address
    caplog.set_level(logging.WARNING)

    def flood() -> int:
        answered = 0
        for _ in range(LOG_BURST + 50):
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"\x00" * 8000 + b"\r\n\r\n")
                answered += sock.recv(100).startswith(b"HTTP/1.1 400")
        return answered

    assert gevent.get_hub().threadpool.apply(flood) == LOG_BURST + 50
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP:")]
    assert len(lines) == LOG_BURST and max(map(len, lines)) < 300


@pytest.mark.timeout(60)
def test_a_request_in_absolute_form_is_served_and_its_host_checked(dashboard_for):
    """``GET http://host:port/dashboard.json`` (curl --proxy) was a 404; its
    host is the request's Host, checked like any other."""
    import socket

    _harness, dashboard = dashboard_for()
    host, port = dashboard.address

    def status_of(target: str) -> bytes:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Connection: close\r\n\r\n".encode())
            return sock.recv(64).split(b"\r\n")[0]

    pool = gevent.get_hub().threadpool
    assert pool.apply(status_of, (f"http://{host}:{port}/dashboard.json",)).endswith(b"200 OK")
    assert b"421" in pool.apply(status_of, ("http://evil.example/dashboard.json",))


@pytest.mark.timeout(60)
def test_a_request_with_a_body_is_refused_and_closed_unread(dashboard_for):
    """After the answer, gevent read what was left of a request's body, with
    no bound but 5 s per read: a body dripped a byte a second held the
    connection for ever (128 of them kept every scrape out). The pages take
    no body: 400, and the connection closes."""
    import socket

    _harness, dashboard = dashboard_for()
    host, port = dashboard.address

    def answer_and_end() -> tuple[bytes, float]:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /dashboard.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 1000\r\n\r\nx")
            started, data = time.monotonic(), b""
            while chunk := sock.recv(4096):
                data += chunk
            return data, time.monotonic() - started

    data, took = gevent.get_hub().threadpool.apply(answer_and_end)
    assert data.startswith(b"HTTP/1.1 400") and took < 4

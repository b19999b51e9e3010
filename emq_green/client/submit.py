"""``emq-green-submit``: send jobs from the command line and show progress.

    emq-green-submit examples.jobs.sleep_and_mark --args '[0.1, "/tmp/marks", "x"]' \\
        --count 1000 --queue default

It first waits (``--connect-timeout``, 5 s) for the router to answer: an
address ZeroMQ refuses exits 2, no router answering (nothing listens, or
the CURVE handshake fails) exits 1, both with one line on stderr and
nothing sent. (Acknowledgements cannot tell: a router acknowledges only the
requests it hands to a worker at once, not those it buffers.)

Progress while sending: requests sent, their rate, and how many the router
acknowledged (handed to a worker at once). With ``--admin-addr`` it then
follows the router's STATUS until no request waits in its buffer: every job
has reached a worker. (EventMQ's router answers STATUS too, but its in-flight
figures only fall for jobs sent with ``--reply-requested``.)

``--every SECONDS`` / ``--cron TEXT`` schedule the job instead of sending
it, ``--unschedule`` removes that schedule, ``--delay SECONDS`` sends it to
run once later (all through a scheduler connected to the router).

With ``--wait`` (not with a schedule or ``--delay``: such a job returns no
result) each job asks for its result (emq-green's router only), and
each result is printed on stdout as one JSON line, in the order the jobs
were sent: ``{"job": N, "msgid": ..., "value": ...}``, or ``"error": {"type",
"message"}`` instead of ``"value"`` when the job failed, its result was lost,
or none came within ``--wait-timeout``. The exit status is then 1 if any
job failed. A guaranteed job the router does not confirm within
``--confirm-timeout`` (or refuses) stops the sending: the jobs sent before
it run, and their results are still printed; that job gets an error line
and the exit status is 1. Without ``--wait``, guaranteed jobs are sent
back to back (:class:`~emq_green.client.GuaranteedBatch`, at most 1,000
unconfirmed at a time) and the command exits 0 only once every one is
confirmed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Iterable, Optional, TextIO

import zmq

from ..curve import ClientCurve, CurveError
from ..protocol import Command, Message, ProtocolError
from ..schedules import MAX_INTERVAL
from .api import DEFAULT_ADDR, ENV_BROKER_ADDR, Client, ResultHandle, callable_path
from .batch import GuaranteedBatch
from .connect import RouterUnreachable, check_address, connect
from .results import (
    ConfirmTimeout,
    GuaranteeRefused,
    JobError,
    ResultLostError,
    ResultTimeout,
    SendTimeoutError,
)
from .schedule import finite_seconds


def _json_arg(kind: type, what: str):
    def convert(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what} is not JSON: {exc}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"{what} must be a JSON {kind.__name__}")
        return value

    return convert


def _whole_seconds(text: str) -> int:
    """--every: EventMQ's scheduler reads the interval with int(), so a
    fraction would be rounded behind the user's back."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (1 <= value <= MAX_INTERVAL and value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a whole number of seconds, 1 to {MAX_INTERVAL:.0f} (ten years; "
            "schedulers read it as an int)")
    return int(value)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds, more than 0")
    return value


def _job_timeout(text: str) -> float:
    try:
        return finite_seconds("--timeout", text, text=True)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of seconds >= 0 (0: none)") from None


def _delay_seconds(text: str) -> float:
    try:
        value = finite_seconds("--delay", text, text=True)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of seconds >= 0") from None
    if value > MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a delayed job runs at most ten years ({MAX_INTERVAL:.0f} s) from now")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emq-green-submit",
        description="Send jobs to an eMQP/1.0 router (emq-green's or EventMQ's).")
    parser.add_argument("callable", help="dotted path of the job, e.g. myapp.jobs.send_mail")
    parser.add_argument("--args", type=_json_arg(list, "--args"), default=[],
                        help="positional arguments, a JSON list")
    parser.add_argument("--kwargs", type=_json_arg(dict, "--kwargs"), default={},
                        help="keyword arguments, a JSON object")
    parser.add_argument("--count", "-n", type=int, default=1, help="jobs to send (default 1)")
    parser.add_argument("--queue", "-q", default="default",
                        help="queue name (default: default)")
    parser.add_argument("--addr", "-a", default=None,
                        help=f"router frontend (default ${ENV_BROKER_ADDR}, else {DEFAULT_ADDR})")
    parser.add_argument("--connect-timeout", type=_positive_seconds, default=5.0,
                        metavar="SECONDS",
                        help="seconds to wait for the router to answer before sending; "
                             "none answering: exit 1, nothing sent (default 5)")
    parser.add_argument("--admin-addr", default=None,
                        help="router administrative address: follow STATUS after sending")
    parser.add_argument("--wait", action="store_true",
                        help="wait for each job's result and print it as a JSON line on "
                             "stdout (emq-green's router); exit 1 if any job failed")
    parser.add_argument("--wait-timeout", type=_positive_seconds, default=60.0,
                        help="seconds to follow STATUS, or to wait for all results, at most "
                             "(default 60)")
    parser.add_argument("--reply-requested", action="store_true",
                        help="ask the worker to send the result back to the router")
    parser.add_argument("--timeout", type=_job_timeout, default=0,
                        help="job timeout in seconds, sent as the timeout:N header (default 0: no "
                             "header, the worker's global_timeout applies)")
    parser.add_argument("--guarantee", action="store_true",
                        help="run the job at least once even if its worker dies, or the "
                             "router (emq-green's, with its --journal-file); the jobs are sent "
                             "without waiting "
                             "and the command returns once the router has confirmed each "
                             "(with --wait, each send waits for its confirmation)")
    parser.add_argument("--confirm-timeout", type=_positive_seconds, default=None,
                        help="seconds to wait for each confirmation of --guarantee "
                             "(default 30)")
    parser.add_argument("--subprocess", action="store_true",
                        help="ask emq-green to run the job in a child process")
    parser.add_argument("--tag-arg", action="store_true",
                        help="append the job's number (0..count-1, as text) to --args")
    when = parser.add_argument_group(
        "schedules (through a scheduler: emq-green-scheduler or EventMQ's emq-scheduler)")
    kind = when.add_mutually_exclusive_group()
    kind.add_argument("--every", type=_whole_seconds, metavar="SECONDS",
                      help="schedule the job every SECONDS (whole seconds) instead of "
                           "sending it")
    kind.add_argument("--cron", metavar="TEXT",
                      help='schedule the job at the times of a cron text, e.g. "*/5 * * * *"')
    kind.add_argument("--unschedule", action="store_true",
                      help="remove the schedule of this callable with these arguments")
    kind.add_argument("--delay", type=_delay_seconds, metavar="SECONDS",
                      help="run the job once, SECONDS from now")
    when.add_argument("--run-count", type=int, default=None,
                      help="with --every/--cron: stop after this many runs")
    when.add_argument("--nohaste", action="store_true",
                      help="with --every/--cron: do not also run it at once")
    parser.add_argument("--curve-secret-key-file", default=None,
                        help="CURVE: this client's secret certificate "
                             "(default $EVENTMQ_CURVE_SECRET_KEY_FILE; none: plain)")
    parser.add_argument("--curve-server-key-file", default=None,
                        help="CURVE: the router's public certificate "
                             "(default $EVENTMQ_CURVE_SERVER_KEY_FILE)")
    return parser


class _Progress:
    """One status line, rewritten in place on a terminal, every ``every`` seconds."""

    def __init__(self, out: TextIO, every: float = 0.5) -> None:
        self.out, self.every = out, every
        self.tty = out.isatty()
        self._last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self.out.write(("\r" + text + "\033[K") if self.tty else text + "\n")
        self.out.flush()

    def done(self, text: str) -> None:
        self.show(text, force=True)
        if self.tty:
            self.out.write("\n")


def admin_request(admin_addr: str, command: Command = Command.STATUS, timeout: float = 2.0,
                  prepare: Optional[Callable[[Any], None]] = None,
                  ) -> Optional[dict[str, Any]]:
    """One request to a router's administrative socket (STATUS,
    ROUTER_SHOW_WORKERS, ...): its JSON answer, or None without one within
    ``timeout`` s. ``prepare`` is called on the socket before it connects
    (e.g. :meth:`ClientCurve.apply <emq_green.curve.ClientCurve.apply>`)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if prepare is not None:
        prepare(sock)
    # EventMQ's router decodes identities as UTF-8: never leave ZeroMQ's binary one
    sock.setsockopt(zmq.IDENTITY, f"admin:{uuid.uuid4()}".encode())
    try:
        connect(sock, admin_addr)  # a bad address: ValueError
        sock.send_multipart(Message.new(command).frames())
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = Message.parse(sock.recv_multipart())
        return json.loads(reply.body[0]) if reply.body else None
    except (ProtocolError, ValueError):
        return None
    finally:
        sock.close()


def router_status(admin_addr: str, timeout: float = 2.0,
                  curve: Optional[ClientCurve] = None) -> Optional[dict[str, Any]]:
    """Ask a router's administrative socket for STATUS; None without an answer."""
    return admin_request(admin_addr, Command.STATUS, timeout,
                         curve.apply if curve is not None else None)


#: seconds a request may wait for the router to take it before the command
#: gives up (a router killed or stopped: it blocked for ever)
SEND_TIMEOUT = 30.0
#: seconds to wait, after the last send, for the router to say it read
#: every request (:meth:`Client.flush`)
FLUSH_TIMEOUT = 5.0


def main(argv: Optional[list[str]] = None, out: TextIO = sys.stderr,
         results_out: Optional[TextIO] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.count < 1:
        out.write("emq-green-submit: --count must be at least 1\n")
        return 2
    if ns.cron is not None and not ns.cron.strip():
        # (empty, it was taken for no --cron at all: the job ran once, now)
        out.write("emq-green-submit: --cron needs a cron text, e.g. \"*/5 * * * *\"\n")
        return 2
    if ns.count != 1 and (ns.every is not None or ns.cron or ns.unschedule):
        out.write("emq-green-submit: --count goes with jobs sent now; a schedule is one "
                  "(its runs: --run-count)\n")
        return 2
    if ns.wait and (ns.delay is not None or ns.every is not None or ns.cron or ns.unschedule):
        out.write("emq-green-submit: --wait needs jobs sent now: a delayed or scheduled job "
                  "goes through a scheduler and returns no result\n")
        return 2
    if (ns.run_count is not None or ns.nohaste) and ns.every is None and not ns.cron:
        out.write("emq-green-submit: --run-count and --nohaste go with --every or --cron\n")
        return 2
    try:  # before connecting: a name no worker can import is the caller's mistake
        callable_path(ns.callable)
    except ValueError as exc:
        out.write(f"emq-green-submit: {exc}\n")
        return 2
    addr = ns.addr or os.environ.get(ENV_BROKER_ADDR) or DEFAULT_ADDR
    if ns.admin_addr:
        try:  # before sending: a typo here would leave the jobs sent and unfollowed
            check_address(ns.admin_addr)
        except ValueError as exc:
            out.write(f"emq-green-submit: --admin-addr: {exc}\n")
            return 2
    progress = _Progress(out)
    try:
        client = Client(addr, green=False, curve_secret_key_file=ns.curve_secret_key_file,
                        curve_server_key_file=ns.curve_server_key_file,
                        confirm_timeout=ns.confirm_timeout, send_timeout=SEND_TIMEOUT)
    except CurveError as exc:
        out.write(f"emq-green-submit: {exc}\n")
        return 2
    # nothing is sent before a router answers; closing then does not wait
    try:
        client.wait_for_router(ns.connect_timeout)
    except ValueError as exc:  # an address ZeroMQ refuses
        client.close()
        out.write(f"emq-green-submit: {exc}\n")
        return 2
    except RouterUnreachable as exc:
        client.close()
        out.write(f"emq-green-submit: {exc}; nothing sent\n")
        return 1
    if ns.every is not None or ns.cron or ns.unschedule:
        return _schedule(client, ns, out)
    started = time.monotonic()
    handles: list[ResultHandle] = []
    #: the job whose send failed (no confirmation, refused, or the router
    #: took nothing for SEND_TIMEOUT): the rest unsent
    unsent: Optional[tuple[int, ConfirmTimeout | GuaranteeRefused | SendTimeoutError]] = None
    refused = False
    #: the router answers flush probes and did not say it read everything
    unread = False
    # guaranteed jobs with no result: confirmed as a batch (a window of them
    # unconfirmed at a time), not one round trip each
    batch = GuaranteedBatch(client) if ns.guarantee and not ns.wait and ns.delay is None \
        else None
    #: the batch's msgids -> job numbers, to name the unconfirmed ones
    numbers: dict[str, int] = {}
    try:
        for i in range(ns.count):
            args = [*ns.args, str(i)] if ns.tag_arg else ns.args
            if batch is not None:
                sent = batch.defer_job(ns.callable, args, ns.kwargs, queue=ns.queue,
                                       reply_requested=ns.reply_requested,
                                       timeout=ns.timeout, subprocess=ns.subprocess)
                numbers[sent] = i
            elif ns.delay is not None:
                sent = client.defer_job(ns.callable, args, ns.kwargs, queue=ns.queue,
                                        timeout=ns.timeout, guarantee=ns.guarantee,
                                        delay=ns.delay)
            else:
                sent = client.defer_job(ns.callable, args, ns.kwargs, queue=ns.queue,
                                        reply_requested=ns.reply_requested,
                                        timeout=ns.timeout, subprocess=ns.subprocess,
                                        result=ns.wait, guarantee=ns.guarantee)
            if isinstance(sent, ResultHandle):
                handles.append(sent)
            rate = (i + 1) / max(time.monotonic() - started, 1e-6)
            # (a SCHEDULE, a delayed job, is not acknowledged: no count of 0 for it)
            progress.show(f"sent {i + 1}/{ns.count} ({rate:.0f}/s)" + (
                "" if ns.delay is not None else
                f", {'confirmed' if ns.guarantee else 'acknowledged'} {client.acknowledged}"))
        if batch is not None:
            batch.wait()
    except KeyboardInterrupt:
        out.write(f"\nemq-green-submit: interrupted; {client.sent} of {ns.count} sent\n")
        client._linger = min(client._linger, 0.5)  # a short grace: the user wants out
        client.close()
        return 130
    except (ConfirmTimeout, GuaranteeRefused, SendTimeoutError) as exc:
        # a runtime failure, not a usage error: what was sent and confirmed
        # runs, and its results are still waited for; the rest is not sent
        unsent = (i, exc)
        if batch is not None:
            out.write(f"emq-green-submit: {exc}; {len(batch.outstanding)} job(s) sent and "
                      f"not confirmed, {ns.count - client.sent} not sent\n")
            # (a msgid not numbered yet is this job's: its send raised after it left)
            unconfirmed = sorted(numbers.get(m, i) for m in batch.outstanding)
            if unconfirmed:
                out.write(f"emq-green-submit: not confirmed (they may or may not run): job(s) "
                          f"{job_ranges(unconfirmed)}; not sent: "
                          f"{job_ranges(range(client.sent, ns.count)) or 'none'}\n")
        else:
            out.write(f"emq-green-submit: {exc}; the {ns.count - i - 1} job(s) after it not "
                      "sent\n")
    except ValueError as exc:
        out.write(f"emq-green-submit: {exc}\n")
        handles.clear()  # the client is closed below
        refused = True  # (no summary of what was sent)
        return 2
    finally:
        if batch is not None:
            batch.close()
        client.poll_acks()
        elapsed = time.monotonic() - started
        if ns.delay is not None:  # a SCHEDULE each, which the router does not acknowledge
            outcome = f"each to run once in {ns.delay:g} s (a delayed job, run by a scheduler)"
        elif ns.guarantee:
            outcome = f"confirmed {client.acknowledged}"
        else:
            outcome = f"acknowledged {client.acknowledged} so far"
        if not refused:
            progress.done(f"sent {client.sent}/{ns.count} to {addr} in {elapsed:.2f} s "
                          f"({client.sent / max(elapsed, 1e-6):.0f}/s), {outcome}")
        if not handles:
            # (results coming back say the router read the requests)
            unread = unsent is None and not refused and not client.flush(FLUSH_TIMEOUT) \
                and client._router_answers
            client.close()
    if unread:
        out.write(f"emq-green-submit: the router did not say within {FLUSH_TIMEOUT:g} s that "
                  "it had read every request (it stopped reading, or is gone): some may "
                  "never run\n")
        return 1
    results = sys.stdout if results_out is None else results_out
    failed = 0
    if handles:
        try:
            failed = print_results(handles, ns.wait_timeout, results)
        finally:
            client.close()
        progress.done(f"{len(handles) - failed}/{len(handles)} jobs succeeded")
    if unsent is not None and ns.wait:
        number, exc = unsent
        results.write(json.dumps({"job": number, "msgid": exc.msgid, "error": {
            "type": type(exc).__name__, "message": str(exc)}}) + "\n")
        results.flush()
    if failed or unsent is not None:
        return 1
    if ns.admin_addr:
        return _follow(ns.admin_addr, ns.wait_timeout, progress, out, client.curve)
    return 0


def _schedule(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    """--every / --cron / --unschedule: one SCHEDULE or UNSCHEDULE."""
    from .api import schedule, unschedule

    try:
        if ns.unschedule:
            msgid = unschedule(ns.callable, ns.args, ns.kwargs, queue=ns.queue, client=client)
            out.write(f"unscheduled {ns.callable} (UNSCHEDULE {msgid})\n")
        else:
            msgid = schedule(ns.callable, ns.args, ns.kwargs, every=ns.every,
                             cron=ns.cron, queue=ns.queue, run_count=ns.run_count,
                             nohaste=ns.nohaste, guarantee=ns.guarantee, timeout=ns.timeout,
                             client=client)
            what = f"every {ns.every:g} s" if ns.every is not None else f"cron {ns.cron}"
            out.write(f"scheduled {ns.callable} {what} on queue {ns.queue} "
                      f"(SCHEDULE {msgid})\n")
    except ValueError as exc:
        out.write(f"emq-green-submit: {exc}\n")
        return 2
    finally:
        client.close()
    return 0


def job_ranges(numbers: Iterable[int]) -> str:
    """Job numbers (sorted) as ``0-4, 7, 9-12``: what to send again."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def print_results(handles: list[ResultHandle], limit: float, out: TextIO) -> int:
    """Wait for each result (``limit`` seconds for all), print one JSON line
    per job; returns how many failed."""
    deadline = time.monotonic() + limit
    failed = 0
    for n, handle in enumerate(handles):
        line: dict[str, Any] = {"job": n, "msgid": handle.msgid}
        try:
            line["value"] = handle.get(timeout=max(0.0, deadline - time.monotonic()))
        except JobError as exc:
            line["error"] = {"type": exc.type, "message": exc.message}
        except ResultLostError as exc:
            line["error"] = {"type": "ResultLost", "message": str(exc)}
        except ResultTimeout:
            line["error"] = {"type": "ResultTimeout",
                             "message": f"no result within --wait-timeout ({limit:g} s for all "
                                        "the jobs)"}
        failed += "error" in line
        out.write(json.dumps(line) + "\n")
    out.flush()
    return failed


def _follow(admin_addr: str, limit: float, progress: _Progress, out: TextIO,
            curve: Optional[ClientCurve] = None) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = router_status(admin_addr, curve=curve)
        if status is None:
            out.write(f"emq-green-submit: no STATUS from {admin_addr}\n")
            return 1
        waiting = sum(status.get("waiting_messages_by_queue", {}).values())
        in_flight = sum(status.get("inflight_messages_by_queue", {}).values())
        line = f"router: {waiting} waiting, ~{in_flight} in flight"
        if waiting == 0:
            progress.done(line + "; every job has reached a worker")
            return 0
        progress.show(line)
        time.sleep(0.2)  # polling interval, not synchronisation
    progress.done(f"router still has jobs waiting after {limit:g} s")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The router's hand-over of schedules between schedulers, and its
mending of what EventMQ's scheduler fires, driven message by message
(the sockets are a recorder: what is checked is what the router sends)."""

from __future__ import annotations

import collections
import json
import time

import gevent
import pytest
import zmq.green as zmq
from peers import free_port

from emq_green.protocol import Command, Message
from emq_green.router.schedulers import SchedulerSide
from emq_green.scheduler.service import Scheduler
from emq_green.scheduler.store import ScheduleStore
from emq_green.scheduler.table import ScheduleTable
from emq_green.schedules import handed_over, parse_schedule, schedule_key
from emq_green.settings import Settings

CALL = {"path": "interop_jobs", "callable": "record", "args": ["x"], "kwargs": {},
        "class_args": [], "class_kwargs": {}}
PAYLOAD = json.dumps(["run", CALL])
KEY = schedule_key(PAYLOAD)


class Recorder:
    """Stands in for RouterSockets: keeps what is sent, to whom."""

    frontend_paused = False

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Message]] = []
        self.gone: set[bytes] = set()
        #: peers whose pipe is full (send_or_full answers None)
        self.full: set[bytes] = set()

    def send(self, name: str, identity: bytes, message: Message) -> bool:
        if identity in self.gone:
            return False
        self.sent.append((identity, message))
        return True

    def send_or_full(self, name: str, identity: bytes, message: Message) -> bool | None:
        if identity in self.full:
            return None
        return self.send(name, identity, message)

    def has_unread(self, name: str) -> bool:
        return False

    def to(self, identity: bytes, command: Command) -> list[Message]:
        return [m for who, m in self.sent if who == identity and m.command is command]


@pytest.fixture
def side():
    sockets = Recorder()
    return SchedulerSide(settings=Settings(), sockets=sockets,
                         counters=collections.Counter()), sockets


def inform(side: SchedulerSide, identity: bytes) -> None:
    side.on_inform(identity, Message.new(Command.INFORM, "", "scheduler"))


def schedule(side: SchedulerSide, interval: str = "1", cron: str = "", headers: str = "",
             queue: str = "other") -> None:
    side.on_schedule(b"client", Message.new(Command.SCHEDULE, queue, headers, interval,
                                            PAYLOAD, cron))


def firing(queue: str = "default") -> Message:
    return Message.new(Command.REQUEST, queue, "reply-requested", PAYLOAD)


@pytest.mark.timeout(10)
def test_a_scheduler_that_says_kbye_hands_its_schedules_to_the_next(side):
    side, sockets = side
    inform(side, b"s1")
    schedule(side)
    assert len(sockets.to(b"s1", Command.SCHEDULE)) == 1
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    assert side.live[KEY].owner is None  # nobody to hold it: kept for the next
    inform(side, b"s2")
    (handed,) = sockets.to(b"s2", Command.SCHEDULE)
    assert handed.body == ("other", "nohaste,handed-over", "1", PAYLOAD, "")  # no extra run
    assert side.live[KEY].owner == b"s2" and side.counts["handed_over"] == 1


@pytest.mark.timeout(20)
def test_a_scheduler_whose_pipe_is_full_is_slow_not_gone(side, monkeypatch):
    """A probe's flood of 60,000 SCHEDULEs: the pipe to the one scheduler
    filled, it was taken for gone, sent every schedule again on its return,
    filled again, for ever (the router and the scheduler at 20-50 % CPU,
    loop stalls of 2-6 s). What a full pipe refuses now waits for it, in
    order, and leaves as it reads; past a bound, clients are refused."""
    import emq_green.router.schedulers as schedulers

    side, sockets = side
    inform(side, b"s1")
    sockets.full.add(b"s1")
    for n in range(5):
        schedule(side, interval=str(n + 1))
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "1",
                                              PAYLOAD, ""))
    assert b"s1" in side.schedulers and not sockets.to(b"s1", Command.SCHEDULE)
    assert side.status()["schedule_messages_waiting"] == 6
    assert side.counts["send_failed"] == 0
    monkeypatch.setattr(schedulers, "MAX_OUTBOX", 6)
    schedule(side, interval="9")  # a scheduler is 6 behind: refused, with a reply
    (refusal,) = sockets.to(b"client", Command.REPLY)
    assert "behind" in json.loads(refusal.body[0])["value"]
    sockets.full.clear()
    deadline = time.monotonic() + 10
    while side.status()["schedule_messages_waiting"] and time.monotonic() < deadline:
        gevent.sleep(0.01)
    sent = [m.command for who, m in sockets.sent if who == b"s1"]
    assert sent[-6:] == [Command.SCHEDULE] * 5 + [Command.UNSCHEDULE]  # in order
    assert [m.body[2] for m in sockets.to(b"s1", Command.SCHEDULE)] == ["1", "2", "3", "4", "5"]
    assert b"s1" in side.schedulers and side.counts["handed_over"] == 0


@pytest.mark.timeout(20)
def test_an_unschedule_waiting_for_a_scheduler_taken_for_gone_is_told_when_it_is_back(side):
    """A probe's find: 3,000 UNSCHEDULEs waited behind 30,000 SCHEDULEs for
    a stopped scheduler; removed as silent, its waiting messages went, and
    back it fired 2,000 of the unscheduled for ever (only the last 1,000
    unscheduled are told again to every scheduler that connects). Now the
    copy it may hold is remembered: its firings are dropped, and it is told
    to drop it when it is back."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side)
    sockets.full.add(b"s1")
    schedule(side, interval="2")  # waits: the pipe is full
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "2",
                                              PAYLOAD, ""))
    assert side.status()["schedule_messages_waiting"] == 2
    side.schedulers.pop(b"s1")  # as when silence removes it
    deadline = time.monotonic() + 10  # its drainer lets the waiting messages go
    while side.status()["schedule_messages_waiting"] and time.monotonic() < deadline:
        gevent.sleep(0.01)
    sockets.full.clear()
    assert not sockets.to(b"s1", Command.UNSCHEDULE)
    assert side.vet_firing(b"s1", firing("other")) is None  # its copy's firings dropped
    assert side.counts["firing_dropped_ended"] == 1
    inform(side, b"s1")
    drops = sockets.to(b"s1", Command.UNSCHEDULE)  # told when it is back
    assert drops and all(d.body[3] == PAYLOAD for d in drops) and KEY not in side.live


@pytest.mark.timeout(20)
def test_a_big_hand_over_goes_in_batches_and_a_newcomer_is_told_only_of_its_copies(
        side, monkeypatch):
    """A probe's find: schedulers connecting with 60,000 live schedules
    stalled the router 1-2.7 s (all handed over in one turn; and a scheduler
    that connected was sent an UNSCHEDULE for every schedule held by the
    others, copies it never had)."""
    import emq_green.router.schedulers as schedulers

    side, sockets = side
    monkeypatch.setattr(schedulers, "HAND_OVER_BATCH", 10)
    inform(side, b"s1")
    for n in range(35):
        side.on_schedule(b"client", Message.new(
            Command.SCHEDULE, "other", "", "60", json.dumps(["run", {**CALL, "args": [n]}]),
            ""))
    inform(side, b"s2")
    assert sockets.to(b"s2", Command.UNSCHEDULE) == []  # it never held one
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    assert len(sockets.to(b"s2", Command.SCHEDULE)) == 10  # one batch in this turn
    deadline = time.monotonic() + 10
    while len(sockets.to(b"s2", Command.SCHEDULE)) < 35 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    handed = [m.body[3] for m in sockets.to(b"s2", Command.SCHEDULE)]
    assert len(handed) == len(set(handed)) == 35  # each once (a repeat would be among them)
    assert all(live.owner == b"s2" for live in side.live.values())


@pytest.mark.timeout(10)
def test_live_schedules_are_bounded(side, monkeypatch):
    import emq_green.router.schedulers as schedulers

    side, sockets = side
    monkeypatch.setattr(schedulers, "MAX_LIVE", 2)
    inform(side, b"s1")

    def of(n: int) -> Message:
        payload = json.dumps(["run", {**CALL, "args": [n]}])
        return Message.new(Command.SCHEDULE, "other", "", "60", payload, "")

    for n in range(3):
        side.on_schedule(b"client", of(n))
    assert len(side.live) == 2 and side.counts["refused_full"] == 1
    side.on_schedule(b"client", of(0))  # a live one again: not a new one
    assert side.counts["refused_full"] == 1 and len(side.live) == 2


@pytest.mark.timeout(10)
def test_a_scheduler_that_connects_again_gets_its_own_back(side):
    side, sockets = side
    inform(side, b"s1")
    schedule(side)
    inform(side, b"s1")  # restarted with the same identity (emq-green's)
    assert len(sockets.to(b"s1", Command.SCHEDULE)) == 2


def two_schedulers_one_schedule(side) -> tuple[bytes, bytes]:
    """Schedulers s1 and s2, one SCHEDULE: (its owner, the other)."""
    inform(side, b"s1")
    inform(side, b"s2")
    schedule(side)
    owner = side.live[KEY].owner
    return owner, (b"s2" if owner == b"s1" else b"s1")


@pytest.mark.timeout(10)
def test_with_two_schedulers_the_survivor_takes_over_and_no_one_else(side):
    side, sockets = side
    owner, other = two_schedulers_one_schedule(side)
    assert len(sockets.to(other, Command.UNSCHEDULE)) == 1  # no second copy
    sockets.gone.add(owner)
    side.on_kbye(owner, Message.new(Command.KBYE))
    assert len(sockets.to(other, Command.SCHEDULE)) == 1
    assert side.live[KEY].owner == other


@pytest.mark.timeout(10)
def test_the_book_shows_the_holder_not_a_scheduler_that_lists_a_stale_copy(side):
    """A probe: a scheduler killed while it held a schedule, restarted on
    its file, listed the schedule (before it dropped it as told): the row
    was credited to it for good, with its old next_run, though another
    held and fired the schedule (EventMQ's, which never lists)."""
    side, sockets = side
    owner, other = two_schedulers_one_schedule(side)
    listing = json.dumps({"schedules": [{"key": KEY, "next_run": 100.0, "runs": 4}]})
    side.on_heartbeat(owner, Message.new(Command.HEARTBEAT, "1.0", listing))
    assert side.book[KEY]["scheduler"] == owner.decode() and side.book[KEY]["runs"] == 4
    sockets.gone.add(owner)
    side.on_kbye(owner, Message.new(Command.KBYE))
    row = side.book[KEY]
    assert row["scheduler"] == other.decode() and "next_run" not in row and "runs" not in row
    sockets.gone.discard(owner)
    inform(side, owner)  # back, its file still holding the schedule
    side.on_heartbeat(owner, Message.new(Command.HEARTBEAT, "1.0", listing))
    assert side.live[KEY].owner == other
    assert side.book[KEY]["scheduler"] == other.decode() and "next_run" not in side.book[KEY]


@pytest.mark.timeout(10)
def test_schedulers_gone_together_pass_their_schedules_to_the_one_left(side):
    """A probe's find: five of six schedulers gone at once (kill -9). The
    first one removed handed its schedules to another gone one; the send
    failed and left them with no owner; the next removal sent them to the
    identity None, which raised in the router's housekeeping greenlet and
    ended it for good (no heartbeats, no dead-worker checks, no result
    expiry). Now a scheduler that cannot be sent to is taken for gone and
    the next one tried: every schedule lands with the survivor."""
    side, sockets = side
    names = [f"s{i}".encode() for i in range(6)]
    for name in names:
        inform(side, name)
    for i in range(30):
        call = json.dumps(["run", {**CALL, "args": [i]}])
        side.on_schedule(b"client", Message.new(Command.SCHEDULE, "other", "", "5", call, ""))
    assert len(side.live) == 30
    survivor = names[-1]
    sockets.gone.update(names[:-1])
    for name in names[:-1]:  # each removal as the silence check does it
        if name in side.schedulers:
            side.on_kbye(name, Message.new(Command.KBYE))
    assert list(side.schedulers) == [survivor]
    assert all(live.owner == survivor for live in side.live.values())
    assert all(who is not None for who, _m in sockets.sent)
    handed = {schedule_key(m.body[3]) for m in sockets.to(survivor, Command.SCHEDULE)}
    assert handed == set(side.live)


@pytest.mark.timeout(10)
def test_silent_schedulers_removed_in_one_check_raise_nothing(side):
    """A probe's find: the first silent scheduler's hand-over found the
    others gone and removed them; the check, walking its snapshot, then
    removed them again: KeyError (contained by the housekeeping guard)."""
    side, sockets = side
    names = [b"s1", b"s2", b"s3", b"s4"]
    for name in names:
        inform(side, name)
    schedule(side)
    survivor = b"s4"
    sockets.gone.update(names[:-1])
    long_ago = time.monotonic() - 3600
    for name in names[:-1]:
        side.schedulers[name].hb = long_ago
    side.schedulers[survivor].hb = time.monotonic()
    side.check(time.monotonic())
    assert list(side.schedulers) == [survivor]
    assert side.live[KEY].owner == survivor


@pytest.mark.timeout(10)
def test_a_schedule_sent_while_most_schedulers_are_gone_lands_and_the_crowd_is_capped(side):
    """A probe's find: 2,500 peers INFORMed as schedulers and vanished; the
    next SCHEDULE recursed once per dead scheduler, past Python's limit, and
    a valid schedule was refused as malformed. Now the schedulers are
    tried in a loop, and at most MAX_SCHEDULERS may be connected."""
    from emq_green.router.schedulers import MAX_SCHEDULERS

    side, sockets = side
    names = [f"s{i:03d}".encode() for i in range(MAX_SCHEDULERS + 5)]
    for name in names:
        inform(side, name)
    assert len(side.schedulers) == MAX_SCHEDULERS
    assert side._counters["scheduler_informs_refused"] == 5
    assert sockets.to(names[-1], Command.ACK) == []  # refused: not acknowledged
    survivor = names[0]
    sockets.gone.update(names[1:])
    schedule(side)
    # (the ones tried before it are taken for gone; the rest at their silence)
    assert side.live[KEY].owner == survivor and survivor in side.schedulers
    assert side.counts["refused_malformed"] == 0
    assert len(sockets.to(survivor, Command.SCHEDULE)) == 1


@pytest.mark.timeout(10)
def test_a_scheduler_taken_for_gone_and_back_loses_its_stale_copy(side):
    """s1 stops answering (SIGSTOP), is removed, its schedule goes to s2;
    back, s1 is told to drop its copy, and what it fires meanwhile is
    dropped: the schedule runs from s2 only."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side)
    inform(side, b"s2")
    assert side.live[KEY].owner == b"s1"  # stays where it is
    side.on_kbye(b"s1", Message.new(Command.KBYE))  # as when silence removes it
    assert side.live[KEY].owner == b"s2"
    assert side.vet_firing(b"s1", firing("other")) is None
    assert side.counts["firing_dropped_not_holder"] == 1
    assert side.vet_firing(b"s2", firing("other")) is not None
    inform(side, b"s1")
    (drop,) = sockets.to(b"s1", Command.UNSCHEDULE)
    assert drop.body == ("other", "", "1", PAYLOAD, "")
    assert side.live[KEY].owner == b"s2"


@pytest.mark.timeout(10)
def test_finished_schedules_are_not_handed_over(side):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, headers="run_count:2")
    for _ in range(2):
        assert side.vet_firing(b"s1", firing("other")) is not None
    assert KEY not in side.live  # both runs seen
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s2")
    assert sockets.to(b"s2", Command.SCHEDULE) == []


@pytest.mark.timeout(10)
def test_a_finite_schedule_is_handed_over_with_the_runs_not_seen_yet(side):
    """run_count 4, one run seen, the holder gone (kill -9): the next
    scheduler is told 3 runs, not 4 (a probe saw 5 runs of 4); EventMQ's
    scheduler reads the same header."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side, headers="guarantee,run_count:4,nohaste")
    assert side.vet_firing(b"s1", firing("other")) is not None
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s2")
    (handed,) = sockets.to(b"s2", Command.SCHEDULE)
    assert handed.body == ("other", "guarantee,nohaste,run_count:3,handed-over", "1",
                           PAYLOAD, "")
    assert parse_schedule(handed.body).run_count == 3
    for _ in range(3):
        assert side.vet_firing(b"s2", firing("other")) is not None
    assert KEY not in side.live


@pytest.mark.timeout(10)
def test_emq_green_scheduler_takes_a_hand_over_with_the_router_s_count():
    """A hand-over of a schedule the scheduler holds (restored from its
    file) keeps its grid and its runs, with at most the runs the router has
    not seen; one of a schedule whose runs ended here is ignored; a new one
    runs the count it is told."""
    now = [1_800_000_000.0]
    scheduler = Scheduler(settings=Settings(), clock=lambda: now[0])
    original = ("q", "run_count:5,nohaste", "60", PAYLOAD, "")
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *original))
    entry = scheduler.table.entries[KEY]
    first = entry.next_at
    now[0] += 30
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *handed_over(original, 2)))
    assert scheduler.table.entries[KEY] is entry and entry.next_at == first
    assert entry.runs_left == 2 and scheduler.counts["unchanged"] == 1
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *handed_over(original, 4)))
    assert entry.runs_left == 2  # never more than it has left
    sent: list = []
    scheduler._send = lambda request: sent.append(request) is None  # no socket here
    for _ in range(2):
        now[0] += 60
        scheduler._fire(entry, now[0], entry.next_at)
    assert len(sent) == 2 and KEY not in scheduler.table.entries
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *handed_over(original, 1)))
    assert KEY not in scheduler.table.entries and scheduler.counts["fired_already"] == 1
    # a client sending it again starts it anew, with its own count
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *original))
    assert scheduler.table.entries[KEY].runs_left == 5
    other = Scheduler(settings=Settings(), clock=lambda: now[0])
    other.on_schedule(Message.new(Command.SCHEDULE, *handed_over(original, 3)))
    assert other.table.entries[KEY].runs_left == 3
    assert "handed-over" not in other.table.entries[KEY].schedule.request_headers()


@pytest.mark.timeout(10)
def test_a_cron_schedule_costs_the_router_no_search_of_its_times(side):
    """run_count 1000 with a cron text whose times croniter finds slowly
    (31 February, or a weekday): the router computed all 1,000 times to
    know when the runs end, seconds of its loop per SCHEDULE; a cron
    schedule has no end time now (its firings are counted)."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval="-1", cron="* * 31 2 1-5", headers="run_count:1000,nohaste")
    assert side.live[KEY].ends is None and side.live[KEY].runs_left == 1000
    assert len(sockets.to(b"s1", Command.SCHEDULE)) == 1


@pytest.mark.timeout(10)
def test_a_scheduler_s_listing_is_bounded_in_what_the_book_keeps(side):
    """A peer that INFORMs as a scheduler lists what it likes: texts are cut
    to 200 characters, what is not a number is not kept as one, a nested
    listing is refused without a traceback, and the book stops at its bound."""
    side, sockets = side
    inform(side, b"fake")
    row = {"key": "k" * 500, "callable": "c" * 900_000, "queue": "q", "runs": "many",
           "next_run": 5.0, "extra": "x" * 1000}
    side.on_heartbeat(b"fake", Message.new(Command.HEARTBEAT, "1.0",
                                           json.dumps({"schedules": [row]})))
    (entry,) = side.book.values()
    assert len(entry["key"]) == 200 and len(entry["callable"]) == 200
    assert "runs" not in entry and "extra" not in entry and entry["next_run"] == 5.0
    side.on_heartbeat(b"fake", Message.new(Command.HEARTBEAT, "1.0", "[" * 100_000))
    assert len(side.book) == 1


@pytest.mark.timeout(10)
def test_a_listing_s_numbers_that_json_cannot_carry_are_not_kept(side):
    """A peer that said it was a scheduler listed next_run NaN, last_run
    Infinity: STATUS and the dashboard's JSON carried them, invalid for
    every strict parser (the page's response.json() among them), until the
    router restarted (a probe)."""
    side, sockets = side
    inform(side, b"fake")
    row = {"key": "k1", "next_run": float("nan"), "last_run": float("inf"),
           "runs": float("-inf"), "runs_left": 3}
    side.on_heartbeat(b"fake", Message.new(Command.HEARTBEAT, "1.0",
                                           json.dumps({"schedules": [row]})))
    (entry,) = side.book.values()
    assert entry == {"key": "k1", "runs_left": 3, "scheduler": "fake"}
    json.dumps(side.listing(), allow_nan=False)  # raises on NaN or Infinity


@pytest.mark.timeout(20)
def test_a_small_listing_costs_what_it_lists_not_the_whole_book(side):
    """Every listing in a HEARTBEAT made a pass over the whole book, to find
    what its scheduler no longer lists: two peers listed 26,000 rows each,
    a third sent 2,000 HEARTBEATs of 40 bytes, 10 s of router CPU (a
    probe). Only what the scheduler listed last is looked at now; what it
    no longer lists still leaves the book."""
    side, sockets = side
    for name in (b"big-1", b"big-2"):
        inform(side, name)
        rows = [{"key": f"{name.decode()}-{n}", "next_run": 1.0} for n in range(20_000)]
        side.on_heartbeat(name, Message.new(Command.HEARTBEAT, "1.0",
                                            json.dumps({"schedules": rows})))
    inform(side, b"small")
    listing = json.dumps({"schedules": [{"key": "mine", "next_run": 1.0},
                                        {"key": "gone-soon", "next_run": 1.0}]})
    side.on_heartbeat(b"small", Message.new(Command.HEARTBEAT, "1.0", listing))
    assert len(side.book) == 40_002

    class Book(collections.OrderedDict):
        passes = 0

        def items(self):
            Book.passes += 1
            return super().items()

        def values(self):
            Book.passes += 1
            return super().values()

    side.book = Book(side.book)
    for _ in range(2_000):
        side.on_heartbeat(b"small", Message.new(Command.HEARTBEAT, "1.0", listing))
    assert Book.passes == 0 and side.book["mine"]["next_run"] == 1.0
    side.on_heartbeat(b"small", Message.new(Command.HEARTBEAT, "1.0", json.dumps(
        {"schedules": [{"key": "mine", "next_run": 2.0}]})))
    assert "gone-soon" not in side.book and side.book["mine"]["next_run"] == 2.0
    assert len(side.book) == 40_001


@pytest.mark.timeout(10)
def test_emq_green_scheduler_refuses_a_cron_text_that_names_no_time():
    """31 February passes croniter's check; the table's first time raised
    and ended the scheduler's link greenlet (deaf for good)."""
    scheduler = Scheduler(settings=Settings(), clock=time.time)
    scheduler.on_schedule(Message.new(Command.SCHEDULE, "q", "", "-1", PAYLOAD, "0 0 31 2 *"))
    assert scheduler.counts["refused"] == 1 and len(scheduler.table) == 0


@pytest.mark.timeout(10)
def test_a_delayed_job_that_fired_is_not_handed_over(side):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval="5", headers="run_count:1,nohaste,delay-id:abc")
    assert f"{KEY}:abc" in side.live
    side.vet_firing(b"s1", firing("other"))
    assert f"{KEY}:abc" not in side.live
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s2")
    assert sockets.to(b"s2", Command.SCHEDULE) == []


@pytest.mark.timeout(10)
def test_a_delayed_job_handed_over_waits_only_what_is_left_of_its_delay(side):
    """A probe's find: a delayed job (25 s) whose scheduler was killed 3 s
    in went to the next one with its interval, the whole delay: EventMQ's
    scheduler, which reads no eta, ran it 8 s late. The hand-over now says
    the whole seconds left."""
    side, sockets = side
    inform(side, b"s1")
    eta = time.time() + 60.4
    schedule(side, interval="100", headers=f"run_count:1,nohaste,eta:{eta:.3f},delay-id:d")
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s2")
    (handed,) = sockets.to(b"s2", Command.SCHEDULE)
    assert 60 <= int(handed.body[2]) <= 61  # (ceil: never before its eta)
    assert f"eta:{eta:.3f}" in handed.body[1]  # emq-green's scheduler keeps the eta
    assert side.live[f"{KEY}:d"].owner == b"s2"


@pytest.mark.timeout(10)
def test_cron_firings_go_to_their_queue_and_stop_once_unscheduled(side):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval="-1", cron="*/5 * * * *")
    mended = side.vet_firing(b"s1", firing("default"))
    assert mended is not None and mended.body[0] == "other"
    assert mended.body[1:] == firing().body[1:]
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "-1",
                                              PAYLOAD, "*/5 * * * *"))
    assert side.vet_firing(b"s1", firing("default")) is None
    assert side.counts["firing_dropped"] == 1
    # scheduled again: its firings pass again
    schedule(side, interval="-1", cron="*/5 * * * *")
    assert side.vet_firing(b"s1", firing("default")) is not None


@pytest.mark.timeout(10)
def test_interval_firings_pass_unchanged(side):
    side, _ = side
    inform(side, b"s1")
    schedule(side)
    message = firing("other")
    assert side.vet_firing(b"s1", message) is message
    other_call = Message.new(Command.REQUEST, "q", "", '["run", {"path": "m"}]')
    assert side.vet_firing(b"s1", other_call) is other_call


@pytest.mark.timeout(10)
def test_emq_green_scheduler_takes_the_same_schedule_again_as_a_no_op():
    now = [1_800_000_000.0]
    scheduler = Scheduler(settings=Settings(), clock=lambda: now[0])
    message = Message.new(Command.SCHEDULE, "q", "", "60", PAYLOAD, "")
    scheduler.on_schedule(message)
    first = scheduler.table.entries[KEY].next_at
    now[0] += 30
    scheduler.on_schedule(Message.new(Command.SCHEDULE, *message.body))
    assert scheduler.table.entries[KEY].next_at == first  # its grid kept
    assert scheduler.counts["unchanged"] == 1
    scheduler.on_schedule(Message.new(Command.SCHEDULE, "q", "", "120", PAYLOAD, ""))
    assert scheduler.table.entries[KEY].next_at == now[0] + 120  # a change replaces it


@pytest.mark.timeout(10)
def test_an_unknown_scheduler_that_heartbeats_is_told_kbye_then_taken_as_connected(side):
    """After a router restart a scheduler heartbeats to a router that does
    not know it: KBYE (emq-green's scheduler INFORMs again); if it heartbeats
    on (EventMQ's ignores KBYE), it is taken as connected."""
    side, sockets = side
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "q", "", "-1", PAYLOAD,
                                              ""))
    assert len(side.held) == 1
    beat = Message.new(Command.HEARTBEAT, "1.0")
    side.on_heartbeat(b"old", beat)
    assert len(sockets.to(b"old", Command.KBYE)) == 1
    assert side.schedulers == {}
    side.on_heartbeat(b"old", beat)
    assert list(side.schedulers) == [b"old"]
    assert len(sockets.to(b"old", Command.KBYE)) == 1  # once
    assert len(sockets.to(b"old", Command.UNSCHEDULE)) == 1 and not side.held
    assert side.status()["schedulers"] == 1
    assert side.status()["unknown_scheduler_heartbeats"] == 2


@pytest.mark.timeout(10)
def test_a_held_schedule_reaches_the_scheduler_that_arrives_once(side):
    """Held while no scheduler was connected: forwarded on the INFORM, and
    not sent again by the hand-over (EventMQ's scheduler would run its
    first, haste, run twice)."""
    side, sockets = side
    schedule(side)
    assert len(side.held) == 1
    inform(side, b"s1")
    assert len(sockets.to(b"s1", Command.SCHEDULE)) == 1
    assert side.live[KEY].owner == b"s1" and not side.held
    assert side.counts["handed_over"] == 0
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s1")  # a later INFORM still gets it back
    assert len(sockets.to(b"s1", Command.SCHEDULE)) == 2


@pytest.mark.timeout(20)
def test_a_restored_delayed_job_fired_at_connect_is_not_fired_again_by_the_hand_over(
        tmp_path):
    """emq-green's scheduler restarted on its file fires a delayed job that
    fell due as soon as its INFORM is acknowledged; the router's hand-over
    of the same job (sent on that INFORM) arrives after: ignored, so the
    job runs once. Driven through a real socket by a fake router."""
    body = ("q", f"run_count:1,nohaste,eta:{time.time() - 5:.3f},delay-id:d1", "1",
            PAYLOAD, "")
    db = str(tmp_path / "s.db")
    store = ScheduleStore(db)
    entry, _ = ScheduleTable().add(parse_schedule(body), time.time() - 10)
    store.save(entry)
    store.close()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("inproc://handover")
    scheduler = Scheduler(settings=Settings(scheduler_file=db), context=context,
                          addr="inproc://handover")
    try:
        scheduler.start()
        with gevent.Timeout(10):
            ident, *frames = router.recv_multipart()
            assert Message.parse(frames).command is Command.KBYE  # (see _link)
            ident, *frames = router.recv_multipart()
            inform = Message.parse(frames)
            assert inform.command is Command.INFORM
            router.send_multipart([ident, *Message.new(Command.ACK, inform.msgid).frames()])
            while True:  # the restored job, fired at once
                fired = Message.parse(router.recv_multipart()[1:])
                if fired.command is Command.REQUEST:
                    break
            router.send_multipart([ident, *Message.new(Command.SCHEDULE, *body).frames()])
            while not (scheduler.counts["fired_already"] or scheduler.counts["fired"] > 1):
                gevent.sleep(0.01)  # a poll of the scheduler's counters, not a wait for time
        assert scheduler.counts["fired"] == 1 and scheduler.counts["fired_already"] == 1
        assert list(ScheduleStore(db).load()) == []
    finally:
        scheduler.stop(2)
        router.close(linger=0)
        context.term()


class FakeRouter:
    """A ROUTER socket on a loopback port that can die and come back there."""

    def __init__(self, context: zmq.Context, port: int) -> None:
        self.context = context
        self.addr = f"tcp://127.0.0.1:{port}"
        self.sock = self.open()

    def open(self) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.addr)
        return sock

    def recv(self, command: Command) -> tuple[bytes, Message]:
        """The next message of ``command`` (others are passed over)."""
        while True:
            ident, *frames = self.sock.recv_multipart()
            message = Message.parse(frames)
            if message.command is command:
                return ident, message

    def send(self, ident: bytes, message: Message) -> None:
        self.sock.send_multipart([ident, *message.frames()])

    def accept(self) -> bytes:
        """Take an INFORM, ACK it; the scheduler's identity."""
        ident, inform = self.recv(Command.INFORM)
        self.send(ident, Message.new(Command.ACK, inform.msgid))
        return ident


@pytest.mark.timeout(30)
def test_ticks_missed_while_the_router_is_gone_run_once_when_it_is_back():
    """The router dies (its socket closes) and comes back on its port before
    the scheduler takes it for gone: the ticks that fell due meanwhile are
    not queued in the scheduler's socket and delivered in a burst; they run
    once, and the schedule goes on on its grid."""
    context = zmq.Context()
    router = FakeRouter(context, free_port())
    scheduler = Scheduler(settings=Settings(heartbeat_timeout=60, heartbeat_interval=1),
                          context=context, addr=router.addr)
    try:
        scheduler.start()
        with gevent.Timeout(20):
            ident = router.accept()
            anchor = time.time()  # the grid: anchor + 1, + 2, ...
            router.send(ident, Message.new(Command.SCHEDULE, "q", "nohaste", "1", PAYLOAD, ""))
            router.recv(Command.REQUEST)  # + 1
            router.sock.close(linger=0)
            while time.time() < anchor + 3.3:  # + 2 and + 3 fall due meanwhile
                gevent.sleep(0.05)
            router.sock = router.open()
            runs = []
            while time.time() < anchor + 5.7:  # the missed ones, then the grid
                if router.sock.poll(50):
                    frames = router.sock.recv_multipart()
                    if Message.parse(frames[1:]).command is Command.REQUEST:
                        runs.append(round(time.time() - anchor, 2))
        # + 2 and + 3 missed: one run, no burst; then the grid's ticks (+ 4
        # unless the catch-up came less than half a second before it, + 5)
        assert len([t for t in runs if t < 3.95]) == 1, f"runs at {runs}"
        assert all(abs(t - round(t)) < 0.15 for t in runs[1:]), f"runs at {runs}"
        assert all(b - a > 0.45 for a, b in zip(runs, runs[1:])), f"runs at {runs}"
        assert runs[-1] > 4.85 and scheduler.counts["fired"] == 1 + len(runs)
    finally:
        scheduler.stop(2)
        router.sock.close(linger=0)
        context.term()


@pytest.mark.timeout(30)
def test_a_guaranteed_run_never_acknowledged_is_fired_again_on_reconnect():
    """A guaranteed delayed job fired into a router that died before it
    acknowledged it: fired again when the scheduler is connected again (it
    was kept on disk only, never fired until the scheduler restarted), under
    the same msgid: a router that holds it, or ran it, confirms it and does
    not run it again (a router stopped past the scheduler's patience read
    the first firing from the old connection and ran both)."""
    context = zmq.Context()
    router = FakeRouter(context, free_port())
    scheduler = Scheduler(settings=Settings(), context=context, addr=router.addr)
    body = ("q", f"guarantee,run_count:1,nohaste,eta:{time.time() - 1:.3f},delay-id:g1",
            "1", PAYLOAD, "")
    try:
        scheduler.start()
        with gevent.Timeout(20):
            ident = router.accept()
            router.send(ident, Message.new(Command.SCHEDULE, *body))
            _, first = router.recv(Command.REQUEST)  # not acknowledged: the router dies
            router.send(ident, Message.new(Command.KBYE))  # a new router's KBYE
            router.accept()
            _, again = router.recv(Command.REQUEST)
        assert again.body == first.body and again.msgid == first.msgid
    finally:
        scheduler.stop(2)
        router.sock.close(linger=0)
        context.term()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("interval, headers, cron", [
    ("0.5", "", ""), ("5.0", "", ""), ("1e3", "", ""),  # EventMQ's int() dies on these
    ("-1", "eta:2000000000,run_count:1", ""),  # -1 is cron to it; no cron text kills it
])
def test_what_eventmq_s_scheduler_dies_on_is_refused_before_any_scheduler(
        side, interval, headers, cron):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval=interval, headers=headers, cron=cron)
    assert sockets.to(b"s1", Command.SCHEDULE) == []
    (refusal,) = sockets.to(b"client", Command.REPLY)
    assert '"refused": "refused_malformed"' in refusal.body[0]
    assert side.counts["refused_malformed"] == 1 and KEY not in side.live


@pytest.mark.timeout(10)
@pytest.mark.parametrize("interval", ["0", "0.01", "-2"])
def test_an_interval_under_a_second_is_refused_with_the_router_s_own_bound(side, interval):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval=interval)
    assert sockets.to(b"s1", Command.SCHEDULE) == []
    (refusal,) = sockets.to(b"client", Command.REPLY)
    assert "must be 1 to" in refusal.body[0], refusal.body[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("headers, forwarded", [
    ("run_count:2", "run_count:2,nohaste"),  # its first run at once killed EventMQ's
    ("", ""),  # no run_count: EventMQ's scheduler fires it at once without dying
    ("run_count:2,nohaste", "run_count:2,nohaste"),
])
def test_a_cron_schedule_with_run_count_is_forwarded_with_nohaste(side, headers, forwarded):
    side, sockets = side
    inform(side, b"s1")
    schedule(side, interval="-1", cron="*/5 * * * *", headers=headers)
    (sent,) = sockets.to(b"s1", Command.SCHEDULE)
    assert sent.body == ("other", forwarded, "-1", PAYLOAD, "*/5 * * * *")
    assert side.live[KEY].body == sent.body  # and so it is handed over


@pytest.mark.timeout(10)
def test_a_cron_schedule_whose_counted_runs_were_seen_is_still_dropped_once_unscheduled(side):
    """EventMQ's scheduler counts no runs of a cron schedule and fires it on:
    the router had forgotten it after run_count firings, and its UNSCHEDULE
    then let the firings through for ever."""
    side, _ = side
    inform(side, b"s1")
    schedule(side, interval="-1", cron="*/5 * * * *", headers="run_count:1,nohaste")
    assert side.vet_firing(b"s1", firing("default")) is not None
    assert KEY not in side.live  # its one counted run seen
    assert side.vet_firing(b"s1", firing("default")) is not None  # fired on, as EventMQ
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "-1",
                                              PAYLOAD, "*/5 * * * *"))
    assert side.vet_firing(b"s1", firing("default")) is None
    assert side.counts["firing_dropped"] == 1


@pytest.mark.timeout(10)
def test_an_unschedule_of_a_call_with_delayed_runs_pending_lets_them_fire(side):
    """A delayed run has a key of its own (the call's and its delay-id): an
    UNSCHEDULE of the call does not name it, and its firing must pass."""
    side, _ = side
    inform(side, b"s1")
    schedule(side, interval="5", headers="run_count:1,nohaste,eta:2000000000,delay-id:d1")
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "1",
                                              PAYLOAD, ""))
    assert side.vet_firing(b"s1", firing("other")) is not None
    assert side.counts["firing_dropped"] == 0


@pytest.mark.timeout(20)
def test_unschedules_of_unknown_calls_take_no_place_in_the_cancelled_book(side):
    """Each took one, and 10,001 of them pushed a cron schedule's cancellation
    out: EventMQ's scheduler's firings of it ran again."""
    from emq_green.router import schedulers

    side, _ = side
    inform(side, b"s1")
    schedule(side, interval="-1", cron="*/5 * * * *")
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "-1",
                                              PAYLOAD, "*/5 * * * *"))
    for i in range(schedulers.MAX_CANCELLED + 1):
        other = json.dumps(["run", {**CALL, "args": [str(i)]}])
        side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "q", "", "1", other, ""))
    assert side.vet_firing(b"s1", firing("default")) is None
    # and a call never scheduled here is not dropped once unscheduled
    unknown = json.dumps(["run", {**CALL, "args": ["0"]}])
    passed = Message.new(Command.REQUEST, "q", "", unknown)
    assert side.vet_firing(b"s1", passed) is passed


@pytest.mark.timeout(30)
def test_a_router_that_only_acknowledges_firings_is_taken_for_gone():
    """EventMQ's router, restarted, ACKs nothing and sends no HEARTBEAT to a
    scheduler it does not know, but answers each firing with a REPLY: those
    kept the scheduler's silence timer fresh, so it never INFORMed again
    (its UNSCHEDULEs and new SCHEDULEs were dropped as sent to no scheduler)."""
    context = zmq.Context()
    router = FakeRouter(context, free_port())
    settings = Settings(heartbeat_timeout=1, heartbeat_interval=0.2, heartbeat_liveness=1)
    scheduler = Scheduler(settings=settings, context=context, addr=router.addr)
    try:
        scheduler.start()
        with gevent.Timeout(20):
            ident = router.accept()
            router.send(ident, Message.new(Command.SCHEDULE, "q", "nohaste", "1", PAYLOAD, ""))
            informed_again = None
            while informed_again is None:  # every firing acknowledged, nothing else
                sender, *frames = router.sock.recv_multipart()
                message = Message.parse(frames)
                if message.command is Command.REQUEST:
                    router.send(sender, Message.new(Command.REPLY, message.msgid))
                elif message.command is Command.INFORM:
                    informed_again = time.monotonic()
        assert scheduler.counts["fired"] >= 1 and scheduler.counts["reconnects"] >= 1
    finally:
        scheduler.stop(2)
        router.sock.close(linger=0)
        context.term()


@pytest.mark.timeout(10)
def test_an_unschedule_the_scheduler_never_got_is_sent_again_when_it_connects(side):
    """The only scheduler was killed (-9) or stopped when the UNSCHEDULE went
    out: the send failed (or the message died with its connection), and the
    scheduler, restarted on its file, fired the schedule for ever."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side)
    sockets.gone.add(b"s1")  # killed: the send fails
    side.on_unschedule(b"client", Message.new(Command.UNSCHEDULE, "other", "", "1",
                                              PAYLOAD, ""))
    assert sockets.to(b"s1", Command.UNSCHEDULE) == []
    sockets.gone.clear()
    inform(side, b"s1")  # restarted, with the schedule restored from its file
    (again,) = sockets.to(b"s1", Command.UNSCHEDULE)
    assert schedule_key(again.body[3]) == KEY
    assert sockets.to(b"s1", Command.SCHEDULE)[1:] == []  # not handed back
    # a new SCHEDULE of the call ends that: a scheduler arriving next is
    # handed the schedule, and not told to drop it
    schedule(side)
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    inform(side, b"s2")
    assert len(sockets.to(b"s2", Command.SCHEDULE)) == 1
    assert sockets.to(b"s2", Command.UNSCHEDULE) == []


@pytest.mark.timeout(10)
def test_the_kbye_before_a_scheduler_s_inform_moves_nothing(side):
    """emq-green's scheduler says KBYE before each INFORM (for EventMQ's
    router); taken as leaving, its schedules went to the other scheduler at
    each reconnect, and its own copies were then unscheduled."""
    from emq_green.schedules import KBYE_CONNECTING

    side, sockets = side
    owner, other = two_schedulers_one_schedule(side)
    unscheduled = len(sockets.to(owner, Command.UNSCHEDULE))
    side.on_kbye(owner, Message.new(Command.KBYE, KBYE_CONNECTING))
    inform(side, owner)
    assert side.live[KEY].owner == owner
    assert sockets.to(other, Command.SCHEDULE) == []
    assert len(sockets.to(owner, Command.UNSCHEDULE)) == unscheduled
    # a plain KBYE still hands over
    side.on_kbye(owner, Message.new(Command.KBYE))
    assert side.live[KEY].owner == other


@pytest.mark.timeout(10)
def test_a_schedule_the_scheduler_refuses_is_handed_to_no_other(side, caplog):
    """A probe's find: emq-green-scheduler refused a SCHEDULE of a callable
    its allowed_callables did not list, but the router kept it in its book
    and, when that scheduler died, handed it to EventMQ's scheduler, which
    has no allowed list: the job ran. The scheduler now sends the refused
    schedule back as an UNSCHEDULE, and the router forgets it."""
    side, sockets = side
    inform(side, b"careful")
    schedule(side)
    [forwarded] = sockets.to(b"careful", Command.SCHEDULE)
    careful = Scheduler(settings=Settings(allowed_callables=("jobs_for_tests.*",)))
    back: list[Message] = []
    careful._send = lambda message: back.append(message) is None  # no socket here
    careful.on_schedule(forwarded)
    assert KEY not in careful.table.entries and careful.counts["refused"] == 1
    [unschedule] = back
    assert unschedule.command is Command.UNSCHEDULE and unschedule.body == forwarded.body
    side.on_unschedule(b"careful", unschedule)  # what the router reads from it
    inform(side, b"eventmq-scheduler")
    side.on_kbye(b"careful", Message.new(Command.KBYE))
    assert sockets.to(b"eventmq-scheduler", Command.SCHEDULE) == []
    assert KEY not in side.live
    # a refusal of a malformed one sends nothing back (there is nothing to forget)
    careful.on_schedule(Message.new(Command.SCHEDULE, "q", "", "nope", PAYLOAD, ""))
    assert len(back) == 1 and careful.counts["refused"] == 2


def test_refusals_in_a_flood_are_logged_at_most_a_burst_at_a_time(caplog):
    from emq_green.limits import LOG_BURST

    careful = Scheduler(settings=Settings(allowed_callables=("jobs_for_tests.*",)))
    careful._send = lambda message: True
    for n in range(LOG_BURST * 3):
        careful.on_schedule(Message.new(Command.SCHEDULE, "q", "", str(n + 1), PAYLOAD, ""))
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert careful.counts["refused"] == LOG_BURST * 3
    assert len(lines) <= LOG_BURST


@pytest.mark.timeout(10)
@pytest.mark.parametrize("headers, runs", [("run_count:2", 2),
                                           ("run_count:1,nohaste,delay-id:d1", 1)])
def test_a_schedule_that_ended_where_it_was_handed_runs_no_more_from_the_old_copy(
        side, headers, runs):
    """A probe's find: s1 killed (-9), its schedules handed to s2, which ran
    them to their end; s1 restarted on its file fired its own copies again
    (100 delayed jobs ran 148 times, run_count 10 ran 17): the router had
    forgotten the schedules once over. Now s1's firings are dropped, and s1
    is told to drop its copies when it connects again."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side, headers=headers)
    inform(side, b"s2")
    sockets.gone.add(b"s1")
    side.on_kbye(b"s1", Message.new(Command.KBYE))  # as when silence removes it
    assert len(sockets.to(b"s2", Command.SCHEDULE)) == 1
    for _ in range(runs):
        assert side.vet_firing(b"s2", firing("other")) is not None
    assert side.live == {}  # over
    sockets.gone.discard(b"s1")
    # back from a stop, it fires before it connects anew; restarted, after
    assert side.vet_firing(b"s1", firing("other")) is None
    inform(side, b"s1")
    (drop,) = sockets.to(b"s1", Command.UNSCHEDULE)
    assert drop.body[3] == PAYLOAD and drop.body[1] == headers
    assert side.vet_firing(b"s1", firing("other")) is None
    assert side.counts["firing_dropped_ended"] + side.counts["firing_dropped_not_holder"] == 2
    # the same call scheduled anew runs, wherever it lands
    schedule(side, headers=headers)
    owner = next(iter(side.live.values())).owner
    assert side.vet_firing(owner, firing("other")) is not None


@pytest.mark.timeout(10)
def test_a_delayed_job_fired_by_the_scheduler_it_was_taken_from_is_dropped(side):
    """s1 stopped (SIGSTOP) with a delayed job, which goes to s2; s1 wakes
    and fires it late, before s2 does: that firing is a copy (dropped), and
    s2's runs it."""
    side, sockets = side
    inform(side, b"s1")
    schedule(side, headers="run_count:1,nohaste,delay-id:d1")
    inform(side, b"s2")
    side.on_kbye(b"s1", Message.new(Command.KBYE))
    assert side.live[f"{KEY}:d1"].owner == b"s2"
    assert side.vet_firing(b"s1", firing("other")) is None
    assert side.vet_firing(b"s2", firing("other")) is not None
    assert side.live == {}


@pytest.mark.timeout(10)
def test_the_old_connection_of_a_scheduler_back_under_its_name_is_not_another_scheduler(side):
    """A scheduler that reconnects under its name (the router was stopped
    past its patience) takes the name over; what its old connection still
    sends comes under a name ZeroMQ makes up (a zero byte first). Taken for
    a scheduler of its own after two HEARTBEATs, its runs were dropped as
    not its holder's (a probe: 18 runs lost)."""
    side, sockets = side
    inform(side, b"sched")
    schedule(side)
    old = b"\x00k\x8bEi"
    for _ in range(2):
        side.on_heartbeat(old, Message.new(Command.HEARTBEAT, "1"))
    assert old not in side.schedulers and old not in side.firers
    assert [who for who, _m in sockets.sent if who == old] == []
    assert side.vet_firing(b"sched", firing("other")) is not None

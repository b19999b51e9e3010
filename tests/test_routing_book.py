"""The router's routing books (:mod:`emq_green.router.routing`), driven
directly: who gets a request, with many workers that hold no slot.

The router's behaviour on the wire is in test_router.py; these tests check
the policy and the bookkeeping behind it, including against a plain model
of the policy with random sequences of joins, READYs, picks and departures.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emq_green.router.routing import Routing, Worker

pytestmark = pytest.mark.timeout(120)


def new_routing() -> Routing:
    return Routing(default_queue="default", hwm=10, max_buffer_bytes=-1)


def take(routing: Routing, queue: str) -> Worker | None:
    """What the router does with a request: pick, then one slot fewer."""
    worker = routing.pick(queue)
    if worker is not None:
        worker.slots -= 1
    return worker


def test_heaviest_first_then_least_recently_picked():
    routing = new_routing()
    heavy = routing.add(b"heavy", [(20, "q")], 0.0)
    b = routing.add(b"b", [(10, "q")], 0.0)
    c = routing.add(b"c", [(10, "q")], 0.0)
    for worker, slots in ((heavy, 1), (b, 2), (c, 2)):
        for _ in range(slots):
            routing.give_slot(worker)
    order = [take(routing, "q") for _ in range(6)]
    assert [w.identity for w in order[:5]] == [b"heavy", b"b", b"c", b"b", b"c"]
    assert order[5] is None
    # a READY puts a worker back; the heavier one first when both have a slot
    routing.give_slot(c)
    routing.give_slot(heavy)
    assert take(routing, "q") is heavy and take(routing, "q") is c


def test_workers_without_a_slot_are_not_on_the_free_lists():
    # hostile workers that announce a queue and never say READY, and busy
    # ones: a pick meets none of them
    routing = new_routing()
    for n in range(2000):
        routing.add(f"idle-{n}".encode(), [(50, "q"), (50, "other")], 0.0)
    busy = [routing.add(f"busy-{n}".encode(), [(40, "q")], 0.0) for n in range(100)]
    for worker in busy:
        routing.give_slot(worker)
        assert take(routing, "q") is worker
    light = routing.add(b"light", [(10, "q")], 0.0)
    routing.give_slot(light)
    book = routing.queues["q"]
    assert len(book) == 2101 and book.weights == [50, 40, 10]
    assert take(routing, "q") is light
    # the busy ones met on the way are dropped; the idle ones were never listed
    assert [len(book.free[w]) for w in book.weights] == [0, 0, 1]
    assert take(routing, "q") is None


def test_leaving_takes_a_worker_off_every_queue_and_forgets_empty_queues():
    routing = new_routing()
    a = routing.add(b"a", [(10, "x"), (20, "y")], 0.0)
    b = routing.add(b"b", [(10, "x")], 0.0)
    routing.give_slot(a)
    routing.give_slot(b)
    routing.remove(a)
    assert set(routing.queues) == {"x"} and list(routing.queues["x"].members) == [b"b"]
    assert routing.pick("y") is None and take(routing, "x") is b
    assert routing.show_workers()["connected_queues"] == {"x": [[10, "b"]]}
    routing.remove(b)
    assert routing.queues == {}


def test_a_queue_listed_twice_counts_at_its_heavier_weight():
    routing = new_routing()
    twice = routing.add(b"twice", [(5, "q"), (30, "q")], 0.0)
    other = routing.add(b"other", [(20, "q")], 0.0)
    routing.give_slot(other)
    routing.give_slot(twice)
    assert routing.queues["q"].members == {b"twice": 30, b"other": 20}
    assert take(routing, "q") is twice
    routing.remove(twice)
    assert routing.queues["q"].members == {b"other": 20}


def test_an_old_record_removed_late_leaves_the_new_one_alone():
    routing = new_routing()
    old = routing.add(b"w", [(10, "q")], 0.0)
    routing.remove(old)
    new = routing.add(b"w", [(10, "q")], 1.0)
    routing.give_slot(new)
    routing.remove(old)  # e.g. a second clean-up of the first record
    assert routing.workers[b"w"] is new and take(routing, "q") is new


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["join", "ready", "pick", "leave"]),
                          st.integers(0, 5), st.sampled_from(["a", "b", "c"]),
                          st.sampled_from([1, 10, 20])), max_size=80))
def test_a_pick_is_always_the_heaviest_worker_with_a_slot(steps):
    """Against a plain model: a pick returns a worker of ``queue`` with a
    free slot and, among those, one of the heaviest; None only when no
    worker of the queue has a slot."""
    routing = new_routing()
    model: dict[bytes, dict[str, int]] = {}  # identity -> queue -> weight
    for action, n, queue, weight in steps:
        identity = f"w{n}".encode()
        worker = routing.workers.get(identity)
        if action == "join":
            if worker is not None:
                routing.remove(worker)
            queues = [(weight, queue), (weight // 2 + 1, "b")]
            routing.add(identity, queues, 0.0)
            model[identity] = {}
            for w, name in queues:
                model[identity][name] = max(w, model[identity].get(name, 0))
        elif action == "ready" and worker is not None:
            routing.give_slot(worker)
        elif action == "leave" and worker is not None:
            routing.remove(worker)
            del model[identity]
        elif action == "pick":
            candidates = {i: q[queue] for i, q in model.items()
                          if queue in q and routing.workers[i].slots > 0}
            got = take(routing, queue)
            if not candidates:
                assert got is None
            else:
                assert got is not None and got.identity in candidates
                assert candidates[got.identity] == max(candidates.values())
        served = {name for q in model.values() for name in q}
        assert set(routing.queues) == served
        for name, book in routing.queues.items():
            assert book.members == {i: q[name] for i, q in model.items() if name in q}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["plain", "asked", "reply", "ready"]),
                          st.sampled_from(["job", "asked-job", "replied", "other", "random", ""]),
                          st.integers(0, 20)), max_size=120))
def test_a_ready_ends_at_most_one_plain_job_of_its_own_whatever_it_names(steps):
    """READYs from a worker (hostile or not) naming anything: one of its
    own plain jobs, one asked for, the one just replied, another worker's,
    random text, nothing. The books hold: each READY ends at most one plain
    job, only of that worker, the named one when it is one; never a job
    with reply-requested; the counts match the jobs in flight; the other
    worker's books are untouched."""
    from emq_green.router.routing import Request

    routing = new_routing()
    worker = routing.add(b"w", [(10, "q")], 0.0)
    other = routing.add(b"other", [(10, "q")], 0.0)
    theirs = Request("theirs", b"c", "q", ("q", "", "[]"), 0.0)
    routing.sent(other, theirs, "q", 0.0)
    n = 0
    for action, pick, index in steps:
        plain = [m for m, s in worker.in_flight.items() if not s.reply_requested]
        asked = [m for m, s in worker.in_flight.items() if s.reply_requested]
        if action in ("plain", "asked"):
            n += 1
            headers = "reply-requested" if action == "asked" else ""
            routing.sent(worker, Request(f"m{n}", b"c", "q", ("q", headers, "[]"), 0.0),
                         "q", 0.0)
            continue
        if action == "reply":
            if asked:  # what WorkerSide._settle does with a REPLY asked for
                msgid = asked[index % len(asked)]
                del worker.in_flight[msgid]
                del routing.holders[msgid]
                worker.last_replied = msgid
            continue
        named = {"job": plain[index % len(plain)] if plain else "",
                 "asked-job": asked[index % len(asked)] if asked else "",
                 "replied": worker.last_replied, "other": "theirs",
                 "random": f"x{index}", "": ""}[pick]
        before = dict(worker.in_flight)
        if worker.unreplied or worker.replied_unasked:  # as on_ready calls it
            routing.retire_oldest_unreplied(worker, named)
        ended = set(before) - set(worker.in_flight)
        assert set(worker.in_flight) <= set(before) and len(ended) <= 1
        assert all(not before[m].reply_requested for m in ended)
        if pick == "job" and named:
            assert ended == {named}
        if pick == "replied" and named:
            assert not ended
        assert worker.unreplied == sum(not s.reply_requested for s in worker.in_flight.values())
        assert worker.unreplied >= 0 and list(other.in_flight) == ["theirs"]
        assert all(routing.holders[m] is worker for m in worker.in_flight)
        assert routing.holders["theirs"] is other


@given(st.lists(st.tuples(st.sampled_from(["plain", "guaranteed", "take", "expire", "withdraw"]),
                          st.sampled_from(["a", "b", "c"]), st.integers(0, 40)),
                max_size=80))
@settings(max_examples=150, deadline=None)
def test_the_buffer_s_books_stay_true_whatever_leaves_it(steps):
    """Requests buffered, taken, withdrawn, and dropped when their results
    expire (guaranteed ones stay): the bytes, the msgid index and the full
    queues always match what is buffered, and no empty queue is kept."""
    from emq_green.router.routing import Request

    routing = Routing(default_queue="default", hwm=4, max_buffer_bytes=-1)
    model: dict[str, list[Request]] = {}
    made = 0
    for op, queue, pick in steps:
        if op in ("plain", "guaranteed"):
            made += 1
            request = Request(f"m{made}", b"client", queue, (queue, "", "x" * pick), 0.0,
                              guaranteed=op == "guaranteed")
            routing.buffer(queue, request)
            model.setdefault(queue, []).append(request)
        elif op == "take" and model.get(queue):
            routing.taken(queue)
            del routing.holders[model[queue].pop(0).msgid]  # (the router hands it out)
        elif op == "withdraw" and model.get(queue):
            request = model[queue].pop(pick % len(model[queue]))
            assert routing.withdraw(request)
        elif op == "expire":
            everything = [r for rs in model.values() for r in rs]
            expired = {r.msgid for r in everything[: pick % 7]}
            dropped = routing.drop_unstarted(expired)
            assert dropped == {r.msgid for r in everything[: pick % 7] if not r.guaranteed}
            for name in model:
                model[name] = [r for r in model[name] if r.msgid not in dropped]
        model = {name: rs for name, rs in model.items() if rs}
        assert {name: list(rs) for name, rs in routing.waiting.items()} == model
        buffered = [r for rs in model.values() for r in rs]
        assert routing.buffered_bytes == sum(r.size for r in buffered)
        assert {m for m, w in routing.holders.items() if w is None} == {r.msgid for r in buffered}
        assert routing._full_queues <= set(model)

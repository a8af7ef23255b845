"""KV events from the tier manager: what each change emits, in order; snapshots; the bound
on watchers; a full watcher queue drops events and says where the loss began."""

from __future__ import annotations

import threading

import pytest

from kvstore.errors import ResourceExhausted, Unavailable
from kvstore.events import EventHub, EventKind, KVEvent, Watcher
from kvstore.store import Store
from kvstore.v1 import kvstore_pb2 as pb
from tests.test_store import CPU_SLOTS, NS, MakeStore, key, put, read, value


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


def watcher(capacity: int = 1000, glob: str = "*", may_read=lambda ns: True) -> Watcher:  # type: ignore[no-untyped-def]
    return Watcher(glob, may_read, capacity, lambda: None)


def stream(store: Store, w: Watcher, step: int = 7) -> list[KVEvent]:
    """What the server would send: snapshot steps and the queue, until the snapshot ends."""
    out: list[KVEvent] = []
    while True:
        if w.snapshotting:
            store.watch_step(w, step)
        events, lost = w.take()
        assert lost == 0
        out += events
        if not w.snapshotting:
            return out


def replay(events: list[KVEvent]) -> dict[tuple[str, bytes], tuple[str, ...]]:
    """A reader's view: every event from the last SNAPSHOT_BEGIN on, in order."""
    begin = max(i for i, e in enumerate(events) if e.kind == EventKind.SNAPSHOT_BEGIN)
    view: dict[tuple[str, bytes], tuple[str, ...]] = {}
    for e in events[begin + 1 :]:
        if e.kind in (EventKind.SNAPSHOT_END, EventKind.GAP):
            continue
        view[(e.namespace, e.key)] = e.tiers
    return {k: t for k, t in view.items() if t}


def index_of(store: Store) -> dict[tuple[str, bytes], tuple[str, ...]]:
    return {(e.namespace, e.key): e.tiers for e in store.entries()}


def changes(w: Watcher) -> list[tuple[EventKind, int, str, tuple[str, ...]]]:
    events, lost = w.take()
    assert lost == 0
    return [(e.kind, int.from_bytes(e.key, "big"), e.tier, e.tiers) for e in events]


def test_event_kinds_match_the_wire() -> None:
    assert {k.name: k.value for k in EventKind} == {
        name: value for name, value in pb.KVEvent.Kind.items() if value
    }


def test_put_evict_promote_delete_emit_in_order_with_increasing_seq(store: Store) -> None:
    w = watcher()
    store.watch(w, snapshot=False)
    for i in range(CPU_SLOTS + 1):  # the last put demotes key 0 to ssd
        put(store, key(i), value(i))
    assert read(store, key(0)) is not None  # promoted back
    store.delete(NS, [key(1)])
    events, _ = w.take()
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] == 1
    got = [(e.kind, int.from_bytes(e.key, "big"), e.tier, e.tiers) for e in events]
    stored = [(EventKind.STORED, i, "cpu", ("cpu",)) for i in range(CPU_SLOTS)]
    assert got[:CPU_SLOTS] == stored
    assert got[CPU_SLOTS : CPU_SLOTS + 2] == [
        (EventKind.DEMOTED, 0, "ssd", ("ssd",)),
        (EventKind.STORED, CPU_SLOTS, "cpu", ("cpu",)),
    ]
    # Reading key 0 back into a full cpu tier evicts the least recent (key 1) to ssd first.
    assert got[CPU_SLOTS + 2 :] == [
        (EventKind.DEMOTED, 1, "ssd", ("ssd",)),
        (EventKind.PROMOTED, 0, "cpu", ("cpu", "ssd")),
        (EventKind.DELETED, 1, "", ()),
    ]
    assert all(e.nbytes == len(value(0)) and e.namespace == NS for e in events)


def test_ssd_eviction_and_cpu_eviction_of_a_copy_on_ssd(make_store: MakeStore) -> None:
    store = make_store(ssd_bytes=3 << 20)  # ssd holds two values
    w = watcher()
    store.watch(w, snapshot=False)
    for i in range(CPU_SLOTS + 3):
        put(store, key(i), value(i))
    got = changes(w)
    assert (EventKind.EVICTED, 0, "ssd", ()) in got  # the oldest fell off the last tier
    held: dict[int, tuple[str, ...]] = {}
    for _, k, _, tiers in got:
        held[k] = tiers
    index = {int.from_bytes(e.key, "big"): e.tiers for e in store.entries(NS)}
    assert {k: t for k, t in held.items() if t} == index  # events replay to the index


def test_snapshot_then_live_events_lose_nothing(store: Store) -> None:
    for i in range(3):
        put(store, key(i), value(i), "other/ns")  # not watched
    for i in range(40):
        put(store, key(i), value(i, 4096))
    w = watcher(glob=NS)
    stop = threading.Event()

    def writer() -> None:  # replaces, deletes and evicts while the snapshot streams
        i = 40
        while not stop.is_set():
            put(store, key(i % 50), value(i, 4096 if i % 7 else 1 << 20))
            store.delete(NS, [key((i * 13) % 50)])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        store.watch(w, snapshot=True)
        events = stream(store, w, step=3)
    finally:
        stop.set()
        t.join()
    events += w.take()[0]
    kinds = [e.kind for e in events]
    assert kinds[0] == EventKind.SNAPSHOT_BEGIN and kinds.count(EventKind.SNAPSHOT_END) == 1
    live = [
        e
        for e in events
        if e.kind not in (EventKind.SNAPSHOT, EventKind.SNAPSHOT_BEGIN, EventKind.SNAPSHOT_END)
    ]
    assert live, "the writer's changes interleave with the snapshot"
    assert [e.seq for e in live] == sorted({e.seq for e in live})
    assert replay(events) == {k: t for k, t in index_of(store).items() if k[0] == NS}


def test_a_snapshot_streams_within_the_queue_bound(store: Store) -> None:
    for i in range(100):
        put(store, key(i), value(i, 1024))
    w = watcher(capacity=16)
    store.watch(w, snapshot=True)
    store.watch_step(w, 1000)
    first, lost = w.take()
    assert len(first) == 16 and lost == 0  # BEGIN and 15 entries, not 100
    events = first + stream(store, w, step=1000)
    assert replay(events) == index_of(store)


def test_a_full_queue_drops_events_and_reports_where_the_loss_began(store: Store) -> None:
    w = watcher(capacity=2)
    store.watch(w, snapshot=False)
    for i in range(3):
        put(store, key(i), value(i))
    events, lost = w.take()
    assert [e.seq for e in events] == [1, 2] and lost == 3
    assert w.dropped == 1 and store.events.dropped == 1
    put(store, key(9), value(9))  # queuing resumes after the loss was taken
    events, lost = w.take()
    assert [e.seq for e in events] == [4] and lost == 0


def test_watchers_see_only_their_glob_and_what_they_may_read(store: Store) -> None:
    mine = watcher(glob="team-a/*")
    readable = watcher(may_read=lambda ns: ns.startswith("team-b/"))
    store.watch(mine, snapshot=False)
    store.watch(readable, snapshot=False)
    for ns in ("team-a/m", "team-b/m", "team-c/m"):
        put(store, key(1), value(1), ns)
    assert [e.namespace for e in mine.take()[0]] == ["team-a/m"]
    assert [e.namespace for e in readable.take()[0]] == ["team-b/m"]
    only_c = watcher(glob="team-c/*")
    store.watch(only_c, snapshot=True)
    assert [(e.kind, e.namespace) for e in stream(store, only_c)] == [
        (EventKind.SNAPSHOT_BEGIN, ""),
        (EventKind.SNAPSHOT, "team-c/m"),
        (EventKind.SNAPSHOT_END, ""),
    ]


def test_the_number_of_watchers_is_bounded_and_closing_ends_them() -> None:
    hub = EventHub(max_watchers=2)
    woken: list[int] = []
    ws = [Watcher("*", lambda ns: True, 8, lambda i=i: woken.append(i)) for i in range(3)]
    hub.subscribe(ws[0], None)
    hub.subscribe(ws[1], None)
    hub.subscribe(ws[1], None)  # again (a resync) is not another watcher
    with pytest.raises(ResourceExhausted, match="max-watchers 2"):
        hub.subscribe(ws[2], None)
    hub.unsubscribe(ws[0])
    ws[0].close()  # a stream that ended while its subscription was on its way
    with pytest.raises(Unavailable):
        hub.subscribe(ws[0], None)
    assert ws[0] not in hub.watchers
    hub.subscribe(ws[2], None)
    hub.close()
    assert sorted(woken) == [0, 1, 2] and ws[1].closed and ws[2].closed
    with pytest.raises(Unavailable):
        hub.subscribe(ws[0], None)


def test_nobody_watching_costs_no_event(store: Store) -> None:
    put(store, key(1), value(1))
    assert store.events.seq == 0

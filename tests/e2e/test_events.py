"""KV events (Watch) from a real server: order and sequence numbers, snapshot then live with
nothing lost, a slow watcher neither blocks puts nor grows without bound (GAP, resync),
tenant filtering, the bound on watchers, and the end of streams at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvstore.auth import mint_token, token_hash
from kvstore.client import AsyncKVClient, KVClient
from kvstore.client._watch import WatchStream
from kvstore.errors import ResourceExhausted, Unauthenticated, Unavailable
from kvstore.events import EventKind, KVEvent
from tests.e2e.conftest import NAMESPACE, ServerProcess
from tests.e2e.helpers import key
from tests.e2e.test_metrics import free_port, scrape, value
from tests.e2e.test_security import A_NS, B_NS, Tenants

MiB = 1 << 20
LIVE = {
    EventKind.STORED,
    EventKind.PROMOTED,
    EventKind.DEMOTED,
    EventKind.EVICTED,
    EventKind.DELETED,
}
EVENT_WAIT_S = 20.0


class Reader:
    """Reads a watch stream on a thread; `until(pred)` returns the events up to the first
    that satisfies `pred`."""

    def __init__(self, stream: WatchStream) -> None:
        self.stream = stream
        self.events: queue.Queue[KVEvent | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for e in self.stream:
                self.events.put(e)
        except BaseException as exc:
            self.events.put(exc)

    def until(self, pred: Callable[[KVEvent], bool]) -> list[KVEvent]:
        out: list[KVEvent] = []
        deadline = time.monotonic() + EVENT_WAIT_S
        while True:
            item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, BaseException):
                raise item
            out.append(item)
            if pred(item):
                return out

    def close(self) -> None:
        self.stream.close()
        self.thread.join(10)


@pytest.fixture
def small(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A cpu tier of exactly four 1 MiB values above 64 MiB of ssd, without the ssd writer:
    each eviction writes its value then, so the events come in one order."""
    return start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--ssd-write-ahead", "0")


def mib(i: int) -> torch.Tensor:
    return torch.full((MiB,), i % 251, dtype=torch.uint8)


def is_key(k: bytes, kind: EventKind) -> Callable[[KVEvent], bool]:
    return lambda e: e.key == k and e.kind == kind


def test_put_evict_promote_delete_arrive_in_order(small: ServerProcess) -> None:
    with small.client() as c:
        reader = Reader(c.watch())
        try:
            start = reader.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            assert [e.kind for e in start] == [EventKind.SNAPSHOT_BEGIN, EventKind.SNAPSHOT_END]
            for i in range(5):  # the fifth evicts key 0 from cpu to ssd
                c.put(key(i), mib(i))
            assert c.get(key(0)) is not None  # promoted back, demoting key 1
            assert c.delete([key(1)]) == 1
            events = reader.until(is_key(key(1), EventKind.DELETED))
        finally:
            reader.close()
    got = [(e.kind, e.key, e.tier, e.tiers) for e in events]
    assert got == [
        *[(EventKind.STORED, key(i), "cpu", ("cpu",)) for i in range(4)],
        (EventKind.DEMOTED, key(0), "ssd", ("ssd",)),
        (EventKind.STORED, key(4), "cpu", ("cpu",)),
        (EventKind.DEMOTED, key(1), "ssd", ("ssd",)),
        (EventKind.PROMOTED, key(0), "cpu", ("cpu", "ssd")),
        (EventKind.DELETED, key(1), "", ()),
    ]
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1))
    assert len({e.instance for e in events + start}) == 1
    assert all(e.namespace == NAMESPACE and e.nbytes == MiB for e in events)


def test_the_ssd_writer_copies_ahead_and_eviction_then_only_drops(
    start_server: Callable[..., ServerProcess],
) -> None:
    """With the ssd writer, a value eviction takes next is copied to ssd while it stays in
    cpu (DEMOTED, tiers cpu and ssd); evicting it later only drops the cpu copy."""
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--ssd-write-ahead", "0.25")
    with srv.client() as c:
        reader = Reader(c.watch())
        try:
            reader.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            for i in range(4):  # the tier is full: key 0, the oldest, is copied ahead
                c.put(key(i), mib(i))
            ahead = reader.until(is_key(key(0), EventKind.DEMOTED))[-1]
            c.put(key(4), mib(4))  # evicts key 0, already on ssd
            evicted = reader.until(is_key(key(0), EventKind.EVICTED))[-1]
        finally:
            reader.close()
        assert (ahead.tier, ahead.tiers) == ("ssd", ("cpu", "ssd"))
        assert (evicted.tier, evicted.tiers) == ("cpu", ("ssd",))
        got = c.get(key(0))
        assert got is not None and torch.equal(got, mib(0))


def _state(events: list[KVEvent]) -> dict[bytes, tuple[str, ...]]:
    """A reader's view: every event from the last SNAPSHOT_BEGIN on, in order."""
    begin = max(i for i, e in enumerate(events) if e.kind == EventKind.SNAPSHOT_BEGIN)
    held: dict[bytes, tuple[str, ...]] = {}
    for e in events[begin + 1 :]:
        if e.kind in (EventKind.SNAPSHOT_END, EventKind.GAP):
            continue
        held[e.key] = e.tiers
    return {k: t for k, t in held.items() if t}


def test_snapshot_then_live_events_lose_nothing(server: ServerProcess) -> None:
    small_value = torch.zeros(1024, dtype=torch.uint8)
    with server.client() as c, server.client() as writer_client:
        for i in range(200):
            c.put(key(i), small_value)
        stop = threading.Event()

        def writer() -> None:
            i = 200
            while not stop.is_set():
                writer_client.put(key(i), small_value)
                if i % 3 == 0:
                    writer_client.delete([key(i - 150)])
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.2)
        reader = Reader(c.watch())  # while the writer puts and deletes
        try:
            snapshot = reader.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            time.sleep(0.3)
            stop.set()
            t.join()
            c.put(b"S" * 32, small_value)  # the last change: its event closes the stream
            live = reader.until(is_key(b"S" * 32, EventKind.STORED))
        finally:
            stop.set()
            reader.close()
        listed = {e.header.key: (e.tier,) for e in c.entries()}
    assert sum(e.kind == EventKind.SNAPSHOT for e in snapshot) > 150
    changes = [e for e in snapshot + live if e.kind in LIVE]
    assert len(changes) > 10
    assert [e.seq for e in changes] == list(range(changes[0].seq, changes[0].seq + len(changes)))
    assert {k: t[:1] for k, t in _state(snapshot + live).items()} == listed


def test_a_slow_watcher_does_not_block_puts_and_gets_a_gap_then_a_snapshot(
    start_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    srv = start_server(
        "--cpu-bytes", "64MiB", "--watch-queue-events", "16",
        "--metrics-listen", f"127.0.0.1:{port}",
    )  # fmt: skip
    tiny = torch.zeros(64, dtype=torch.uint8)
    with srv.client() as c:
        stream = c.watch()  # opened, then not read while the puts go on
        it = iter(stream)
        assert [next(it).kind, next(it).kind] == [EventKind.SNAPSHOT_BEGIN, EventKind.SNAPSHOT_END]
        started = time.monotonic()
        n = 5000
        for b in range(0, n, 500):
            c.batch_put([key(i) for i in range(b, b + 500)], [tiny] * 500)
        took = time.monotonic() - started
        c.put(b"S" * 32, tiny)
        events: list[KVEvent] = []
        building = seen_last = False
        for e in it:
            events.append(e)
            if e.kind in (EventKind.SNAPSHOT_BEGIN, EventKind.SNAPSHOT_END):
                building = e.kind == EventKind.SNAPSHOT_BEGIN
            seen_last = seen_last or e.key == b"S" * 32
            if seen_last and not building:
                break
        stream.close()
        listed = {e.header.key for e in c.entries()}
    gaps = [i for i, e in enumerate(events) if e.kind == EventKind.GAP]
    assert gaps, "a watcher that fell behind must get a GAP"
    for i in gaps:  # each gap is followed by a fresh snapshot
        assert events[i + 1].kind == EventKind.SNAPSHOT_BEGIN
    stored = sum(e.kind == EventKind.STORED for e in events)
    assert stored < n  # events were lost, not buffered without bound
    assert set(_state(events)) == listed  # the resync makes the state whole
    dropped = value(scrape(port), "kvstore_watch_events_dropped_total")
    assert dropped > 0
    assert took < 30, took


def test_a_tenant_watches_only_what_it_may_read(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    tenants = Tenants(tmp_path / "tokens.toml")
    srv = start_server("--cpu-bytes", "64MiB", "--auth-tokens", str(tenants.path))
    tiny = torch.zeros(64, dtype=torch.uint8)
    with (
        KVClient(srv.address, A_NS, token=tenants.token["a"]) as a,
        KVClient(srv.address, B_NS, token=tenants.token["b"]) as b,
    ):
        b.put(key(1), tiny)
        everything = Reader(a.watch("*"))
        others = Reader(a.watch("tenant-b/*"))
        try:
            snap = everything.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            # b's key is hidden
            assert [e.kind for e in snap] == [EventKind.SNAPSHOT_BEGIN, EventKind.SNAPSHOT_END]
            others.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            b.put(key(2), tiny)
            a.put(key(3), tiny)
            seen = everything.until(is_key(key(3), EventKind.STORED))
            assert [(e.namespace, e.key) for e in seen] == [(A_NS, key(3))]
            assert others.events.empty()
        finally:
            everything.close()
            others.close()


def test_a_watch_follows_the_tokens_file_when_it_is_reloaded(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    tenants = Tenants(tmp_path / "tokens.toml")
    base = tenants.path.read_text()
    token, _ = mint_token("w", ["*"], [])

    def grant(*read: str) -> None:
        """Tenant w (`token`) may read `read`; with none, w is not in the file."""
        entry = f'[[tenants]]\nname = "w"\ntokens = ["{token_hash(token)}"]\n'
        entry += f"read = {json.dumps(list(read))}\n"
        tenants.path.write_text(base + "\n" + (entry if read else ""))

    grant("tenant-a/*", "tenant-b/*")
    srv = start_server("--cpu-bytes", "64MiB", "--auth-tokens", str(tenants.path))
    tiny = torch.zeros(64, dtype=torch.uint8)
    with (
        KVClient(srv.address, A_NS, token=tenants.token["a"]) as a,
        KVClient(srv.address, B_NS, token=tenants.token["b"]) as b,
        KVClient(srv.address, A_NS, token=token) as w,
    ):
        watch = Reader(w.watch("*"))
        try:
            watch.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            a.put(key(1), tiny)
            b.put(key(2), tiny)
            seen = watch.until(is_key(key(2), EventKind.STORED))
            assert {e.namespace for e in seen} == {A_NS, B_NS}

            grant("tenant-a/*")  # w may no longer read tenant-b
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGHUP)
            resync = watch.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
            kinds = [e.kind for e in resync]
            assert EventKind.GAP in kinds
            snap = resync[kinds.index(EventKind.SNAPSHOT_BEGIN) :]
            assert [(e.namespace, e.key) for e in snap if e.kind == EventKind.SNAPSHOT] == [
                (A_NS, key(1))
            ]
            b.put(key(3), tiny)
            a.put(key(4), tiny)
            seen = watch.until(is_key(key(4), EventKind.STORED))
            assert [(e.namespace, e.key) for e in seen] == [(A_NS, key(4))]

            grant()  # w is gone from the file: its stream ends
            srv.proc.send_signal(signal.SIGHUP)
            with pytest.raises(Unauthenticated, match="revoked"):
                watch.until(lambda e: False)
        finally:
            watch.close()
        assert a.exists([key(1), key(4)]) == [True, True]  # the server serves on


def test_watchers_are_bounded_and_end_with_unavailable_at_shutdown(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server("--cpu-bytes", "64MiB", "--max-watchers", "2")
    with srv.client() as c:
        readers = [Reader(c.watch(snapshot=False)) for _ in range(2)]
        for r in readers:  # both are registered once one event reaches each
            c.put(key(0), torch.zeros(64, dtype=torch.uint8))
            r.until(lambda e: e.kind == EventKind.STORED)
        with pytest.raises(ResourceExhausted, match="max-watchers 2"):
            next(iter(c.watch()))
        readers[0].close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the cancelled stream shortly
            try:
                third = Reader(c.watch())
                third.until(lambda e: e.kind == EventKind.SNAPSHOT_END)
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 4  # streams do not hold up the drain (grace 5s)
        for r in (readers[1], third):
            with pytest.raises(Unavailable):
                r.until(lambda e: False)


def test_the_async_client_watches(server: ServerProcess) -> None:
    async def main() -> list[KVEvent]:
        async with AsyncKVClient(server.address, NAMESPACE) as c:
            got: list[KVEvent] = []
            async with contextlib.aclosing(c.watch()) as events:
                async for e in events:
                    got.append(e)
                    if e.kind == EventKind.SNAPSHOT_END:
                        await c.put(key(7), torch.zeros(64, dtype=torch.uint8))
                    if e.kind == EventKind.STORED:
                        break
            return got

    events = asyncio.run(main())
    assert [(e.kind, e.key) for e in events] == [
        (EventKind.SNAPSHOT_BEGIN, b""),
        (EventKind.SNAPSHOT_END, b""),
        (EventKind.STORED, key(7)),
    ]

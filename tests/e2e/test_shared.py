"""Same-host reads in place from the host arena: SharedSlices, leases, release, reclaim."""

from __future__ import annotations

import contextlib
import socket
import time

import grpc
import numpy as np
import pytest
import torch

from kvstore.client import KVClient
from kvstore.errors import KVStoreError
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire import GRPC_OPTIONS

NS = "test/shared"
MiB = 1 << 20


def key(i: int) -> bytes:
    return b"S" + i.to_bytes(4, "little") + bytes(27)


def value(i: int, nbytes: int = MiB) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def stub(server):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVStoreStub(channel)


def answers(stream):  # type: ignore[no-untyped-def]
    """The GetPieces of a Get/BatchGet stream, with batched answers taken apart."""
    for piece in stream:
        yield from piece.batch or (piece,)


def read_arena(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(nbytes)


def test_shared_get_hands_out_a_slice_under_a_lease(server, stub) -> None:  # type: ignore[no-untyped-def]
    with server.client(NS) as c:
        c.put(key(1), value(1))
        stats = c.stats()
    pieces = list(answers(stub.Get(pb.GetRequest(namespace=NS, key=key(1), shared=True))))
    assert len(pieces) == 1
    piece = pieces[0]
    assert piece.found and piece.HasField("shared") and not piece.data
    ref = piece.shared
    assert (ref.arena_dev, ref.arena_ino) == (stats.host_arena_dev, stats.host_arena_ino)
    assert read_arena(stats.host_arena_path, ref.offset, MiB) == value(1).numpy().tobytes()
    with server.client(NS) as c:
        assert c.stats().leases == 1
        # While the lease is held, replacing the key leaves the leased bytes untouched.
        c.put(key(1), value(2))
        assert read_arena(stats.host_arena_path, ref.offset, MiB) == value(1).numpy().tobytes()
        assert stub.Release(pb.ReleaseRequest(leases=[ref.lease])).count == 1
        assert stub.Release(pb.ReleaseRequest(leases=[ref.lease])).count == 0  # once only
        assert c.stats().leases == 0
        assert torch.equal(c.get(key(1)), value(2))


def test_unreleased_leases_are_reclaimed(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--lease-seconds", "0.5")
    with srv.client(NS) as c, grpc.insecure_channel(srv.address) as channel:
        c.put(key(1), value(1))
        stub = pb_grpc.KVStoreStub(channel)
        piece = next(answers(stub.Get(pb.GetRequest(namespace=NS, key=key(1), shared=True))))
        assert piece.HasField("shared")
        assert c.stats().leases == 1  # a client that died holding it...
        assert wait_for(lambda: c.stats().leases == 0, timeout=5)  # ...loses it
        for i in range(2, 12):  # and the value is evictable again
            c.put(key(i), value(i))
        assert c.stats().tiers["cpu"].evictions > 0
        assert torch.equal(c.get(key(1)), value(1))


def test_client_reads_in_place_and_releases(server) -> None:  # type: ignore[no-untyped-def]
    with server.client(NS) as c:
        ts = [value(i, (i + 1) * 300_000) for i in range(4)]
        c.batch_put([key(i) for i in range(4)], ts)
        got = c.batch_get([key(i) for i in range(4)] + [key(99)])
        assert all(torch.equal(g, t) for g, t in zip(got, ts, strict=False))
        assert got[4] is None
        assert c._core._arena is not None  # the same-host path was taken
        assert wait_for(lambda: c.stats().leases == 0)


def test_client_remaps_after_a_server_restart(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "64MiB")
    with srv.client(NS) as c:
        c.put(key(1), value(1))
        assert torch.equal(c.get(key(1)), value(1))
        old = c._core._arena
        assert old is not None
        srv.restart()  # a new arena file: the client's mapping is of the old one
        c.put(key(2), value(2))
        assert torch.equal(c.get(key(2)), value(2))
        assert torch.equal(c.get(key(1)), value(1))  # persisted at shutdown, promoted again
        assert c._core._arena is not None and c._core._arena is not old
        assert wait_for(lambda: c.stats().leases == 0)


def test_tcp_clients_and_ssd_values_get_streamed_bytes(start_server) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = start_server(
        "--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--listen", f"127.0.0.1:{port}"
    )
    with KVClient(f"127.0.0.1:{port}", NS) as remote:
        remote.put(key(1), value(1))
        assert torch.equal(remote.get(key(1)), value(1))
        assert remote._core._arena is None  # not same-host: bytes on the wire
    big = value(3, 6 * MiB)  # larger than a cpu page: lives on ssd only, served staged
    with srv.client(NS) as c:
        c.put(key(3), big)
        pieces = list(
            pb_grpc.KVStoreStub(grpc.insecure_channel(srv.address, options=GRPC_OPTIONS)).Get(
                pb.GetRequest(namespace=NS, key=key(3), shared=True)
            )
        )
        assert not pieces[0].HasField("shared") and pieces[0].tier == "ssd"
        data = b"".join(p.data for p in pieces)
        assert np.array_equal(np.frombuffer(data, np.uint8), big.numpy())
        assert torch.equal(c.get(key(3)), big)


def corrupt_in_arena(srv, k: bytes, ns: str = NS) -> None:  # type: ignore[no-untyped-def]
    """Flip a byte of a cpu-resident value in the arena file, as bit rot in RAM would."""
    with srv.client(ns) as c, grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        path = c.stats().host_arena_path
        stub = pb_grpc.KVStoreStub(ch)
        piece = next(answers(stub.Get(pb.GetRequest(namespace=ns, key=k, shared=True))))
        assert piece.HasField("shared")
        with open(path, "r+b") as fh:
            fh.seek(piece.shared.offset + 1234)
            byte = fh.read(1)
            fh.seek(piece.shared.offset + 1234)
            fh.write(bytes([byte[0] ^ 0xFF]))
        stub.Release(pb.ReleaseRequest(leases=[piece.shared.lease]))


def test_corrupt_shared_copy_is_reported_and_the_ssd_copy_served(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    with srv.client(NS) as c:
        for i in range(12):  # key 0..3 demoted to ssd
            c.put(key(i), value(i))
        assert torch.equal(c.get(key(0)), value(0))  # promoted: now on cpu and on ssd
        corrupt_in_arena(srv, key(0))
        assert torch.equal(c.get(key(0)), value(0))  # reported, dropped, re-read from ssd
        assert c.stats().tiers["cpu"].promotions == 2
        assert wait_for(lambda: c.stats().leases == 0)


def test_corrupt_only_copy_is_data_loss_then_gone(start_server) -> None:  # type: ignore[no-untyped-def]
    from kvstore.errors import DataLoss

    srv = start_server("--tiers", "cpu", "--cpu-bytes", "8MiB")
    with srv.client(NS) as c:
        c.put(key(1), value(1))
        c.put(key(2), value(2))
        corrupt_in_arena(srv, key(1))
        with pytest.raises(DataLoss):
            c.get(key(1))
        assert c.get(key(1)) is None
        assert torch.equal(c.get(key(2)), value(2))
        assert wait_for(lambda: c.stats().leases == 0)


def test_concurrent_readers_survive_a_restart_and_a_crash(start_server) -> None:  # type: ignore[no-untyped-def]
    import signal
    import threading

    srv = start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "128MiB")
    errors: list[BaseException] = []
    stop = threading.Event()
    with srv.client(NS) as c:
        c.batch_put([key(i) for i in range(8)], [value(i) for i in range(8)])

        def reader(n: int) -> None:
            while not stop.is_set():
                try:
                    got = c.get(key(n % 8))
                    if got is not None:
                        assert torch.equal(got, value(n % 8))
                except KVStoreError:
                    pass  # the server is down for a moment: a clear error is fine
                except BaseException as exc:  # a closed map, a wrong byte: never fine
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            srv.restart()  # clean: values persisted to ssd, a new arena file
            time.sleep(0.5)
            srv.stop(signal.SIGKILL)  # crash: the next server must not reuse the inode
            srv.flags = ["--cpu-bytes", "128MiB", "--ssd-bytes", "128MiB"]  # and a new size
            srv.start()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not errors, errors[0]
        for i in range(8):  # all on ssd since the clean restart: read in place again
            assert torch.equal(c.get(key(i)), value(i))
        assert c._core._arena is not None
        assert c._core._arena.size == c.stats().tiers["cpu"].capacity_bytes


def test_cancelled_batch_get_returns_its_leases_promptly(server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from kvstore.client import AsyncKVClient

    keys = [key(i) for i in range(40)]
    with server.client(NS) as c:
        c.batch_put(keys, [value(i, 256 * 1024) for i in range(40)])

    async def cancel_midway() -> None:
        async with AsyncKVClient(server.address, NS) as ac:
            await ac.stats()
            task = asyncio.ensure_future(ac.batch_get(keys))
            await asyncio.sleep(0.003)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    for _ in range(3):
        asyncio.run(cancel_midway())
    with server.client(NS) as c:
        # Not after --lease-seconds (30 s): the client and the server hand them back now.
        assert wait_for(lambda: c.stats().leases == 0, timeout=5)


def test_tcp_peers_never_get_shared_slices(start_server) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--listen", listen)
    with srv.client(NS) as c:
        c.put(key(1), value(1))
    with grpc.insecure_channel(listen, options=GRPC_OPTIONS) as ch:
        pieces = list(
            pb_grpc.KVStoreStub(ch).Get(pb.GetRequest(namespace=NS, key=key(1), shared=True))
        )
    assert not pieces[0].HasField("shared")
    assert b"".join(p.data for p in pieces) == value(1).numpy().tobytes()
    with grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        # Each stream read to its end: one dropped after its first answer may be cancelled
        # before it ends, and the server then takes back the leases it handed out.
        request = pb.GetRequest(namespace=NS, key=key(1), shared=True)
        ids = []
        for _ in range(4):
            (answer,) = answers(stub.Get(request))
            ids.append(answer.shared.lease)
        assert len(set(ids)) == 4 and max(ids) > 1 << 32  # not a counter another can guess
        assert stub.Release(pb.ReleaseRequest(leases=ids)).count == 4


def reserve(stub, k: bytes, data: bytes, checksum_of: bytes | None = None):  # type: ignore[no-untyped-def]
    import xxhash

    header = pb.ValueHeader(
        key=k,
        dtype="uint8",
        shape=[len(data)],
        nbytes=len(data),
        checksum=xxhash.xxh3_64_intdigest(checksum_of if checksum_of is not None else data),
    )
    return stub.Reserve(pb.ReserveRequest(namespace=NS, values=[header])).reservations[0]


def test_same_host_put_writes_in_place_and_commits(server) -> None:  # type: ignore[no-untyped-def]
    data = value(7).numpy().tobytes()
    with server.client(NS) as c, grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        path = c.stats().host_arena_path
        r = reserve(stub, key(7), data)
        assert r.id and c.exists([key(7)]) == [False]  # nothing visible before Commit
        with open(path, "r+b") as fh:
            fh.seek(r.offset)
            fh.write(data)
        assert list(stub.Commit(pb.CommitRequest(ids=[r.id])).tiers) == ["cpu"]
        assert torch.equal(c.get(key(7)), value(7))
        with pytest.raises(grpc.RpcError) as err:  # a reservation commits once
            stub.Commit(pb.CommitRequest(ids=[r.id]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The client does the same by itself: its puts land in place too.
        assert c._core._arena is not None and c._core._arena.writable
        assert c.put(key(8), value(8)) == "cpu"
        assert torch.equal(c.get(key(8)), value(8))


def test_commit_of_bytes_that_do_not_match_stores_nothing(server) -> None:  # type: ignore[no-untyped-def]
    data = value(9).numpy().tobytes()
    with server.client(NS) as c, grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        before = c.stats().tiers["cpu"].used_bytes
        r = reserve(stub, key(9), data, checksum_of=b"something else")
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(pb.CommitRequest(ids=[r.id]))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert c.exists([key(9)]) == [False]
        assert c.stats().tiers["cpu"].used_bytes == before
        r = reserve(stub, key(9), data)
        stub.Commit(pb.CommitRequest(abort=[r.id]))  # given back unused
        assert c.stats().tiers["cpu"].used_bytes == before


def test_uncommitted_reservations_are_reclaimed(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--lease-seconds", "0.5")
    with srv.client(NS) as c, grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        before = c.stats().tiers["cpu"].used_bytes
        r = reserve(pb_grpc.KVStoreStub(ch), key(1), value(1).numpy().tobytes())
        assert r.id and c.stats().tiers["cpu"].used_bytes > before  # a client that died
        assert wait_for(lambda: c.stats().tiers["cpu"].used_bytes == before, timeout=5)
        assert c.exists([key(1)]) == [False]


def test_tcp_peers_get_no_reservations(start_server) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--listen", listen)
    with grpc.insecure_channel(listen, options=GRPC_OPTIONS) as ch:
        assert reserve(pb_grpc.KVStoreStub(ch), key(1), b"x" * 64).id == 0
    with KVClient(listen, NS) as remote:
        assert remote.put(key(1), value(1)) == "cpu"  # streamed instead
        assert torch.equal(remote.get(key(1)), value(1))


def test_an_expired_reservation_slot_is_held_back_from_reuse(
    start_server,
) -> None:  # type: ignore[no-untyped-def]
    # Lease 2 s, reaped within 1 s of expiring, then held back 2 s more: at 3.3 s the late
    # reservation is surely reclaimed and surely not yet reusable.
    srv = start_server("--tiers", "cpu", "--cpu-bytes", "8MiB", "--lease-seconds", "2")
    data = value(1).numpy().tobytes()
    with srv.client(NS) as c, grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        path = c.stats().host_arena_path
        late = reserve(stub, key(1), data)  # a client that stalls past its lease
        time.sleep(3.3)  # expired and reclaimed; the slot is held back one more lease period
        assert c.put(key(2), value(2)) == "cpu"
        with open(path, "r+b") as fh:  # the stalled client wakes up and writes anyway
            fh.seek(late.offset)
            fh.write(b"\xff" * len(data))
        assert torch.equal(c.get(key(2)), value(2))  # another value was not hit
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(pb.CommitRequest(ids=[late.id]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert c.exists([key(1)]) == [False]


def test_abort_by_call_number_and_no_staging_for_reservations(start_server) -> None:  # type: ignore[no-untyped-def]
    import xxhash

    srv = start_server(
        "--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB",
        "--max-value-bytes", "8MiB", "--staging-bytes", "8MiB",
    )  # fmt: skip
    with srv.client(NS) as c, grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        before = c.stats().tiers["cpu"].used_bytes
        small = pb.ValueHeader(key=key(1), dtype="uint8", shape=[4096], nbytes=4096)
        big = pb.ValueHeader(key=key(2), dtype="uint8", shape=[6 << 20], nbytes=6 << 20)
        big.checksum = xxhash.xxh3_64_intdigest(bytes(6 << 20))
        got = stub.Reserve(pb.ReserveRequest(namespace=NS, values=[small, big], call=77))
        assert got.reservations[0].id and not got.reservations[1].id  # big: stream it
        stub.Commit(pb.CommitRequest(abort_calls=[77]))  # an answer the client lost
        assert c.stats().tiers["cpu"].used_bytes == before
        # Reserving never took staging room: the 6 MiB value still streams in.
        assert c.put(key(2), torch.zeros(6 << 20, dtype=torch.uint8)) == "ssd"


def test_a_batch_naming_a_key_twice_keeps_the_later_value(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB")
    with srv.client(NS) as c:
        big, small = value(1, 6 * MiB), value(2, 4096)
        c.batch_put([key(1), key(1)], [big, small])
        assert torch.equal(c.get(key(1)), small)


def test_many_keys_come_back_batched_and_in_order(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    small = {i: value(i, 1024) for i in range(0, 2600, 2)}  # arena-resident
    big = {i: value(i, 5 * MiB) for i in (7, 1501)}  # ssd only: streamed among the slices
    with srv.client(NS) as c:
        c.batch_put([key(i) for i in small], list(small.values()))
        for i, v in big.items():
            c.put(key(i), v)
        wanted = list(range(2600))
        with grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
            stream = pb_grpc.KVStoreStub(ch).BatchGet(
                pb.KeysRequest(namespace=NS, keys=[key(i) for i in wanted], shared=True)
            )
            messages = list(stream)
            got = list(answers(messages))
            leases = [p.shared.lease for p in got if p.HasField("shared")]
            pb_grpc.KVStoreStub(ch).Release(pb.ReleaseRequest(leases=leases))
        assert len(messages) < 50  # 2600 answers, batched
        order = [p.index for p in got]
        assert order == sorted(order) and set(order) == set(wanted)
        values = c.batch_get([key(i) for i in wanted])
        for i, v in zip(wanted, values, strict=True):
            want = small.get(i, big.get(i))
            assert (v is None) if want is None else torch.equal(v, want), i
        assert wait_for(lambda: c.stats().leases == 0)


def _table_entries(t: pb.SliceTable) -> dict[int, tuple]:  # type: ignore[type-arg]
    """index -> (offset, gpu_pool, nbytes, checksum, dtype, shape, tier) of a SliceTable."""
    out, at = {}, 0
    for j, i in enumerate(t.index):
        shape = tuple(t.dims[at : at + t.rank[j]])
        at += t.rank[j]
        out[i] = (
            t.offset[j], t.gpu_pool[j], t.nbytes[j], t.checksum[j],
            t.dtypes[t.dtype[j]], shape, t.tiers[t.tier[j]],
        )  # fmt: skip
    return out


def test_a_packed_answer_says_what_per_key_slices_say(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    resident = {i: value(i, 1024 * (1 + i % 3)).view(-1, 4) for i in range(0, 40, 2)}
    with srv.client(NS) as c:
        c.batch_put([key(i) for i in resident], list(resident.values()))
        c.put(key(7), value(7, 5 * MiB))  # too large for the arena's slabs: ssd only
        stats = c.stats()
        wanted = [key(i) for i in range(41)]
        c.batch_get(wanted)  # values that went to ssd are promoted: both reads find them in cpu
        with grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
            stub = pb_grpc.KVStoreStub(ch)
            plain = list(
                answers(stub.BatchGet(pb.KeysRequest(namespace=NS, keys=wanted, shared=True)))
            )
            messages = list(
                stub.BatchGet(pb.KeysRequest(namespace=NS, keys=wanted, shared=True, packed=True))
            )
            tables = [m.slices for m in messages if m.HasField("slices")]
            packed = [p for m in messages if not m.HasField("slices") for p in m.batch or (m,)]
            leases = [p.shared.lease for p in plain if p.HasField("shared")]
            leases += [lease for t in tables for lease in t.lease]
            assert stub.Release(pb.ReleaseRequest(leases=leases)).count == len(leases)
    assert len(tables) == 1
    table = tables[0]
    assert [(r.gpu_pool, r.arena_dev, r.arena_ino) for r in table.regions] == [
        (0, stats.host_arena_dev, stats.host_arena_ino)
    ]
    # Every resident key is in the table, with what its own SharedSlice says, except that
    # each answer took a lease of its own.
    want = {
        p.index: (
            p.shared.offset,
            p.shared.gpu_pool,
            p.header.nbytes,
            p.header.checksum,
            p.header.dtype,
            tuple(p.header.shape),
            p.tier,
        )
        for p in plain
        if p.HasField("shared")
    }
    assert _table_entries(table) == want and set(want) == set(resident)
    assert len(set(table.lease)) == len(table.lease)
    # The rest come as before: the ssd value as bytes, the others as misses.
    found = {p.index for p in packed if p.found}
    assert found == {7}
    assert {p.index for p in packed} - found == set(range(41)) - set(resident) - {7}


def test_acquire_reads_packed_answers_split_over_requests(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        "--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--max-keys-per-request", "16"
    )
    resident = {i: value(i, 4096) for i in range(0, 60, 3)}
    with srv.client(NS) as c:
        c.batch_put([key(i) for i in resident], list(resident.values()))
        c.put(key(50), value(50, 5 * MiB))  # ssd only: the refs are then one private copy
        wanted = [key(i) for i in range(0, 60)] + [key(3), key(3)]  # some named again
        for keys in (wanted[:50], wanted):
            refs = c.acquire(keys)
            try:
                expect = [resident.get(i, value(i, 5 * MiB) if i == 50 else None) for i in
                          [int.from_bytes(k[1:5], "little") for k in keys]]  # fmt: skip
                assert refs.found == [e is not None for e in expect]
                host, _ = refs.host()
                for j, e in enumerate(expect):
                    if e is not None:
                        o, n = int(refs.offsets[j]), int(refs.nbytes[j])
                        assert bytes(host[o : o + n].numpy()) == e.numpy().tobytes(), j
            finally:
                c.release(refs)
        assert wait_for(lambda: c.stats().leases == 0)

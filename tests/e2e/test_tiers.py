"""Placement, demotion, promotion, pinning, restart and on-disk corruption, end to end."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from kvstore.errors import DataLoss, InvalidArgument, ResourceExhausted

MiB = 1 << 20


def key(i: int) -> bytes:
    return b"T" + i.to_bytes(4, "little") + bytes(27)


def value(i: int, nbytes: int = MiB) -> torch.Tensor:
    """A value whose every byte depends on i, so a mixed-up value cannot pass."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


def tiers_of(client) -> dict[bytes, str]:  # type: ignore[no-untyped-def]
    return {e.header.key: e.tier for e in client.entries(client.namespace)}


def test_full_cpu_tier_demotes_lru_to_ssd_and_get_promotes(start_server) -> None:  # type: ignore[no-untyped-def]
    # Without the ssd writer: each eviction writes its value then (counted below).
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--ssd-write-ahead", "0")
    with srv.client() as c:
        for i in range(20):
            assert c.put(key(i), value(i)) == "cpu"  # puts land in the fastest tier
        s = c.stats()
        assert s.tiers["cpu"].entries == 8 and s.tiers["cpu"].used_bytes <= 8 * MiB
        assert s.tiers["cpu"].evictions == 12 and s.tiers["cpu"].demotions == 12
        assert s.tiers["ssd"].entries == 12
        where = tiers_of(c)
        assert all(where[key(i)] == "ssd" for i in range(12))  # least recently used went down
        assert all(where[key(i)] == "cpu" for i in range(12, 20))

        got = c.get(key(0))
        assert got is not None and torch.equal(got, value(0))
        s = c.stats()
        assert s.tiers["ssd"].hits == 1 and s.tiers["cpu"].promotions == 1
        assert tiers_of(c)[key(0)] == "cpu"
        # Promotion evicted the cpu tier's LRU entry (key 12) down to ssd, and the promoted
        # value kept its ssd copy: 12 + 1 on ssd, and evicting key 0 again writes nothing.
        assert s.tiers["ssd"].entries == 13 and s.tiers["cpu"].demotions == 13
        assert tiers_of(c)[key(12)] == "ssd"
        for i in range(13, 20):
            c.get(key(i))  # touch the cpu residents so key 0 becomes the LRU one
        c.put(key(20), value(20))
        s = c.stats()
        assert tiers_of(c)[key(0)] == "ssd"
        assert s.tiers["cpu"].evictions == 14 and s.tiers["cpu"].demotions == 13
        for i in range(20):
            got = c.get(key(i))
            assert got is not None and torch.equal(got, value(i)), i


def test_pinned_values_stay_in_cpu_and_new_puts_go_to_ssd(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    with srv.client() as c:
        keys = [key(i) for i in range(8)]
        c.batch_put(keys, [value(i) for i in range(8)])
        assert c.pin(keys) == 8
        assert c.put(key(100), value(100)) == "ssd"
        where = tiers_of(c)
        assert all(where[k] == "cpu" for k in keys)
        assert c.stats().tiers["cpu"].evictions == 0
        c.unpin(keys)
        assert c.put(key(101), value(101)) == "cpu"
        assert tiers_of(c)[key(0)] == "ssd"


def test_resource_exhausted_when_nothing_can_be_evicted(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--tiers", "cpu", "--cpu-bytes", "4MiB")
    with srv.client() as c:
        keys = [key(i) for i in range(4)]
        c.batch_put(keys, [value(i) for i in range(4)])
        c.pin(keys)
        with pytest.raises(ResourceExhausted, match="full"):
            c.put(key(50), value(50))
        for i in range(4):  # nothing acknowledged was lost
            assert torch.equal(c.get(key(i)), value(i))
        c.unpin(keys[:1])
        assert c.put(key(50), value(50)) == "cpu"  # the unpinned LRU entry made room
        assert c.get(key(0)) is None
        s = c.stats()
        assert s.tiers["cpu"].evictions == 1 and "ssd" not in s.tiers


def test_values_bigger_than_a_cpu_page_go_to_ssd(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB")
    with srv.client() as c:
        big = value(7, 6 * MiB)
        assert c.put(key(7), big) == "ssd"
        got = c.get(key(7))
        assert got is not None and torch.equal(got, big)


def test_restart_serves_everything_after_sigterm(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    with srv.client() as c:
        c.batch_put([key(i) for i in range(12)], [value(i) for i in range(12)])
        ct = c.stats().chunk_tokens
        tokens = list(range(3 * ct))
        kv = torch.randn(2, 2, len(tokens), 2, 8).to(torch.bfloat16)
        c.put_prefix(tokens, kv)
    assert srv.stop(signal.SIGTERM) == 0
    srv.start()
    with srv.client() as c:
        # cpu-resident values were copied down at shutdown; demoted ones were already there
        for i in range(12):
            got = c.get(key(i))
            assert got is not None and torch.equal(got, value(i)), i
        got = c.get_prefix(tokens)
        assert got is not None and torch.equal(got.view(torch.int16), kv.view(torch.int16))
        assert c.stats().entries == 15


def test_sigkill_keeps_what_reached_ssd(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    with srv.client() as c:
        c.batch_put([key(i) for i in range(16)], [value(i) for i in range(16)])
        on_ssd = [k for k, t in tiers_of(c).items() if t == "ssd"]
    assert len(on_ssd) == 8
    srv.stop(signal.SIGKILL)
    srv.start()
    with srv.client() as c:
        for k in on_ssd:
            i = int.from_bytes(k[1:5], "little")
            got = c.get(k)
            assert got is not None and torch.equal(got, value(i))


def test_corrupted_ssd_value_is_data_loss_and_dropped(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--tiers", "ssd", "--ssd-bytes", "64MiB")
    victim = value(3)
    with srv.client() as c:
        c.batch_put([key(i) for i in range(5)], [value(i) for i in range(5)])
    srv.stop()
    db = srv.data_dir / "ssd" / "data.mdb"
    raw = bytearray(db.read_bytes())
    at = raw.find(victim[:64].numpy().tobytes())
    assert at >= 0, "payload not found in data.mdb"
    raw[at + 1000] ^= 0xFF  # one flipped byte: bit rot on disk
    db.write_bytes(raw)
    srv.start()
    with srv.client() as c:
        with pytest.raises(DataLoss, match="checksum"):
            c.get(key(3))
        assert c.get(key(3)) is None  # dropped, never served
        assert c.exists([key(3)]) == [False]
        for i in (0, 1, 2, 4):
            assert torch.equal(c.get(key(i)), value(i))


def test_gdsf_keeps_what_clients_say_is_costly(start_server) -> None:  # type: ignore[no-untyped-def]
    """`--eviction gdsf` and `KVClient(recompute_cost=...)`: the value a client marked eight
    times costlier per byte outlives a stream of ordinary puts; under LRU it would go first."""
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--eviction", "gdsf")
    with srv.client(recompute_cost=8.0) as dear, srv.client() as plain:
        assert dear.put(key(0), value(0)) == "cpu"
        for i in range(1, 20):
            plain.put(key(i), value(i))
        where = tiers_of(plain)
        assert where[key(0)] == "cpu"
        assert where[key(1)] == "ssd"  # an ordinary value from before the stream went down
        got = dear.get(key(0))
        assert got is not None and torch.equal(got, value(0))
    with pytest.raises(InvalidArgument, match="recompute_cost"):
        srv.client(recompute_cost=0.0)


def test_a_batch_read_from_ssd_past_a_damaged_value(start_server) -> None:  # type: ignore[no-untyped-def]
    """A BatchGet takes the next values' leases while it sends one (values from ssd decode
    side by side): answers in order, misses in place; when a value ahead is damaged, the
    read fails at that key, and every lease taken ahead is given back."""
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB")
    n = 12
    with srv.client() as c:
        c.batch_put([key(i) for i in range(n)], [value(i) for i in range(n)])
        on_ssd = [i for i in range(n) if tiers_of(c)[key(i)] == "ssd"]
        assert len(on_ssd) >= 7
        picks = [*on_ssd[:3], 99, *on_ssd[3:6], 98]  # two misses among them
        got = c.batch_get([key(i) for i in picks])
        for i, g in zip(picks, got, strict=True):
            assert (g is None) if i >= 98 else torch.equal(g, value(i)), i
        assert c.stats().leases == 0
    srv.stop()
    victim = on_ssd[6]
    db = srv.data_dir / "ssd" / "data.mdb"
    raw = bytearray(db.read_bytes())
    at = raw.find(value(victim)[:64].numpy().tobytes())
    assert at >= 0, "payload not found in data.mdb"
    raw[at + 1000] ^= 0xFF
    db.write_bytes(raw)
    srv.start()
    with srv.client() as c:
        others = [i for i in range(n) if i != victim]
        with pytest.raises(DataLoss, match="checksum"):
            c.batch_get([key(i) for i in [others[0], victim, *others[1:6]]])
        # The leases taken past the damaged value come back (a worker still decoding one
        # gives it back when it is done).
        deadline = time.monotonic() + 5
        while c.stats().leases and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.stats().leases == 0
        got = c.batch_get([key(i) for i in others])
        assert all(torch.equal(g, value(i)) for i, g in zip(others, got, strict=True))
        assert c.exists([key(victim)]) == [False]

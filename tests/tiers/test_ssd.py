"""LmdbTier: verified reads, capacity accounting, and index rebuild by scan."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from kvstore.codecs.container import ValueHeader, checksum
from kvstore.errors import DataLoss, Unavailable
from kvstore.tiers.base import TierError, TierFull
from kvstore.tiers.ssd import LmdbTier, record_key, split_record_key

MiB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def header_for(payload: bytes, created_ns: int = 1) -> ValueHeader:
    return ValueHeader("uint8", (len(payload),), len(payload), checksum(payload), 0, created_ns)


def put(tier: LmdbTier, ns: str, k: bytes, payload: bytes, created_ns: int = 1) -> None:
    tier.put(ns, k, header_for(payload, created_ns), payload)


def read(tier: LmdbTier, ns: str, k: bytes) -> tuple[ValueHeader, bytes]:
    with tier.read(ns, k) as (header, view):
        return header, bytes(view)


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[LmdbTier]:
    t = LmdbTier(tmp_path / "ssd", 1 * MiB)
    yield t
    t.close()


def test_record_key_round_trip() -> None:
    rk = record_key("llama/bf16", key(7))
    assert split_record_key(rk) == ("llama/bf16", key(7))
    # Length-prefixed: a namespace cannot bleed into the key.
    assert record_key("ab", b"c" * 32) != record_key("a", b"b" + b"c" * 31)


def test_put_read_round_trip(tier: LmdbTier) -> None:
    payload = os.urandom(10_000)
    put(tier, "ns", key(1), payload, created_ns=42)
    header, data = read(tier, "ns", key(1))
    assert data == payload
    assert header == header_for(payload, 42)
    assert tier.count() == 1
    assert tier.used_bytes == tier.record_bytes(header)


def test_put_accepts_memoryview_payload(tier: LmdbTier) -> None:
    payload = bytearray(os.urandom(5000))
    tier.put("ns", key(1), header_for(bytes(payload)), memoryview(payload))
    assert read(tier, "ns", key(1))[1] == payload


def test_namespaces_are_separate(tier: LmdbTier) -> None:
    put(tier, "a", key(1), b"A" * 100)
    put(tier, "b", key(1), b"B" * 100)
    assert read(tier, "a", key(1))[1] == b"A" * 100
    assert read(tier, "b", key(1))[1] == b"B" * 100


def test_missing_key_raises_key_error(tier: LmdbTier) -> None:
    with pytest.raises(KeyError), tier.read("ns", key(9)):
        pass


def test_record_bytes_rounds_to_pages(tier: LmdbTier) -> None:
    assert tier.record_bytes(header_for(b"x")) == 2 * 4096
    assert tier.record_bytes(header_for(b"x" * 4096)) == 2 * 4096
    assert tier.record_bytes(header_for(b"x" * 4097)) == 3 * 4096


def _corrupt_data_record(tier: LmdbTier, ns: str, k: bytes, new: bytes) -> None:
    data_db = tier.env.open_db(b"data")
    with tier.env.begin(write=True) as txn:
        assert txn.put(record_key(ns, k), new, db=data_db)


def test_checksum_mismatch_raises_data_loss(tier: LmdbTier) -> None:
    payload = os.urandom(20_000)
    put(tier, "ns", key(1), payload)
    bad = bytearray(payload)
    bad[12_345] ^= 0x01
    _corrupt_data_record(tier, "ns", key(1), bytes(bad))
    with pytest.raises(DataLoss, match="checksum"), tier.read("ns", key(1)):
        pass


def test_truncated_or_missing_payload_raises_data_loss(tier: LmdbTier) -> None:
    put(tier, "ns", key(1), b"z" * 1000)
    _corrupt_data_record(tier, "ns", key(1), b"z" * 999)
    with pytest.raises(DataLoss, match="999 bytes"), tier.read("ns", key(1)):
        pass
    put(tier, "ns", key(2), b"y" * 1000)
    data_db = tier.env.open_db(b"data")  # not inside a write txn: LMDB has one writer
    with tier.env.begin(write=True) as txn:
        txn.delete(record_key("ns", key(2)), db=data_db)
    with pytest.raises(DataLoss, match="no payload"), tier.read("ns", key(2)):
        pass


def test_unreadable_header_raises_data_loss(tier: LmdbTier) -> None:
    put(tier, "ns", key(1), b"q" * 100)
    meta_db = tier.env.open_db(b"meta")
    with tier.env.begin(write=True) as txn:
        txn.put(record_key("ns", key(1)), b"garbage", db=meta_db)
    with pytest.raises(DataLoss, match="header"), tier.read("ns", key(1)):
        pass


def test_tier_full_at_capacity(tier: LmdbTier) -> None:
    payload = b"v" * (100 * 1024)
    per = tier.record_bytes(header_for(payload))
    fits = tier.capacity_bytes // per
    for i in range(fits):
        put(tier, "ns", key(i), payload)
    assert tier.used_bytes == fits * per <= tier.capacity_bytes
    with pytest.raises(TierFull):
        put(tier, "ns", key(fits), payload)
    # A refused put changes nothing.
    assert tier.used_bytes == fits * per
    assert tier.count() == fits
    with pytest.raises(KeyError), tier.read("ns", key(fits)):
        pass
    # Replacing an existing value counts only the difference.
    put(tier, "ns", key(0), b"w" * (100 * 1024))
    assert read(tier, "ns", key(0))[1] == b"w" * (100 * 1024)
    assert tier.used_bytes == fits * per
    # A replacement that does not fit leaves the value it would replace as it was.
    with pytest.raises(TierFull):
        put(tier, "ns", key(0), b"x" * tier.capacity_bytes)
    assert read(tier, "ns", key(0))[1] == b"w" * (100 * 1024)
    assert tier.used_bytes == fits * per and tier.count() == fits
    # Deleting makes room again.
    tier.delete("ns", key(1))
    assert tier.used_bytes == (fits - 1) * per
    put(tier, "ns", key(fits), payload)
    assert tier.count() == fits


def test_delete(tier: LmdbTier) -> None:
    put(tier, "ns", key(1), b"a" * 5000)
    tier.delete("ns", key(1))
    assert tier.used_bytes == 0
    assert tier.count() == 0
    with pytest.raises(KeyError), tier.read("ns", key(1)):
        pass
    tier.delete("ns", key(1))  # absent: no error, no accounting drift
    assert tier.used_bytes == 0


def test_scan_after_reopen_restores_entries_and_used_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ssd"
    t = LmdbTier(path, 4 * MiB)
    want = {}
    for i in range(20):
        ns = f"ns{i % 3}"
        payload = os.urandom(1000 + 777 * i)
        put(t, ns, key(i), payload, created_ns=1000 + i)
        want[(ns, key(i))] = header_for(payload, 1000 + i)
    t.delete("ns0", key(0))
    del want[("ns0", key(0))]
    used = t.used_bytes
    t.close()

    t2 = LmdbTier(path, 4 * MiB)
    try:
        assert t2.used_bytes == 0  # unknown until scanned
        got = {(ns, k): h for ns, k, h in t2.scan()}
        assert got == want
        assert t2.used_bytes == used
        header, data = read(t2, "ns1", key(4))
        assert checksum(data) == header.payload_checksum
    finally:
        t2.close()


def test_scan_drops_corrupted_meta_record(tmp_path: Path) -> None:
    path = tmp_path / "ssd"
    t = LmdbTier(path, 4 * MiB)
    for i in range(3):
        put(t, "ns", key(i), bytes([i]) * 5000)
    good_used = t.used_bytes - t.record_bytes(header_for(b"x" * 5000))
    t.close()
    # Damage one header on disk through a plain LMDB handle, as a crash or bit rot would.
    env = lmdb.open(str(path), max_dbs=2)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        rk = record_key("ns", key(1))
        raw = bytearray(txn.get(rk, db=meta))
        raw[10] ^= 0xFF
        txn.put(rk, bytes(raw), db=meta)
    env.close()

    t2 = LmdbTier(path, 4 * MiB)
    try:
        found = sorted(k for _, k, _ in t2.scan())
        assert found == [key(0), key(2)]
        assert t2.used_bytes == good_used
        assert t2.count() == 2
        with pytest.raises(KeyError), t2.read("ns", key(1)):
            pass
        # Both records of the bad value are gone, not just its header.
        data_db = t2.env.open_db(b"data")
        with t2.env.begin() as txn:
            assert txn.get(record_key("ns", key(1)), db=data_db) is None
        # The survivors still read back.
        assert read(t2, "ns", key(2))[1] == bytes([2]) * 5000
    finally:
        t2.close()


def test_sync_and_close(tmp_path: Path) -> None:
    t = LmdbTier(tmp_path / "ssd", 1 * MiB)
    put(t, "ns", key(1), b"d" * 10)
    t.sync()
    t.close()
    t2 = LmdbTier(tmp_path / "ssd", 1 * MiB)
    try:
        assert read(t2, "ns", key(1))[1] == b"d" * 10
    finally:
        t2.close()


class _TxnFailingPuts:
    """A write transaction whose `put` fails as LMDB does on an I/O error."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def __enter__(self) -> _TxnFailingPuts:
        self._txn.__enter__()
        return self

    def __exit__(self, *exc: object) -> object:
        return self._txn.__exit__(*exc)

    def put(self, *args: object, **kwargs: object) -> bool:
        raise lmdb.DiskError("simulated")

    def __getattr__(self, name: str) -> object:
        return getattr(self._txn, name)


class _EnvFailingWrites:
    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env

    def begin(self, *args: object, write: bool = False, **kwargs: object) -> object:
        txn = self._env.begin(*args, write=write, **kwargs)  # type: ignore[arg-type]
        return _TxnFailingPuts(txn) if write else txn

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def test_lmdb_error_on_put_raises_tier_error(
    tier: LmdbTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tier, "ns", key(1), b"a" * 5000)
    used, count = tier.used_bytes, tier.count()
    monkeypatch.setattr(tier, "env", _EnvFailingWrites(tier.env))
    with pytest.raises(TierError, match="simulated") as info:
        put(tier, "ns", key(2), b"b" * 5000)
    assert isinstance(info.value, Unavailable)
    with pytest.raises(TierError):
        put(tier, "ns", key(1), b"c" * 5000)  # a failed replacement keeps the old value
    assert tier.used_bytes == used
    assert tier.count() == count
    assert read(tier, "ns", key(1))[1] == b"a" * 5000
    with pytest.raises(KeyError), tier.read("ns", key(2)):
        pass
    monkeypatch.undo()
    put(tier, "ns", key(2), b"b" * 5000)  # writable again once the medium recovers
    assert read(tier, "ns", key(2))[1] == b"b" * 5000


class _CountingEnv:
    """An LMDB environment that counts flushes to disk."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self.syncs = 0

    def sync(self, force: bool = False) -> None:
        self.syncs += 1
        self._env.sync(force)

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def counting(tier: LmdbTier) -> _CountingEnv:
    env = _CountingEnv(tier.env)
    tier.env = env  # type: ignore[assignment]
    return env


def test_sync_durability_flushes_before_durable_returns(tmp_path: Path) -> None:
    t = LmdbTier(tmp_path / "ssd", 4 * MiB, durability="sync")
    assert t.env.flags()["sync"]  # LMDB orders data pages before the meta page
    env = counting(t)
    put(t, "ns", key(1), b"a" * 5000)
    t.durable()
    assert env.syncs == 1
    t.durable()  # nothing committed since: no second flush
    assert env.syncs == 1
    put(t, "ns", key(2), b"b" * 5000)
    t.delete("ns", key(1))
    t.durable()  # one flush covers both commits
    assert env.syncs == 2
    t.close()


def test_sync_durability_shares_flushes_between_threads(tmp_path: Path) -> None:
    import threading

    t = LmdbTier(tmp_path / "ssd", 16 * MiB, durability="sync")
    env = counting(t)
    lock = threading.Lock()  # the store serializes writes; flushes run outside it

    def writer(w: int) -> None:
        for i in range(25):
            with lock:
                put(t, "ns", key(w * 100 + i), bytes([w]) * 3000)
                mine = t._committed
            t.durable()
            assert t._flushed >= mine  # this thread's commit is covered by a flush

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t._flushed == t._committed == 200
    assert 1 <= env.syncs <= 200
    t.close()


@pytest.mark.parametrize(("mode", "periodic"), [("async", 1), ("none", 0)])
def test_async_and_none_never_flush_on_durable(tmp_path: Path, mode: str, periodic: int) -> None:
    t = LmdbTier(tmp_path / "ssd", 4 * MiB, durability=mode)
    assert not t.env.flags()["sync"]
    env = counting(t)
    put(t, "ns", key(1), b"a" * 5000)
    t.durable()
    assert env.syncs == 0
    t.sync()  # the server's periodic flush: only "async" does it
    assert env.syncs == periodic
    t.env = env._env  # type: ignore[assignment]
    t.close()


def test_a_full_lmdb_map_is_tier_full_and_keeps_what_it_holds(tier: LmdbTier) -> None:
    # The map is sized above the tier's capacity, so only a file grown by fragmentation
    # fills it: shrink the map to what is in use to get there now.
    kept = {i: os.urandom(64 * 1024) for i in range(4)}
    for i, payload in kept.items():
        put(tier, "ns", key(i), payload)
    info = tier.env.info()
    tier.env.set_mapsize((info["last_pgno"] + 4) * tier.env.stat()["psize"])
    used, count = tier.used_bytes, tier.count()
    with pytest.raises(TierFull, match="map is full"):
        put(tier, "ns", key(9), os.urandom(256 * 1024))
    assert (tier.used_bytes, tier.count()) == (used, count)  # the refused put left nothing
    with pytest.raises(KeyError), tier.read("ns", key(9)):
        pass
    for i, payload in kept.items():
        assert read(tier, "ns", key(i))[1] == payload


@pytest.mark.parametrize(("mode", "background"), [("async", True), ("sync", True), ("none", False)])
def test_writes_are_flushed_in_the_background_as_they_accumulate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, background: bool
) -> None:
    """Each time WRITEBACK_BYTES more are committed a flush starts on its own thread, so the
    disk writes them while more are written; in "none" mode nothing is ever flushed."""
    import kvstore.tiers.ssd as ssd

    monkeypatch.setattr(ssd, "WRITEBACK_BYTES", 5 * 4096)  # two records of 8 KiB
    t = LmdbTier(tmp_path / "ssd", 4 * MiB, durability=mode)
    env = counting(t)
    put(t, "ns", key(1), b"a" * 5000)
    assert t._writeback is None and env.syncs == 0  # 8 KiB: not yet
    put(t, "ns", key(2), b"b" * 5000)
    if background:
        assert t._writeback is not None and t._writeback.name == "kvstore-ssd-writeback"
        t._writeback.join(timeout=10)
        assert env.syncs == 1 and t._flushed == t._committed == 2
        t.sync()  # covered already: no second flush
        assert env.syncs == 1
    else:
        assert t._writeback is None and env.syncs == 0
    assert read(t, "ns", key(2))[1] == b"b" * 5000
    t.env = env._env  # type: ignore[assignment]
    t.close()

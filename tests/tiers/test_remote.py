"""`RemoteTier` against a real 3-master Redis Cluster on loopback (no mocks)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme
from _redis_cluster import LocalCluster, _free_port, local_redis
from redis.crc import key_slot

from kvstore.codecs.container import ValueHeader, checksum, encode_header
from kvstore.config import ServerConfig
from kvstore.tiers.remote import RemoteTier, decode_record, header_key, piece_key
from tests.conftest import require_redis_server

PIECE = 4096
NS = "model/bf16/tp0of1"


def value(nbytes: int) -> tuple[ValueHeader, bytes]:
    data = os.urandom(nbytes)
    return ValueHeader("uint8", (nbytes,), nbytes, checksum(data), created_ns=time.time_ns()), data


@pytest.fixture
def tier(redis_cluster: LocalCluster) -> Iterator[RemoteTier]:
    t = RemoteTier(redis_cluster.urls[:1], piece_bytes=PIECE, timeout_s=1.0, backoff_s=0.5)
    yield t
    t.close()
    for node in redis_cluster.nodes:
        if node.proc is not None:
            with node.client() as c:
                c.flushall()


def client_for(cluster: LocalCluster, rkey: bytes) -> redis.Redis:
    return cluster.nodes[cluster.owner(key_slot(rkey))].client()


def records(t: RemoteTier, cluster: LocalCluster, key: bytes) -> tuple[bytes, list[bytes]]:
    """A value's header key and its piece keys as stored now."""
    hkey = header_key(t.prefix, NS, key)
    with client_for(cluster, hkey) as c:
        rec = decode_record(c.get(hkey))
    return hkey, [piece_key(t.prefix, NS, key, rec.generation, i) for i in range(len(rec.sums))]


@pytest.mark.parametrize("nbytes", [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5])
def test_round_trip_across_piece_sizes(
    tier: RemoteTier, redis_cluster: LocalCluster, nbytes: int
) -> None:
    key = os.urandom(32)
    header, data = value(nbytes)
    assert tier.put_many([(NS, key, header, data)]) == [True]
    [got] = tier.get_many(NS, [key])
    assert got is not None
    assert got.header == header
    assert got.payload == data
    _, pkeys = records(tier, redis_cluster, key)
    assert len(pkeys) == max(1, -(-nbytes // PIECE))
    assert tier.exists_many(NS, [key, os.urandom(32)]) == [True, False]


def test_batch_spans_every_master(tier: RemoteTier, redis_cluster: LocalCluster) -> None:
    keys = [os.urandom(32) for _ in range(60)]
    values = [value(i * 301) for i in range(60)]
    owners = {redis_cluster.owner(key_slot(header_key(tier.prefix, NS, k))) for k in keys}
    assert owners == {0, 1, 2}
    items = [(NS, k, h, d) for k, (h, d) in zip(keys, values, strict=True)]
    assert tier.put_many(items) == [True] * 60
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.dbsize() > 0
    got = tier.get_many(NS, [*keys, os.urandom(32)])
    assert [g.payload if g else None for g in got] == [d for _, d in values] + [None]
    assert tier.counters.hits == 60 and tier.counters.misses == 1
    assert tier.delete_many(NS, keys[:30]) == [True] * 30
    assert tier.exists_many(NS, keys) == [False] * 30 + [True] * 30
    for node in redis_cluster.nodes:  # no piece left behind by the deletes
        with node.client() as c:
            for rkey in c.scan_iter(count=1000):
                assert any(k.hex().encode() in rkey for k in keys[30:]), rkey


def test_corrupt_piece_is_a_miss_and_is_deleted(
    tier: RemoteTier, redis_cluster: LocalCluster
) -> None:
    key = os.urandom(32)
    header, data = value(3 * PIECE)
    tier.put_many([(NS, key, header, data)])
    hkey, pkeys = records(tier, redis_cluster, key)
    with client_for(redis_cluster, hkey) as c:
        c.set(pkeys[1], b"\0" * PIECE)  # right size, wrong bytes
    assert tier.get_many(NS, [key]) == [None]
    assert tier.counters.corrupt == 1
    with client_for(redis_cluster, hkey) as c:
        assert c.exists(hkey, *pkeys) == 0


def test_missing_piece_is_a_miss_and_is_deleted(
    tier: RemoteTier, redis_cluster: LocalCluster
) -> None:
    key = os.urandom(32)
    header, data = value(2 * PIECE + 7)
    tier.put_many([(NS, key, header, data)])
    hkey, pkeys = records(tier, redis_cluster, key)
    with client_for(redis_cluster, hkey) as c:
        c.delete(pkeys[2])
    assert tier.get_many(NS, [key]) == [None]
    assert tier.counters.corrupt == 1
    with client_for(redis_cluster, hkey) as c:
        assert c.exists(hkey, *pkeys) == 0


def test_truncated_piece_is_a_miss(tier: RemoteTier, redis_cluster: LocalCluster) -> None:
    key = os.urandom(32)
    header, data = value(PIECE + 10)
    tier.put_many([(NS, key, header, data)])
    hkey, pkeys = records(tier, redis_cluster, key)
    with client_for(redis_cluster, hkey) as c:
        c.set(pkeys[1], data[PIECE : PIECE + 9])
    assert tier.get_many(NS, [key]) == [None]
    assert tier.counters.corrupt == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage",
        b"",
        # A kvstore container header, but not a remote header record.
        encode_header(ValueHeader("uint8", (4,), 4, 1)),
    ],
)
def test_foreign_or_garbage_header_is_a_miss_and_is_deleted(
    tier: RemoteTier, redis_cluster: LocalCluster, garbage: bytes
) -> None:
    key = os.urandom(32)
    hkey = header_key(tier.prefix, NS, key)
    with client_for(redis_cluster, hkey) as c:
        c.set(hkey, garbage)
    assert tier.get_many(NS, [key]) == [None]
    assert tier.counters.corrupt == 1
    with client_for(redis_cluster, hkey) as c:
        assert c.exists(hkey) == 0


def test_a_flipped_bit_in_the_header_record_is_caught(
    tier: RemoteTier, redis_cluster: LocalCluster
) -> None:
    key = os.urandom(32)
    header, data = value(100)
    tier.put_many([(NS, key, header, data)])
    hkey = header_key(tier.prefix, NS, key)
    with client_for(redis_cluster, hkey) as c:
        raw = bytearray(c.get(hkey))
        raw[30] ^= 1
        c.set(hkey, bytes(raw))
    assert tier.get_many(NS, [key]) == [None]
    assert tier.counters.corrupt == 1


def test_generations_never_mix(tier: RemoteTier, redis_cluster: LocalCluster) -> None:
    """A rewrite names its pieces by a new generation and deletes the old ones; a header
    of one write never reads another write's pieces."""
    key = os.urandom(32)
    first, second = value(2 * PIECE), value(2 * PIECE)
    tier.put_many([(NS, key, *first)])
    hkey, old_pieces = records(tier, redis_cluster, key)
    with client_for(redis_cluster, hkey) as c:
        old_header = c.get(hkey)
    tier.put_many([(NS, key, *second)])
    _, new_pieces = records(tier, redis_cluster, key)
    assert set(old_pieces).isdisjoint(new_pieces)
    with client_for(redis_cluster, hkey) as c:
        assert c.exists(*old_pieces) == 0  # the first write's pieces are gone
    [got] = tier.get_many(NS, [key])
    assert got is not None and got.payload == second[1]
    # The first write's header back in place (a reader that read it before the rewrite):
    # its pieces are gone, so it is a miss, never the second write's bytes under it.
    with client_for(redis_cluster, hkey) as c:
        c.set(hkey, old_header)
    assert tier.get_many(NS, [key]) == [None]


def test_ttl_applies_to_every_record(redis_cluster: LocalCluster) -> None:
    t = RemoteTier(redis_cluster.urls, piece_bytes=PIECE, ttl_s=60)
    try:
        key = os.urandom(32)
        t.put_many([(NS, key, *value(2 * PIECE))])
        hkey, pkeys = records(t, redis_cluster, key)
        with client_for(redis_cluster, hkey) as c:
            ttls = [c.pttl(k) for k in (hkey, *pkeys)]
        assert all(0 < ms <= 60_000 for ms in ttls), ttls
    finally:
        t.close()


def test_killed_master_misses_within_the_deadline_and_comes_back(
    tier: RemoteTier, redis_cluster: LocalCluster
) -> None:
    keys = [os.urandom(32) for _ in range(45)]
    values = [value(PIECE + i) for i in range(45)]
    tier.put_many([(NS, k, h, d) for k, (h, d) in zip(keys, values, strict=True)])
    owner = [redis_cluster.owner(key_slot(header_key(tier.prefix, NS, k))) for k in keys]
    redis_cluster.kill(1)
    try:
        for _ in range(2):  # the first call finds it dead, the second skips it at once
            started = time.monotonic()
            got = tier.get_many(NS, keys)
            assert time.monotonic() - started < tier.timeout_s + 0.5
            for g, o, (_, d) in zip(got, owner, values, strict=True):
                assert (g is None) if o == 1 else (g is not None and g.payload == d)
        assert tier.counters.errors >= 1
        # Writes to the dead master fail; the others land.
        done = tier.put_many([(NS, k, h, d) for k, (h, d) in zip(keys, values, strict=True)])
        assert done == [o != 1 for o in owner]
    finally:
        redis_cluster.restart(1)
    deadline = time.monotonic() + 10
    while True:  # back after the backoff: empty (no persistence), so write and read again
        done = tier.put_many([(NS, k, h, d) for k, (h, d) in zip(keys, values, strict=True)])
        if all(done) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(done)
    got = tier.get_many(NS, keys)
    assert [g.payload if g else None for g in got] == [d for _, d in values]


def test_start_with_the_cluster_down_misses_at_once_then_connects(tmp_path: Path) -> None:
    binary = require_redis_server()
    port = _free_port()
    t = RemoteTier([f"redis://127.0.0.1:{port}"], timeout_s=0.5, backoff_s=0.2)
    try:
        assert not t.connected
        started = time.monotonic()
        assert t.get_many(NS, [os.urandom(32)]) == [None]
        assert t.put_many([(NS, os.urandom(32), *value(10))]) == [False]
        assert time.monotonic() - started < 0.2
        with local_redis(tmp_path, binary, port=port) as server:  # a plain redis, not a cluster
            deadline = time.monotonic() + 10
            while not t.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert t.connected
            key = os.urandom(32)
            header, data = value(3 * PIECE)
            assert t.put_many([(NS, key, header, data)]) == [True]
            [got] = t.get_many(NS, [key])
            assert got is not None and got.payload == data
            with server.nodes[0].client() as c:
                assert c.dbsize() == 2  # one 1 MiB piece and the header
    finally:
        t.close()


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RemoteTier(["http://example.invalid:6379"])


class InterruptingSink:
    """Gives buffers like the store does, and runs `first` as the first is asked for:
    after the header records came, before any piece is read."""

    def __init__(self, first: Callable[[], object]) -> None:
        self.first = first
        self.handed: set[int] = set()
        self.discarded: set[int] = set()
        self.lock = threading.Lock()

    def buffer(self, index: int, header: ValueHeader) -> memoryview | None:
        with self.lock:
            if not self.handed:
                self.first()
            self.handed.add(index)
        return memoryview(bytearray(header.payload_len))

    def discard(self, index: int) -> None:
        with self.lock:
            self.discarded.add(index)


def test_a_read_past_its_deadline_gives_its_buffers_back_when_it_ends(
    redis_cluster: LocalCluster,
) -> None:
    t = RemoteTier(redis_cluster.urls, piece_bytes=PIECE, timeout_s=0.5, backoff_s=0.2, workers=4)
    try:
        keys = [os.urandom(32) for _ in range(40)]
        owners = [redis_cluster.owner(key_slot(header_key(t.prefix, NS, k))) for k in keys]
        on_one = [k for k, o in zip(keys, owners, strict=True) if o == 1][:6]
        t.put_many([(NS, k, *value(3 * PIECE)) for k in on_one])
        sink = InterruptingSink(lambda: redis_cluster.pause(1))  # hangs, connections open
        try:
            started = time.monotonic()
            got = t.get_many(NS, on_one, sink)
            assert time.monotonic() - started < 1.5
            assert got == [None] * len(on_one)
            assert sink.handed
        finally:
            redis_cluster.resume(1)
        deadline = time.monotonic() + 5
        while sink.discarded != sink.handed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.discarded == sink.handed  # given back by the read itself, once it ended
    finally:
        t.close()


def test_a_master_killed_between_headers_and_pieces_misses_only_its_values(
    tier: RemoteTier, redis_cluster: LocalCluster
) -> None:
    keys = [os.urandom(32) for _ in range(30)]
    values = [value(2 * PIECE + i) for i in range(30)]
    assert all(tier.put_many([(NS, k, h, d) for k, (h, d) in zip(keys, values, strict=True)]))
    owner = [redis_cluster.owner(key_slot(header_key(tier.prefix, NS, k))) for k in keys]
    assert {0, 1, 2} <= set(owner)
    sink = InterruptingSink(lambda: redis_cluster.kill(1))
    try:
        started = time.monotonic()
        got = tier.get_many(NS, keys, sink)
        assert time.monotonic() - started < tier.timeout_s + 0.5
    finally:
        redis_cluster.restart(1)
    assert sink.handed == set(range(len(keys)))  # every header came before the kill
    for i, (g, o, (_, d)) in enumerate(zip(got, owner, values, strict=True)):
        if o == 1:
            assert g is None and i in sink.discarded
        else:
            assert g is not None and bytes(g.payload) == d and i not in sink.discarded


def test_a_tier_closed_between_headers_and_pieces_gives_every_buffer_back(
    redis_cluster: LocalCluster,
) -> None:
    t = RemoteTier(redis_cluster.urls, piece_bytes=PIECE, workers=2)
    keys = [os.urandom(32) for _ in range(12)]
    assert all(t.put_many([(NS, k, *value(2 * PIECE)) for k in keys]))
    sink = InterruptingSink(t.close)
    assert t.get_many(NS, keys, sink) == [None] * len(keys)
    assert sink.handed == set(range(len(keys)))
    assert sink.discarded == sink.handed  # no job ran: the read gave them all back


def test_a_closed_tier_answers_misses(tier: RemoteTier, redis_cluster: LocalCluster) -> None:
    key = os.urandom(32)
    tier.put_many([(NS, key, *value(10))])
    t = RemoteTier(redis_cluster.urls, piece_bytes=PIECE)
    t.close()  # as at shutdown, with reads still arriving
    assert t.get_many(NS, [key]) == [None]
    assert t.exists_many(NS, [key]) == [False]
    assert t.put_many([(NS, key, *value(10))]) == [False]


def test_tls_and_a_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rediss://` with the server's CA in the URL, the password given apart (as
    KVSTORE_REMOTE_PASSWORD does), against a plain redis-server with TLS and requirepass."""
    binary = require_redis_server()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    plain, tls = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            binary, "--port", str(plain), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--save", "", "--appendonly", "no", "--requirepass", "s3cret",
            "--tls-port", str(tls), "--tls-cert-file", str(cert_pem),
            "--tls-key-file", str(key_pem), "--tls-ca-cert-file", str(ca_pem),
            "--tls-auth-clients", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis("127.0.0.1", plain, password="s3cret") as c:
                    c.ping()
                break
            except redis.RedisError:
                assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.05)
        url = f"rediss://127.0.0.1:{tls}?ssl_ca_certs={ca_pem}"
        monkeypatch.setenv("KVSTORE_REMOTE_PASSWORD", "s3cret")
        cfg = ServerConfig.load({"data_dir": tmp_path / "d", "tiers": "cpu,remote", "remote": url})
        t = RemoteTier(cfg.remote, piece_bytes=PIECE, password=cfg.remote_password)
        try:
            assert t.connected
            key = os.urandom(32)
            header, data = value(2 * PIECE + 1)
            assert t.put_many([(NS, key, header, data)]) == [True]
            [got] = t.get_many(NS, [key])
            assert got is not None and got.payload == data
        finally:
            t.close()
        without = RemoteTier([url], timeout_s=0.5)  # no password: refused, so not connected
        try:
            assert not without.connected
            assert without.get_many(NS, [key]) == [None]
        finally:
            without.close()
    finally:
        proc.terminate()
        proc.wait(10)

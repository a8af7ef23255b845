"""Many clients at once: no torn values, no values under the wrong key."""

from __future__ import annotations

import random
import threading
import time

import torch

from kvstore.client import KVClient

CLIENTS = 16
OPS = 60
KEYS = 24


def key(i: int) -> bytes:
    return b"C" + i.to_bytes(2, "little") + bytes(29)


def make_value(k: int, writer: int, seq: int, nbytes: int) -> torch.Tensor:
    """Header (key, writer, seq) then bytes derived from it: any tear or mix-up shows."""
    head = torch.tensor([k, writer, seq, nbytes], dtype=torch.int64).view(torch.uint8)
    g = torch.Generator().manual_seed(k * 1_000_003 + writer * 1009 + seq)
    body = torch.randint(0, 256, (nbytes - head.numel(),), generator=g, dtype=torch.uint8)
    return torch.cat([head, body])


def check_value(k: int, t: torch.Tensor) -> None:
    hk, writer, seq, nbytes = t[:32].view(torch.int64).tolist()
    assert hk == k, f"value of key {hk} returned for key {k}"
    assert t.numel() == nbytes
    assert torch.equal(t, make_value(k, writer, seq, nbytes)), f"torn value for key {k}"


def test_sixteen_clients_mixed_put_get_delete(start_server) -> None:  # type: ignore[no-untyped-def]
    # A small cpu tier makes demotion and promotion race with the clients too.
    srv = start_server("--cpu-bytes", "16MiB", "--ssd-bytes", "256MiB")
    errors: list[BaseException] = []
    counts = {"put": 0, "get": 0, "hit": 0, "delete": 0}
    lock = threading.Lock()

    def worker(writer: int) -> None:
        rng = random.Random(writer)
        try:
            with KVClient(srv.address, "test/concurrency") as c:
                for seq in range(OPS):
                    k = rng.randrange(KEYS)
                    op = rng.random()
                    if op < 0.45:
                        nbytes = rng.choice([4096, 100_000, 1 << 20, (5 << 20) + 12345])
                        c.put(key(k), make_value(k, writer, seq, nbytes))
                        name = "put"
                    elif op < 0.9:
                        got = c.get(key(k))
                        if got is not None:
                            check_value(k, got)
                            with lock:
                                counts["hit"] += 1
                        name = "get"
                    else:
                        c.delete([key(k)])
                        name = "delete"
                    with lock:
                        counts[name] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors[0]
    assert counts["hit"] > 0 and counts["put"] > 0 and counts["delete"] > 0

    with KVClient(srv.address, "test/concurrency") as c:
        for k in range(KEYS):
            got = c.get(key(k))
            if got is not None:
                check_value(k, got)
        # Every read released its lease: in the background, so the last may land after a
        # stats call made at once.
        deadline = time.monotonic() + 10
        while (s := c.stats()).leases and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.leases == 0
        assert s.tiers["cpu"].used_bytes <= 16 << 20
        assert s.tiers["cpu"].evictions > 0  # the race with demotion really happened

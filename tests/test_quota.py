"""Per-namespace-group quotas of bytes per tier (`--quota`), enforced by the store."""

from __future__ import annotations

import contextlib
import fnmatch
import random
import time
from collections.abc import Callable

import pytest

from kvstore.codecs.container import checksum
from kvstore.config import ConfigError, ServerConfig, quota_rule
from kvstore.errors import ResourceExhausted
from kvstore.store import GPU_LOW_WATER, Store
from kvstore.tiers.gpu import TwinPool
from tests.test_store import MiB, key, put, read, value

MakeStore = Callable[..., Store]
A = "tenant-a/llama"
B = "tenant-b/llama"


def usage(store: Store) -> dict[str, int]:
    return {f"{q.tier}[{q.namespaces}]": q.used_bytes for q in store.stats().quotas}


def recount(store: Store) -> dict[str, int]:
    """What each rule's usage must be, counted from the entries themselves."""
    out = {}
    for q in store.stats().quotas:
        rule = f"{q.tier}[{q.namespaces}]"
        out[rule] = sum(
            e.nbytes
            for e in store.entries()
            if fnmatch.fnmatchcase(e.namespace, q.namespaces)
            and (e.on_ssd if q.tier == "ssd" else e.slot is not None and e.tier == q.tier)
        )
    return out


def tiers_of(store: Store, ns: str) -> dict[bytes, str]:
    return {e.key: e.tier for e in store.entries(ns)}


def test_a_group_over_its_cpu_quota_demotes_its_own_entries_never_another_groups(
    make_store: MakeStore,
) -> None:
    s = make_store(
        cpu_bytes="16MiB", ssd_bytes="64MiB", quota=["cpu[tenant-a/*]=4MiB", "cpu[tenant-b/*]=4MiB"]
    )
    b_values = {key(100 + i): value(100 + i) for i in range(3)}
    for k, v in b_values.items():
        assert put(s, k, v, B) == "cpu"
    a_values = {key(i): value(i) for i in range(10)}
    for k, v in a_values.items():
        assert put(s, k, v, A) == "cpu"  # room made within the quota, every time
    assert usage(s) == {"cpu[tenant-a/*]": 4 * MiB, "cpu[tenant-b/*]": 3 * MiB} == recount(s)
    assert set(tiers_of(s, B).values()) == {"cpu"}  # B untouched
    a_tiers = tiers_of(s, A)
    assert [a_tiers[key(i)] for i in range(10)] == ["ssd"] * 6 + ["cpu"] * 4  # oldest went
    for k, v in {**a_values}.items():
        assert read(s, k, A) == v  # demoted, not lost (a read promotes within the quota)
    for k, v in b_values.items():
        assert read(s, k, B) == v
    assert usage(s)["cpu[tenant-a/*]"] <= 4 * MiB
    assert usage(s) == recount(s)


def test_a_group_over_its_ssd_quota_drops_its_own_oldest(make_store: MakeStore) -> None:
    s = make_store(tiers="ssd", ssd_bytes="64MiB", quota=["ssd[tenant-a/*]=5MiB"])
    for i in range(4):
        put(s, key(100 + i), value(100 + i), B)
    for i in range(8):
        assert put(s, key(i), value(i), A) == "ssd"
    assert sorted(tiers_of(s, A)) == [key(i) for i in range(3, 8)]  # the five newest
    assert len(tiers_of(s, B)) == 4
    assert usage(s) == {"ssd[tenant-a/*]": 5 * MiB} == recount(s)
    with pytest.raises(ResourceExhausted, match=r"larger than the quota ssd\[tenant-a/\*\]"):
        put(s, key(50), value(50, 6 * MiB), A)
    assert len(tiers_of(s, A)) == 5  # nothing made room for a value that can never fit


def test_a_value_larger_than_the_cpu_quota_goes_to_ssd_or_is_refused(
    make_store: MakeStore,
) -> None:
    with_ssd = make_store(cpu_bytes="16MiB", quota=["cpu[tenant-a/*]=1MiB"])
    assert put(with_ssd, key(1), value(1, 2 * MiB), A) == "ssd"
    cpu_only = make_store(
        tiers="cpu",
        cpu_bytes="16MiB",
        quota=["cpu[tenant-a/*]=1MiB"],
        data_dir=with_ssd.config.data_dir / "b",
    )
    with pytest.raises(ResourceExhausted, match=r"quota cpu\[tenant-a/\*\]=1048576"):
        put(cpu_only, key(1), value(1, 2 * MiB), A)
    assert put(cpu_only, key(2), value(2, 2 * MiB), B) == "cpu"  # no quota for B


def test_pinned_values_hold_the_quota_and_others_are_untouched(make_store: MakeStore) -> None:
    s = make_store(tiers="cpu", cpu_bytes="16MiB", quota=["cpu[tenant-a/*]=2MiB"])
    b_value = value(100)
    put(s, key(100), b_value, B)
    put(s, key(1), value(1), A)
    put(s, key(2), value(2), A)
    assert s.pin(A, [key(1), key(2)], 1) == 2
    with pytest.raises(ResourceExhausted, match=r"within the quota cpu\[tenant-a/\*\]"):
        put(s, key(3), value(3), A)
    assert read(s, key(100), B) == b_value
    assert usage(s) == {"cpu[tenant-a/*]": 2 * MiB} == recount(s)


def test_first_matching_rule_of_a_tier_is_the_group(make_store: MakeStore) -> None:
    s = make_store(
        cpu_bytes="16MiB",
        quota=["cpu[tenant-a/small]=1MiB", "cpu[tenant-a/*]=3MiB", "ssd[tenant-a/*]=8MiB"],
    )
    put(s, key(1), value(1), "tenant-a/small")
    put(s, key(2), value(2), A)
    assert usage(s) == {
        "cpu[tenant-a/small]": MiB,
        "cpu[tenant-a/*]": MiB,
        "ssd[tenant-a/*]": 0,
    }


Op = Callable[[Store, bytes, str, int, random.Random], object]
# (weight, operation on key k of namespace ns at step n) common to both churn tests.
COMMON_OPS: list[tuple[float, Op]] = [
    (2, lambda s, k, ns, n, rng: read(s, k, ns)),
    (1, lambda s, k, ns, n, rng: s.delete(ns, [k])),
    (1, lambda s, k, ns, n, rng: s.pin(ns, [k], 1)),
    (1, lambda s, k, ns, n, rng: s.pin(ns, [k], -1)),
]


def churn(s: Store, seed: int, ops: list[tuple[float, Op]], steps: int = 400) -> None:
    """Random operations over a few keys of three namespaces; after each, every rule's usage
    equals the bytes its entries hold and is within its quota."""
    rng = random.Random(seed)
    weights = [w for w, _ in ops]
    for step in range(steps):
        ns = rng.choice([A, B, "other/x"])
        k = key(rng.randrange(10))
        [(_, op)] = rng.choices(ops, weights)
        # Pinned values may leave no room; what matters is the bookkeeping.
        with contextlib.suppress(ResourceExhausted):
            op(s, k, ns, step, rng)
        assert usage(s) == recount(s), f"step {step}"
        for q in s.stats().quotas:
            assert q.used_bytes <= q.quota_bytes, f"step {step}: {q}"


def test_usage_follows_every_kind_of_change_and_survives_restart(make_store: MakeStore) -> None:
    rules = ["cpu[tenant-a/*]=3MiB", "ssd[tenant-a/*]=6MiB", "cpu[tenant-b/*]=5MiB"]
    s = make_store(cpu_bytes="8MiB", ssd_bytes="24MiB", quota=rules)
    sizes = [MiB // 2, MiB, 2 * MiB]
    churn(
        s,
        5,
        [*COMMON_OPS, (5, lambda s, k, ns, n, rng: put(s, k, value(n, rng.choice(sizes)), ns))],
    )
    s.close()
    again = make_store(cpu_bytes="8MiB", ssd_bytes="24MiB", quota=rules)
    assert usage(again) == recount(again)


def put_gpu(store: Store, k: bytes, data: bytes, ns: str, *, abort: bool = False) -> str:
    """A put as a same-host GPU client makes it: reserve in pool 1 (the host twin of a CUDA
    pool) or else the cpu arena, write, commit (or abort); the tier it was (to be) in."""
    res = store.reserve_in_arena(ns, k, "uint8", [len(data)], len(data), checksum(data), pool=1)
    if res is None:
        return "stream it"  # no room in pool or arena now: the client would stream it
    if res.place:
        pool = store.pools[1]
        assert isinstance(pool, TwinPool) and res.slot is not None
        pool.view(res.slot, len(data))[:] = data
    else:
        assert res.buffer is not None
        res.buffer[:] = data
    res.written()
    if abort:
        res.abort()
        return res.tier
    return res.commit()


@pytest.fixture
def no_demoter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores made after this demote only when a test calls `demote` itself."""
    monkeypatch.setattr(Store, "_demote_forever", lambda self: None)


GPU = {"tiers": "gpu,cpu,ssd", "gpu_twin": True, "gpu_bytes": "8MiB", "cpu_bytes": "16MiB"}


def test_a_group_at_its_gpu_quota_lands_in_cpu_and_sheds_only_its_own(
    make_store: MakeStore, no_demoter: None
) -> None:
    s = make_store(**GPU, quota=["gpu[tenant-a/*]=3MiB"])
    a_values = {key(i): value(i) for i in range(5)}
    b_values = {key(100 + i): value(100 + i) for i in range(3)}
    assert [put_gpu(s, key(i), a_values[key(i)], A) for i in range(3)] == ["gpu"] * 3
    assert put_gpu(s, key(3), a_values[key(3)], A) == "cpu"  # past the quota: no waiting
    for k, v in b_values.items():
        assert put_gpu(s, k, v, B) == "gpu"  # the pool has room; B has no gpu quota
    assert usage(s) == {"gpu[tenant-a/*]": 3 * MiB} == recount(s)
    # The pool is 75% full, under its own high-water mark: only the group is over its own.
    assert s.demote(1) == 1
    assert usage(s) == {"gpu[tenant-a/*]": 2 * MiB} == recount(s)
    assert s.demote(1) == 0  # back under the group's high-water mark
    a_tiers, b_tiers = tiers_of(s, A), tiers_of(s, B)
    assert [a_tiers[key(i)] for i in range(4)] == ["cpu", "gpu", "gpu", "cpu"]  # oldest went
    assert set(b_tiers.values()) == {"gpu"}  # B untouched
    assert put_gpu(s, key(9), value(9), A, abort=True) == "gpu"  # gives its room back
    assert usage(s) == {"gpu[tenant-a/*]": 2 * MiB} == recount(s)
    assert put_gpu(s, key(4), a_values[key(4)], A) == "gpu"  # room again within the quota
    for k, v in a_values.items():
        assert read(s, k, A) == v
    for k, v in b_values.items():
        assert read(s, k, B) == v


def test_the_demoter_thread_brings_a_gpu_group_back_under_its_quota(
    make_store: MakeStore,
) -> None:
    s = make_store(**GPU, quota=["gpu[tenant-a/*]=4MiB"])
    a_values = {key(i): value(i) for i in range(4)}
    for k, v in a_values.items():
        assert put_gpu(s, k, v, A) == "gpu"
    deadline = time.monotonic() + 10
    while usage(s)["gpu[tenant-a/*]"] > GPU_LOW_WATER * 4 * MiB and time.monotonic() < deadline:
        time.sleep(0.02)
    assert usage(s) == {"gpu[tenant-a/*]": 2 * MiB} == recount(s)
    assert tiers_of(s, A) == {key(0): "cpu", key(1): "cpu", key(2): "gpu", key(3): "gpu"}
    for k, v in a_values.items():
        assert read(s, k, A) == v


def test_gpu_quota_usage_follows_reservations_aborts_and_demotions(
    make_store: MakeStore, no_demoter: None
) -> None:
    rules = ["gpu[tenant-a/*]=3MiB", "cpu[tenant-a/*]=4MiB", "gpu[tenant-b/*]=2MiB"]
    s = make_store(**GPU, quota=rules)
    churn(
        s,
        9,
        [
            *COMMON_OPS,
            (
                3.5,
                lambda s, k, ns, n, rng: put_gpu(s, k, value(n, rng.choice([MiB // 2, MiB])), ns),
            ),
            (1, lambda s, k, ns, n, rng: put_gpu(s, k, value(n), ns, abort=True)),
            (1, lambda s, k, ns, n, rng: put(s, k, value(n), ns)),
            (1.5, lambda s, k, ns, n, rng: s.demote(1)),
        ],
    )
    assert any(e.tier == "gpu" for e in s.entries(A)) and any(e.tier == "cpu" for e in s.entries(A))


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("cpu=8GiB", "names no namespaces"),
        ("remote[a/*]=1GiB", "takes no quota"),
        ("cpu[a/*]=8 gigs", "cannot read"),
        ("cpu[a/*]", "TIER[GLOB]=SIZE"),
        ("cpu[]=1GiB", "TIER[GLOB]=SIZE"),
    ],
)
def test_bad_quota_rules_are_clear_errors(rule: str, words: str) -> None:
    with pytest.raises(ConfigError, match=r"^quota.*" + words.replace("[", r"\[")):
        quota_rule(rule)


def test_quota_rules_from_every_source() -> None:
    cfg = ServerConfig.load(environ={"KVSTORE_QUOTA": "cpu[a/*]=1GiB;ssd[a/*]=2GiB"})
    assert [quota_rule(r).quota_bytes for r in cfg.quota] == [1 << 30, 2 << 30]
    with pytest.raises(ConfigError, match="same tier and namespaces"):
        ServerConfig(quota=("cpu[a/*]=1GiB", "cpu[a/*]=2GiB"))

"""Per-namespace-group quotas of bytes per tier (`--quota`), enforced by the store."""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Callable

import pytest

from kvstore.config import ConfigError, ServerConfig, quota_rule
from kvstore.errors import ResourceExhausted
from kvstore.store import Store
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
            and (e.on_ssd if q.tier == "ssd" else e.slot is not None and e.place == 0)
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


def test_usage_follows_every_kind_of_change_and_survives_restart(make_store: MakeStore) -> None:
    rules = ["cpu[tenant-a/*]=3MiB", "ssd[tenant-a/*]=6MiB", "cpu[tenant-b/*]=5MiB"]
    s = make_store(cpu_bytes="8MiB", ssd_bytes="24MiB", quota=rules)
    rng = random.Random(5)
    for step in range(400):
        ns = rng.choice([A, B, "other/x"])
        k = key(rng.randrange(12))
        op = rng.random()
        try:
            if op < 0.5:
                put(s, k, value(step, rng.choice([MiB // 2, MiB, 2 * MiB])), ns)
            elif op < 0.7:
                read(s, k, ns)
            elif op < 0.8:
                s.delete(ns, [k])
            elif op < 0.9:
                s.pin(ns, [k], 1)
            else:
                s.pin(ns, [k], -1)
        except ResourceExhausted:
            pass  # pinned values may leave no room; what matters is the bookkeeping
        assert usage(s) == recount(s), f"step {step}"
        for q in s.stats().quotas:
            assert q.used_bytes <= q.quota_bytes, f"step {step}: {q}"
    s.close()
    again = make_store(cpu_bytes="8MiB", ssd_bytes="24MiB", quota=rules)
    assert usage(again) == recount(again)


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("cpu=8GiB", "names no namespaces"),
        ("gpu[a/*]=1GiB", "takes no quota"),
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

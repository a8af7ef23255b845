"""`KVRouter` following two real servers: it picks the node with the longest cached prefix,
follows an eviction, and reconnects to a restarted node."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvstore.client.router import KVRouter
from tests.e2e.conftest import NAMESPACE, ServerProcess
from tests.e2e.helpers import key

CT = 16
FLAGS = ("--tiers", "cpu", "--cpu-bytes", "1MiB", "--chunk-tokens", str(CT))


def chunk(i: int) -> torch.Tensor:
    return torch.full((128 << 10,), i % 251, dtype=torch.uint8)  # 128 KiB: 8 fill the tier


def put_prefix(srv: ServerProcess, token_ids: list[int], chunks: int) -> None:
    with srv.client() as c:
        keys = c.prefix_keys(token_ids)[:chunks]
        c.batch_put(keys, [chunk(i) for i in range(len(keys))])


def eventually(what: Callable[[], object], want: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := what()) != want:
        assert time.monotonic() < deadline, f"still {got!r}, wanted {want!r}"
        time.sleep(0.02)


def test_the_router_picks_the_longest_prefix_and_follows_evictions_and_restarts(
    start_server: Callable[..., ServerProcess],
) -> None:
    one = start_server(*FLAGS, name="one")
    two = start_server(*FLAGS, name="two")
    prompt_a = list(range(4 * CT))
    prompt_b = list(range(1000, 1000 + 3 * CT))
    put_prefix(one, prompt_a, 4)
    put_prefix(two, prompt_a, 1)
    with KVRouter(NAMESPACE, nodes={"one": one.address}, backoff=(0.05, 0.5)) as router:
        router.follow("two", two.address)
        assert router.wait_synced(20)
        assert router.chunk_tokens == CT  # asked of the server
        put_prefix(two, prompt_b, 3)  # after the snapshot: a live event
        eventually(lambda: [(m.node, m.chunks) for m in router.rank(prompt_a)],
                   [("one", 4), ("two", 1)])  # fmt: skip
        eventually(lambda: (m := router.best(prompt_b)) and (m.node, m.chunks), ("two", 3))
        assert router.rank(prompt_a)[0].tiers == ("cpu",) * 4

        # Other values evict prompt A's chunks from node one (LRU; the tier holds 8).
        with one.client("other/model") as c:
            c.batch_put([key(i) for i in range(8)], [chunk(i) for i in range(8)])
        eventually(lambda: (m := router.best(prompt_a)) and (m.node, m.chunks), ("two", 1))

        # Node two restarts empty (cpu only): the router reconnects and follows the new one.
        two.restart()
        eventually(lambda: router.best(prompt_b), None)
        put_prefix(two, prompt_b, 2)
        eventually(lambda: (m := router.best(prompt_b)) and (m.node, m.chunks), ("two", 2))

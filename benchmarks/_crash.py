"""Crash cycles against a real `kvstore-server`: random puts and gets from client threads,
`kill -9` at a random moment (often in the middle of a put's stream), restart, then every
key the store returns checked byte for byte against what was put.

One piece for the CI test (`tests/e2e/test_crash.py`, a few dozen cycles) and the soak
(`benchmarks/soak_crash.py`, hundreds). What a cycle checks:
- no wrong byte: every value a get returns, during the workload or after the restart, is
  exactly one that was put under that key (the last acknowledged one, or one whose put was
  cut off by the crash);
- no lost ssd put: a key whose last put was acknowledged as stored on ssd is there after
  the restart (no ssd eviction happens: the ssd tier is sized above everything put);
- the store lists no key that was never put, and no value fails its checksum;
- the restarted server replaced the dead one's shared-memory arena (a new file) and
  socket, and the same client objects reconnected on their own.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _procs import start_kvstore

from kvstore.client import KVClient
from kvstore.errors import DataLoss, KVStoreError
from kvstore.tiers.host import default_arena_path

NAMESPACE = "crash/test"
MiB = 1 << 20
# Small values land in the cpu arena; the largest span two 4 MiB pieces and skip the arena
# (bigger than its largest slot), so they stream to ssd; the cpu tier is small enough that
# the others are demoted to ssd as it fills.
SIZES = (4096, 64 << 10, 1 * MiB, 6 * MiB)
KEYS_PER_WORKER = 24
WORKERS = 2
CPU_BYTES = "24MiB"
SSD_BYTES = "1GiB"  # above everything the workers can hold: ssd never evicts


def key_of(i: int) -> bytes:
    return b"C" + i.to_bytes(4, "little") + bytes(27)


def value_of(i: int, version: int) -> torch.Tensor:
    """The bytes of put number `version` of key `i`: its size and content follow from both."""
    size = SIZES[(i * 7 + version) % len(SIZES)]
    g = torch.Generator().manual_seed(i * 1_000_003 + version)
    return torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)


@dataclass
class KeyState:
    """What the store may hold under one key."""

    acked: int | None = None  # version of the last acknowledged put; None: absent
    acked_tier: str = ""
    pending: set[int] = field(default_factory=set)  # puts sent since, not acknowledged
    next_version: int = 0

    def allowed(self) -> set[int]:
        return self.pending | ({self.acked} if self.acked is not None else set())


@dataclass
class CycleResult:
    puts: int = 0
    gets: int = 0
    hits_after: int = 0
    ssd_acked: int = 0
    kill_mid_put: bool = False
    down_s: float = 0.0


class CrashFailure(AssertionError):
    """The store returned a wrong byte, lost an acknowledged ssd put, or failed to recover."""


class CrashHarness:
    """A server on `workdir/data` that `cycle()` kills and restarts, and the model of what
    it may hold."""

    def __init__(
        self,
        workdir: Path,
        durability: str = "sync",
        seed: int = 0,
        max_run_s: float = 1.2,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.socket = self.data_dir / "kvstore.sock"
        self.address = f"unix://{self.socket}"
        self.durability = durability
        self.rng = random.Random(seed)
        self.max_run_s = max_run_s
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.keys = [KeyState() for _ in range(WORKERS * KEYS_PER_WORKER)]
        self.clients: list[KVClient] = []
        self.totals = CycleResult()
        self.cycles = 0
        self.kills_mid_put = 0

    # ------------------------------------------------------------------ process

    def start(self) -> None:
        try:
            self.proc = start_kvstore(
                self.data_dir,
                self.log_path,
                *("--cpu-bytes", CPU_BYTES, "--ssd-bytes", SSD_BYTES),
                *("--durability", self.durability, "--grace-seconds", "2"),
                announce=False,
            )
        except RuntimeError as exc:
            raise CrashFailure(str(exc)) from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        for c in self.clients:
            c.close()
        self.clients = []
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.proc = None
        return rc

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ cycles

    def cycle(self) -> CycleResult:
        """One round: workload, kill -9 at a random moment, restart, verify everything."""
        if self.proc is None:
            self.start()
        if not self.clients:
            self.clients = [KVClient(self.address, NAMESPACE, timeout=10) for _ in range(WORKERS)]
        result = CycleResult()
        stop = threading.Event()
        in_put = [False] * WORKERS
        errors: list[BaseException] = []
        threads = [
            threading.Thread(
                target=self._work,
                args=(w, self.clients[w], stop, in_put, result, errors, self.rng.random()),
            )
            for w in range(WORKERS)
        ]
        for t in threads:
            t.start()
        time.sleep(self.rng.uniform(0.05, self.max_run_s))
        result.kill_mid_put = any(in_put)
        arena = default_arena_path(self.data_dir)
        old_ino = arena.stat().st_ino
        self.kill()
        killed = time.monotonic()
        # The clients keep going a moment against the dead server: reads must be misses,
        # writes a typed error; neither may hang past the deadline.
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
            if t.is_alive():
                raise CrashFailure("a client call hung after the server was killed")
        if errors:
            raise errors[0]
        if not self.socket.exists() or not arena.exists():
            raise CrashFailure("expected the killed server's socket and arena to be left over")
        self.start()
        result.down_s = time.monotonic() - killed
        if arena.stat().st_ino == old_ino:
            raise CrashFailure(f"the restarted server reuses the dead one's arena file {arena}")
        self._verify(result)
        self.cycles += 1
        for name in ("puts", "gets", "hits_after", "ssd_acked"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(result, name))
        self.kills_mid_put += result.kill_mid_put
        return result

    def _work(
        self,
        w: int,
        client: KVClient,
        stop: threading.Event,
        in_put: list[bool],
        result: CycleResult,
        errors: list[BaseException],
        seed: float,
    ) -> None:
        rng = random.Random(seed)
        mine = range(w * KEYS_PER_WORKER, (w + 1) * KEYS_PER_WORKER)
        try:
            while not stop.is_set():
                i = rng.choice(mine)
                state = self.keys[i]
                if rng.random() < 0.6:
                    version = state.next_version
                    state.next_version += 1
                    state.pending.add(version)
                    in_put[w] = True
                    try:
                        tier = client.put(key_of(i), value_of(i, version))
                    except DataLoss:
                        raise
                    except KVStoreError:
                        continue  # the server is gone: this put may or may not have landed
                    finally:
                        in_put[w] = False
                    state.pending.clear()  # puts of one key are sequential: older ones lost
                    state.acked, state.acked_tier = version, tier
                    result.puts += 1
                else:
                    got = client.get(key_of(i))  # a miss, never an error, once it is down
                    result.gets += 1
                    if got is not None:
                        check_value(i, got, state.allowed(), "during the workload")
        except BaseException as exc:
            errors.append(exc)

    def _verify(self, result: CycleResult) -> None:
        with KVClient(self.address, NAMESPACE, timeout=30) as c:
            listed = {bytes(e.header.key) for e in c.entries(NAMESPACE)}
            known = {key_of(i) for i in range(len(self.keys))}
            if listed - known:
                raise CrashFailure(f"the store lists {len(listed - known)} keys never put")
            for i, state in enumerate(self.keys):
                try:
                    got = c.get(key_of(i))
                except DataLoss as exc:
                    raise CrashFailure(f"key {i}: a value failed its checksum: {exc}") from None
                if got is None:
                    if state.acked_tier == "ssd" and not state.pending:
                        raise CrashFailure(
                            f"key {i}: put {state.acked} was acknowledged on ssd "
                            f"(--durability {self.durability}) and is gone after kill -9"
                        )
                    state.acked, state.acked_tier = None, ""
                else:
                    version = check_value(i, got, state.allowed(), "after the restart")
                    result.hits_after += 1
                    # From here on this is the value the store holds, on ssd (a restart
                    # only has what ssd kept).
                    state.acked, state.acked_tier = version, "ssd"
                state.pending.clear()
                result.ssd_acked += state.acked_tier == "ssd"


def check_value(i: int, got: torch.Tensor, allowed: set[int], when: str) -> int:
    """Which allowed version of key `i` `got` is, byte for byte; CrashFailure if none."""
    data = got.contiguous().view(torch.uint8).reshape(-1)
    for version in sorted(allowed, reverse=True):
        want = value_of(i, version)
        if data.numel() == want.numel() and torch.equal(data, want):
            return version
    raise CrashFailure(
        f"key {i} {when}: {data.numel()} bytes that match none of the versions put "
        f"({sorted(allowed)}): a wrong byte"
    )


def run_cycles(
    workdir: Path,
    cycles: int,
    durability: str = "sync",
    seed: int = 0,
    max_run_s: float = 1.2,
    progress: Callable[[str], None] = lambda _: None,
    every: int = 1,
) -> CrashHarness:
    """`cycles` crash cycles on a fresh data directory; raises CrashFailure on the first
    problem (the server's log tail attached). Returns the harness, stopped."""
    harness = CrashHarness(workdir, durability, seed, max_run_s)
    started = time.monotonic()
    try:
        for n in range(1, cycles + 1):
            try:
                r = harness.cycle()
            except CrashFailure as exc:
                raise CrashFailure(f"cycle {n}: {exc}\nserver log:\n{harness.tail()}") from None
            if n % every == 0 or n == cycles:
                progress(
                    f"cycle {n}/{cycles}: {r.puts} puts, {r.gets} gets, killed "
                    f"{'mid-put' if r.kill_mid_put else 'between puts'}, back in "
                    f"{r.down_s:.2f}s, {r.hits_after} values verified "
                    f"({r.ssd_acked} on ssd), {time.monotonic() - started:.0f}s so far"
                )
        if harness.stop() != 0:
            raise CrashFailure(f"the server did not stop cleanly:\n{harness.tail()}")
        if default_arena_path(harness.data_dir).exists():
            raise CrashFailure("a clean shutdown left the arena in /dev/shm")
    finally:
        if harness.proc is not None:
            harness.kill()
        for c in harness.clients:
            c.close()
    return harness

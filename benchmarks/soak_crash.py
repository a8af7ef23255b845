"""Crash soak: hundreds of `kill -9` cycles against a real `kvstore-server`.

Each cycle runs random puts and gets (4 KiB to 6 MiB values, the largest streamed straight
to ssd, the cpu tier small enough to demote) from two client threads, kills the server
with SIGKILL at a random moment, restarts it, and checks every key it returns against the
bytes that were put; with `--durability sync`, no put acknowledged on ssd may be lost. The
cycle code is `_crash.py`, the same the CI test (`tests/e2e/test_crash.py`) runs.

    python benchmarks/soak_crash.py --cycles 200 [--durability sync] [--seed 1]

Progress on stderr every `--every` cycles; a summary at the end; exit 1 on the first
failure, with the server's log tail.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _crash
from _procs import progress

from kvstore.config import DURABILITY_MODES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--durability", choices=DURABILITY_MODES, default="sync")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-run-s", type=float, default=1.5, help="longest workload per cycle")
    p.add_argument("--every", type=int, default=10, help="progress line every N cycles")
    p.add_argument("--workdir", type=Path, help="keep the data directory and log here")
    args = p.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvstore-soak-crash-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        progress(f"{args.cycles} cycles, --durability {args.durability}, data in {workdir}")
        try:
            h = _crash.run_cycles(
                workdir,
                args.cycles,
                args.durability,
                args.seed,
                args.max_run_s,
                progress,
                args.every,
            )
        except _crash.CrashFailure as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    t = h.totals
    elapsed = time.monotonic() - started
    print(
        f"{h.cycles} kill -9 cycles in {elapsed:.0f}s (--durability {args.durability}), "
        f"{h.kills_mid_put} of them in the middle of a put: "
        f"{t.puts} puts acknowledged, {t.gets} gets during the workloads, "
        f"{t.hits_after} values verified byte for byte after restarts "
        f"({t.ssd_acked} held on ssd): no wrong byte, no acknowledged ssd put lost"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

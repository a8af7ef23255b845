"""What the benchmarks share: server processes (start one, wait until it answers, stop it),
progress lines, and writing `--json` / `--plot` outputs (`save_plot` draws the PNGs).

Used by `bench_wire.py`, `bench_gpu.py` and `bench_codecs.py` (run as scripts, so this
directory is on `sys.path`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvstore.client import KVClient
from kvstore.errors import KVStoreError

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def progress(message: str) -> None:
    """One progress line on stderr, named after the running benchmark."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def wait_until_serving(
    proc: subprocess.Popen[bytes],
    name: str,
    socket_path: Path,
    log_path: Path,
    answers: Callable[[], bool],
    announce: bool = True,
) -> None:
    """Poll until `answers()` succeeds on `socket_path`; fail clearly if `proc` dies or stalls."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (socket_path.exists() and answers()):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with status {proc.returncode} before serving:\n"
                + log_tail(log_path)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not answer on {socket_path} within {START_TIMEOUT_S:g}s:\n"
                + log_tail(log_path)
            )
        time.sleep(0.05)
    if announce:
        progress(f"{name} pid {proc.pid} answers on {socket_path}")


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM, wait, then SIGKILL if it has not exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        progress(f"{name} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:g}s; killing it")
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_kvstore(workdir: Path, *flags: str) -> Iterator[str]:
    """Run `kvstore-server` on a data directory under `workdir` with `flags`; yields its
    Unix-socket address. Its log is `workdir/kvstore-server.log`."""
    data_dir = workdir / "kvstore"
    log_path = workdir / "kvstore-server.log"
    log_path.unlink(missing_ok=True)
    proc = start_kvstore(data_dir, log_path, "--log-level", "warning", *flags)
    try:
        yield f"unix://{data_dir / 'kvstore.sock'}"
    finally:
        stop(proc, "kvstore-server")


def exit_on_sigterm() -> None:
    """From now on, SIGTERM ends this process as Ctrl-C does: through its `finally` blocks,
    so the servers it started are stopped and its temporary directories removed. By
    default SIGTERM ends Python on the spot, leaving a server running on a deleted
    directory and its shared-memory arena in /dev/shm. Only from the main thread, and only
    over the default action (a handler someone installed stays)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def exit_(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)


def start_kvstore(
    data_dir: Path, log_path: Path, *flags: str, announce: bool = True
) -> subprocess.Popen[bytes]:
    """Start `kvstore-server` on `data_dir` with `flags`, its output appended to `log_path`,
    and wait until it answers on its socket. A SIGTERM to this process stops the server
    too (`exit_on_sigterm`)."""
    exit_on_sigterm()
    socket_path = data_dir / "kvstore.sock"
    cmd = [sys.executable, "-m", "kvstore.server_cli", "--data-dir", str(data_dir), *flags]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    address = f"unix://{socket_path}"

    def answers() -> bool:
        try:
            with KVClient(address, "bench/probe", timeout=2.0) as probe:
                probe.stats()
            return True
        except KVStoreError:
            return False

    try:
        wait_until_serving(proc, "kvstore-server", socket_path, log_path, answers, announce)
    except BaseException:
        stop(proc, "kvstore-server")
        raise
    return proc


def save_plot(path: Path, draw: Callable[[Any, Any], object], **subplots: Any) -> bool:
    """A PNG at `path` of `draw(fig, axes)` on `matplotlib.pyplot.subplots(**subplots)`;
    False when matplotlib is not installed. The figure is closed either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(**subplots)
    try:
        draw(fig, axes)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True


def write_outputs(
    figures: dict[str, Any],
    json_path: Path | None,
    plot_path: Path | None,
    plot: Callable[[Path], bool],
) -> None:
    """Write the figures as JSON to `json_path` and `plot(plot_path)` a PNG, each when asked;
    `plot` returns False when matplotlib is not installed."""
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {json_path}")
    if plot_path:
        if plot(plot_path):
            print(f"wrote {plot_path}")
        else:
            print(f"note: --plot {plot_path} skipped: matplotlib is not installed")

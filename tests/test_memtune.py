"""Process-wide settings the server applies at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.memtune import keep_freed_buffers, quiet_openmp


def test_quiet_openmp_sets_passive_unless_already_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_numpy_blas_keeps_to_one_thread_unless_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server codes a value per host thread: NumPy's GEMMs inside must not each start
    every core's threads; a BLAS thread count set by the operator stands."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    quiet_openmp()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    quiet_openmp()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
    # kvstore-server sets it before NumPy loads (OpenBLAS reads it once, at load).
    code = (
        "import os, sys; os.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
        "from kvstore import server_cli\n"
        "loaded = 'numpy' in sys.modules\n"
        "try: server_cli.main(['--help'])\n"
        "except SystemExit: pass\n"
        "sys.stderr.write(f\"{loaded} {os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}\")\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stderr.strip().endswith("False 1"), run.stderr


def test_the_server_sets_it_before_loading_openmp() -> None:
    """kvstore-server's main sets it first thing: what the OpenMP runtimes that load later
    (with the codecs) read."""
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "from kvstore import server_cli\n"
        "try: server_cli.main(['--help'])\n"
        "except SystemExit: pass\n"
        "sys.stderr.write(os.environ.get('OMP_WAIT_POLICY', 'unset'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stderr.strip().endswith("PASSIVE"), run.stderr


def test_keep_freed_buffers_applies_on_glibc() -> None:
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        pytest.skip("mallopt's limits are glibc's; this C library is not glibc")
    assert keep_freed_buffers()

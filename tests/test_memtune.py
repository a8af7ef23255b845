"""Process-wide settings the server applies at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.memtune import keep_freed_buffers, quiet_openmp


@pytest.mark.parametrize(
    ("name", "default", "chosen"),
    [("OMP_WAIT_POLICY", "PASSIVE", "ACTIVE"), ("OPENBLAS_NUM_THREADS", "1", "4")],
)
def test_quiet_openmp_sets_its_defaults_unless_already_chosen(
    monkeypatch: pytest.MonkeyPatch, name: str, default: str, chosen: str
) -> None:
    """Idle OpenMP threads sleep; NumPy's BLAS keeps to a thread a call (the server codes a
    value per host thread, and GEMMs inside must not each start every core's threads); what
    the operator set stands."""
    monkeypatch.delenv(name, raising=False)
    quiet_openmp()
    assert os.environ[name] == default
    monkeypatch.setenv(name, chosen)
    quiet_openmp()
    assert os.environ[name] == chosen


@pytest.mark.parametrize(
    ("name", "default"), [("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_NUM_THREADS", "1")]
)
def test_the_server_sets_them_before_loading_openmp(name: str, default: str) -> None:
    """kvstore-server's main sets them first thing, before anything loads NumPy or the
    OpenMP runtimes (which read them once, as they load with the codecs)."""
    code = (
        f"import os, sys; os.environ.pop({name!r}, None)\n"
        "from kvstore import server_cli\n"
        "loaded = 'numpy' in sys.modules\n"
        "try: server_cli.main(['--help'])\n"
        "except SystemExit: pass\n"
        f"sys.stderr.write(f\"{{loaded}} {{os.environ.get({name!r}, 'unset')}}\")\n"
    )
    env = {k: v for k, v in os.environ.items() if k != name}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stderr.strip().endswith(f"False {default}"), run.stderr


def test_keep_freed_buffers_applies_on_glibc() -> None:
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        pytest.skip("mallopt's limits are glibc's; this C library is not glibc")
    assert keep_freed_buffers()

"""numba's threading layer: the codecs' parallel kernels run from several threads at once in a
server (its host pool, concurrent reads), which only a thread-safe layer (OpenMP, TBB)
allows; numba's fallback (workqueue) aborts the process when that happens."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from kvstore import threads
from kvstore.codecs import codec_from_spec
from kvstore.config import ConfigError, ServerConfig
from kvstore.errors import Undecodable
from tests.conftest import MakeStore
from tests.test_store_codecs import NS


def test_this_machine_has_a_threadsafe_layer() -> None:
    # scripts/setup.sh installs libgomp1 where it can; without it the lossy codecs' rules
    # are refused (below) and these tests' servers could not use them.
    assert threads.threadsafe_layer() in ("tbb", "omp")


@pytest.mark.parametrize("spec", ["cachegen:level=1", "kivi:bits=4", "int8", "cachegen-zstd"])
def test_a_codec_with_thread_teams_needs_a_threadsafe_layer(
    spec: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(threads, "threadsafe_layer", lambda: None)
    with pytest.raises(ConfigError, match="install the libgomp1 package"):
        ServerConfig(data_dir=tmp_path, codec=(f"ssd={spec}",))
    ServerConfig(data_dir=tmp_path, codec=("ssd=zstd",))  # no parallel kernels: fine


def test_without_one_a_coded_value_fails_and_the_process_lives(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As in a server (`serve` calls forbid_unsafe_layer): a machine with neither OpenMP nor
    TBB (both made unloadable here) decodes cachegen values on four threads at once; each
    decode raises MissingContext (the value is intact) instead of the workqueue layer
    aborting the process."""
    container = tmp_path / "value.kvc"
    container.write_bytes(codec_from_spec("cachegen:level=1").encode(torch.zeros(2, 2, 64, 2, 64)))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["numba.np.ufunc.omppool"] = None
        sys.modules["numba.np.ufunc.tbbpool"] = None
        import concurrent.futures
        from kvstore.codecs import decode
        from kvstore.threads import forbid_unsafe_layer, threadsafe_layer
        assert threadsafe_layer() is None
        forbid_unsafe_layer()
        data = open({str(container)!r}, "rb").read()
        def one(_):
            try:
                decode(data)
            except ValueError as exc:
                return f"{{type(exc).__name__}}: {{str(exc).splitlines()[0]}}"
            return "decoded"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            print(sorted(set(pool.map(one, range(16)))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]  # SIGABRT without forbid_unsafe_layer
    # One answer for all 16: intact, kept (MissingContext), with the fix to make.
    assert result.stdout.strip() == (
        "['MissingContext: codec cachegen cannot decode on this machine: numba has no "
        "thread-safe threading layer (install the libgomp1 package): No threading layer "
        "could be loaded.']"
    )


def test_a_value_that_cannot_decode_here_is_kept(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On such a machine numba refuses the kernels with a ValueError: a read of an ssd value
    then fails as Undecodable and the value stays, instead of being dropped as damaged."""
    from kvstore.codecs.cachegen import CacheGen
    from tests.test_store_codecs import fill_past_cpu, key, read

    store = make_store(codec=("ssd=cachegen:level=1",))
    fill_past_cpu(store)  # the first two are on ssd only
    monkeypatch.setattr(threads, "threadsafe_layer", lambda: None)

    def refused(*args: object) -> None:
        raise ValueError("No threading layer could be loaded.")  # numba's words

    monkeypatch.setattr(CacheGen, "decode_payload", refused)
    with pytest.raises(Undecodable, match="no thread-safe threading layer"):
        read(store, key(0))
    assert store.exists(NS, [key(0)]) == [True]
    monkeypatch.undo()
    assert read(store, key(0)) is not None


def test_the_server_forbids_the_unsafe_layer_without_loading_numba() -> None:
    """A server that codes nothing never loads numba (whose threads and process lock would
    then start for nothing: the soak test saw its lock in /dev/shm); numba, once loaded,
    takes the thread-safe choice, and one already loaded is switched too."""
    script = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("NUMBA_THREADING_LAYER", None)
        from kvstore.threads import forbid_unsafe_layer
        forbid_unsafe_layer()
        assert "numba" not in sys.modules
        import numba
        assert numba.config.THREADING_LAYER == "threadsafe", numba.config.THREADING_LAYER
        del os.environ["NUMBA_THREADING_LAYER"]
        numba.config.THREADING_LAYER = "default"
        forbid_unsafe_layer()
        assert numba.config.THREADING_LAYER == "threadsafe"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_pool_thread_codes_on_its_own_core() -> None:
    """`one_core_kernels` gives the calling thread one numba thread and one torch thread
    (each of a pool's threads codes its own value); a thread that used torch before keeps
    its own count (a benchmark's or engine's main thread)."""
    code = textwrap.dedent(
        """
        import threading
        import numba, torch
        from kvstore.threads import one_core_kernels
        torch.ones(4).sum()
        main = torch.get_num_threads()
        seen = []
        def work():
            one_core_kernels()
            seen.append((numba.get_num_threads(), torch.get_num_threads()))
        t = threading.Thread(target=work)
        t.start()
        t.join()
        print(seen[0], main == torch.get_num_threads())
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "(1, 1) True", run.stderr


def test_short_gil_turns_shortens_the_switch_interval_and_never_lengthens_it() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        threads.short_gil_turns()
        assert sys.getswitchinterval() == pytest.approx(threads.GIL_TURN_S)
        sys.setswitchinterval(threads.GIL_TURN_S / 5)  # a shorter one set by the caller
        threads.short_gil_turns()
        assert sys.getswitchinterval() == pytest.approx(threads.GIL_TURN_S / 5)
    finally:
        sys.setswitchinterval(before)

"""get_into / put_from / gather with CUDA tensors against a real server (needs a GPU).

The CPU twins of every path here run in tests/e2e/test_transfer.py on any machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.client import KVClient
from kvstore.errors import InvalidArgument, ResourceExhausted
from tests.e2e.test_shared import wait_for
from tests.e2e.test_transfer import NS, chunk, free_port, key


def _gpu_ready() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU, torch and CuPy")


@pytest.fixture
def both(start_server):  # type: ignore[no-untyped-def]
    port = free_port()
    srv = start_server("--cpu-bytes", "256MiB", "--listen", f"127.0.0.1:{port}")
    with srv.client(NS) as local, KVClient(f"127.0.0.1:{port}", NS) as remote:
        yield local, remote


@pytest.mark.parametrize("path", ["arena", "bytes"])
def test_gpu_put_from_and_get_into_on_a_side_stream(both, path: str) -> None:  # type: ignore[no-untyped-def]
    local, remote = both
    c = local if path == "arena" else remote
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        values = torch.randn((8, 4, 2, 64, 8, 64), device="cuda").to(torch.bfloat16)
    keys = [key(i) for i in range(8)]
    assert c.put_from(keys, values, stream=stream).wait(timeout=60) == ["cpu"] * 8
    out = torch.full_like(values, float("nan"))
    handle = c.get_into(keys, out, stream=stream)
    stream.synchronize()  # the bytes are there for work on the stream, before the handle ends
    assert torch.equal(out, values)
    assert handle.wait(timeout=60) == [True] * 8
    assert torch.equal(local.get(key(5)), values[5].cpu())
    assert wait_for(lambda: local.stats().leases == 0)


def test_gpu_get_into_marks_let_another_stream_start_on_the_first_values(both) -> None:  # type: ignore[no-untyped-def]
    local, _ = both
    copy, compute = torch.cuda.Stream(), torch.cuda.Stream()
    values = torch.randn((8, 4, 2, 64, 8, 64), device="cuda").to(torch.bfloat16)
    keys = [key(i) for i in range(8)]
    local.put_from(keys, values).wait(timeout=60)
    out = torch.full_like(values, float("nan"))
    handle = local.get_into(keys, out, stream=copy, marks=[3, 8])
    assert len(handle.marks) == 2
    compute.wait_event(handle.marks[0])
    with torch.cuda.stream(compute):
        first = out[:3].clone()
    compute.synchronize()
    assert torch.equal(first, values[:3])
    assert handle.wait(timeout=60) == [True] * 8 and torch.equal(out, values)
    assert wait_for(lambda: local.stats().leases == 0)


def test_gpu_gather_matches_the_cpu_gather(both) -> None:  # type: ignore[no-untyped-def]
    local, remote = both
    blocks = [chunk(i, (32, 128)) for i in range(300)]  # 8 KiB blocks
    keys = [key(i) for i in range(300)]
    local.batch_put(keys, blocks)
    rng = np.random.default_rng(3)
    for c in (local, remote):
        refs = c.acquire(keys)
        top = rng.integers(0, 300, 1000)  # unsorted, with repeats
        want = torch.empty((top.size, 32, 128), dtype=torch.bfloat16)
        c.gather(refs[top], want).wait()
        out = torch.full((top.size, 32, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
        handle = c.gather(refs[top], out, stream=torch.cuda.Stream())
        handle.wait()
        assert handle.is_done()
        assert torch.equal(out.cpu(), want)
        assert torch.equal(want, torch.stack([blocks[i] for i in top]))
        c.release(refs)


def test_gpu_refusals_come_before_any_copy(both) -> None:  # type: ignore[no-untyped-def]
    local, _ = both
    local.batch_put([key(1), key(2)], [chunk(1, (16, 64)), chunk(2, (16, 64))])
    refs = local.acquire([key(1), key(2)])
    out = torch.full((2, 16, 64), 7, dtype=torch.float16, device="cuda")
    with pytest.raises(InvalidArgument, match="float16"):
        local.gather(refs, out)
    small = torch.full((1, 16, 64), 7, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(Exception, match="need"):
        local.gather(refs, small)
    with pytest.raises(InvalidArgument, match="float16"):
        local.get_into([key(1), key(2)], out)
    torch.cuda.synchronize()
    assert (out == 7).all() and (small == 7).all()
    local.release(refs)
    with pytest.raises(InvalidArgument, match="released"):
        local.gather(refs, torch.empty((2, 16, 64), dtype=torch.bfloat16, device="cuda"))


def test_gpu_get_into_reports_a_corrupt_arena_copy(start_server) -> None:  # type: ignore[no-untyped-def]
    from kvstore.errors import DataLoss
    from tests.e2e.test_shared import corrupt_in_arena

    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    values = [chunk(i, (1 << 19,)) for i in range(3)]  # 1 MiB each
    with srv.client(NS) as c:
        c.put_from([key(i) for i in range(3)], [v.cuda() for v in values]).wait(timeout=60)
        for i in range(12):  # push them down to ssd
            c.put(key(100 + i), chunk(100 + i, (1 << 19,)))
        assert torch.equal(c.get(key(0)), values[0])  # promoted: on cpu and on ssd
        corrupt_in_arena(srv, key(0), NS)
        out = torch.empty((3, 1 << 19), dtype=torch.bfloat16, device="cuda")
        # Caught on the GPU. The caller's stream may have used the tensor already, so the
        # client says so rather than rewriting it; the bad copy is dropped meanwhile.
        with pytest.raises(DataLoss, match=r"\[0\]"):
            c.get_into([key(i) for i in range(3)], out).wait(timeout=60)
        assert c.get_into([key(i) for i in range(3)], out).wait(timeout=60) == [True] * 3
        assert torch.equal(out.cpu(), torch.stack(values))  # the ssd copy, read again


def _fill_gpu() -> list[object]:
    """Take all of the GPU's free memory: through torch in blocks from 1 GiB down to 1 MiB,
    then what torch's segment rounding leaves free through CuPy, down to 64 KiB (CuPy's
    cached blocks freed first, so its next allocation needs new memory). Without the second
    step, whatever earlier tests left fragmented decided whether 8 MiB stayed free."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    held: list[object] = []
    size = 1 << 30
    while size >= 1 << 20:
        try:
            held.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            size //= 2
    size = 1 << 26
    while size >= 1 << 16:
        try:
            held.append(cupy.cuda.alloc(size))
        except cupy.cuda.memory.OutOfMemoryError:
            size //= 2
    return held


def test_a_full_gpu_is_resource_exhausted_and_loses_nothing(both) -> None:  # type: ignore[no-untyped-def]
    local, _ = both
    values = torch.randn((16, 4 << 20), device="cuda").to(torch.bfloat16)  # 16 x 8 MiB
    keys = [key(i) for i in range(16)]
    local.put_from(keys, values).wait(timeout=60)
    out = torch.zeros_like(values)
    local.get_into(keys, out).wait(timeout=60)  # kernels loaded while there is room
    fresh = [key(100 + i) for i in range(16)]
    filler = _fill_gpu()  # no room left for the checksums' scratch
    try:
        with pytest.raises(ResourceExhausted, match="out of memory"):
            local.get_into(keys, out).wait(timeout=60)
        with pytest.raises(ResourceExhausted, match="out of memory"):
            local.put_from(fresh, values).wait(timeout=60)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert wait_for(lambda: local.stats().leases == 0)  # the failed calls gave theirs back
    assert local.exists(fresh) == [False] * 16  # nothing of the failed put is visible
    out.zero_()
    assert local.get_into(keys, out).wait(timeout=60) == [True] * 16
    assert torch.equal(out, values)


def test_a_gpu_pool_larger_than_the_gpu_is_refused_at_start(start_server) -> None:  # type: ignore[no-untyped-def]
    _, total = torch.cuda.mem_get_info()
    too_much = f"{2 * total // (1 << 20)}MiB"
    with pytest.raises(RuntimeError, match="cannot allocate"):
        start_server("--tiers", "gpu,cpu", "--gpu-bytes", too_much, "--cpu-bytes", "64MiB")


def test_a_get_into_failing_after_its_copies_started_ends_no_lease_under_them(
    both, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The leases of a get_into that fails part-way are given back only once the copies it
    had enqueued are done: until then the server could hand those slots to another value."""
    from kvstore.client import _core, _transfer

    local, _ = both
    values = torch.randn((8, 1 << 20), device="cuda").to(torch.bfloat16)  # 8 x 2 MiB
    keys = [key(i) for i in range(8)]
    local.put_from(keys, values).wait(timeout=60)

    def digest_fails(self: _transfer.GetLanding, positions: list[int], stream: object) -> None:
        raise RuntimeError("the hash could not start")

    copies_done_at_release: list[bool] = []
    release = _core.ClientCore.release

    def watched_release(self, refs, *args, **kwargs):  # type: ignore[no-untyped-def]
        copies_done_at_release.append(stream.query())
        return (yield from release(self, refs, *args, **kwargs))

    monkeypatch.setattr(_transfer.GetLanding, "_digest", digest_fails)
    monkeypatch.setattr(_core.ClientCore, "release", watched_release)
    stream = torch.cuda.Stream()
    out = torch.zeros_like(values)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the copies queue behind this
    with pytest.raises(RuntimeError, match="the hash could not start"):
        local.get_into(keys, out, stream=stream)
    assert copies_done_at_release == [True]
    assert torch.equal(out, values)  # the copies did run, before the leases ended
    assert wait_for(lambda: local.stats().leases == 0)

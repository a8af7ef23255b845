"""HostScratch: one buffer per thread, reused while it is large enough, grown when not."""

from __future__ import annotations

import threading

import torch

from kvstore.scratch import HostScratch


def test_a_thread_gets_its_buffer_back_and_a_larger_one_when_it_asks() -> None:
    scratch = HostScratch()
    first = scratch.take(1024, torch.float32)
    assert first.dtype == torch.float32 and first.numel() == 256
    again = scratch.take(512)
    assert again.data_ptr() == first.data_ptr() and again.numel() == 512  # reused
    larger = scratch.take(4096, torch.float16)
    assert larger.numel() == 2048
    assert scratch.take(4096).data_ptr() == larger.data_ptr()
    shaped = scratch.tensor((2, 3, 4), torch.bfloat16)  # 48 bytes of the same buffer
    assert shaped.shape == (2, 3, 4) and shaped.is_contiguous()
    assert shaped.data_ptr() == larger.data_ptr()


def test_threads_do_not_share_a_buffer() -> None:
    scratch = HostScratch()
    mine = scratch.take(1 << 20)
    mine.fill_(1)
    seen: list[torch.Tensor] = []

    def other() -> None:
        theirs = scratch.take(1 << 20)
        theirs.fill_(2)
        seen.append(theirs)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0].data_ptr() != mine.data_ptr()
    assert bool((mine == 1).all())

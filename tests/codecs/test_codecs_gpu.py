"""Every codec takes a CUDA tensor and decodes into a CUDA `out` (needs a GPU; the same
codecs run on CPU tensors in test_codecs.py). cachegen decodes on the GPU itself
(test_cachegen_gpu.py); the others decode on the CPU and copy."""

from __future__ import annotations

import pytest
import torch
from test_codecs import spec_of

from kvstore.codecs import codec_from_spec, codec_names, decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", codec_names())
def test_cuda_tensors_round_trip_on_their_device(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn((2, 2, 40, 3, 16), generator=g).to(torch.bfloat16).cuda()
    data = codec_from_spec(spec_of(name)).encode(t)
    out = torch.empty_like(t)
    assert decode(data, out) is out and out.device == t.device
    assert torch.equal(out.cpu(), decode(data))
    if codec_from_spec(spec_of(name)).lossless:
        assert torch.equal(out, t)

"""tests/kernels: the Triton kernels against their pure-torch twins, on the same packed codes.

This layer runs without SGLang: ``test_kernels_no_srt.py`` imports every module of
``sglang_tq.kernels`` in an interpreter where ``sglang.srt`` cannot be imported.

Shared here: the ``device`` the kernels run on (overriding the root one), the interpreter's
small tiles, and the decode call with its check against the float64 twin.
"""

import pytest
import torch

from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode, tq_decode_ref
from tests.conftest import HAS_CUDA, rel

# the interpreter gets small tiles (speed); CUDA runs the launch defaults the backend uses
BLOCKS = {} if HAS_CUDA else dict(block_n=16)


@pytest.fixture(params=["cuda" if HAS_CUDA else "cpu"])
def device(request):
    """Kernels run where Triton compiles them: CUDA, or the interpreter on the CPU."""
    return torch.device(request.param)


def run_decode(q, bufs, kv_indptr, kv_indices, codec, max_splits=4, **kw):
    """``tq_decode`` with a different split count per request and a NaN-filled output."""
    bsz, hq, d = q.shape
    ws = DecodeWorkspace.create(bsz + 2, hq, d, max_splits, q.device)
    ws.out.fill_(float("nan"))  # every element must be written
    splits = torch.tensor(
        [1 + (i % max_splits) for i in range(bsz)], dtype=torch.int32, device=q.device
    )
    out = tq_decode(
        q,
        *bufs,
        kv_indptr,
        kv_indices,
        codec,
        d**-0.5,
        num_kv_splits=splits,
        max_kv_splits=max_splits,
        workspace=ws,
        **{**BLOCKS, **kw},
    )
    assert not out.isnan().any()
    return out


def assert_decode_matches_ref(out, q, bufs, kv_indptr, kv_indices, codec):
    """Within 2x of PyTorch's own bf16 error against the float64 reference."""
    d = q.shape[-1]
    ref = tq_decode_ref(q, *bufs, kv_indptr, kv_indices, codec, d**-0.5)
    torch_err = rel(
        tq_decode_ref(q, *bufs, kv_indptr, kv_indices, codec, d**-0.5, dtype=torch.bfloat16), ref
    )
    assert rel(out, ref) <= 2 * torch_err

"""The CUDA decode stage 1 on register MMA fragments (sglang_tq/kernels/tq_decode_mma.py).

On the CPU: its source compiles for Hopper with NVRTC (no GPU needed) without spilling, and
the calls it cannot serve are refused in one sentence. On CUDA (``gpu``): ``tq_decode(...,
impl="mma")`` against the float64 twin with the Triton kernels' tolerance rule (at most 2x
PyTorch's own bf16 error, tests/kernels/test_kernels.py), at odd lengths, GQA groups of 1 to
16 (both head-tile variants), int32 and int64 slot ids, random slot order, several splits.
"""

import pytest
import torch

from sglang_tq.kernels import tq_decode_mma
from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode
from sglang_tq.tools.kernel_resources import compile_mma
from tests.conftest import HAS_CUDA
from tests.kernels.conftest import assert_decode_matches_ref, run_decode
from tests.kernels.test_kernels import _decode_inputs


@pytest.mark.parametrize(
    "slot_i64, head_rows, min_blocks, prefetch",
    [(False, 8, 12, False), (True, 8, 12, False), (False, 16, 12, False), (False, 8, 8, True)],
)
def test_source_compiles_for_hopper_without_spills(slot_i64, head_rows, min_blocks, prefetch):
    """NVRTC -> sm_90a cubin (python -m sglang_tq.tools.kernel_resources --kernel mma): no
    local memory, and within the register cap ``__launch_bounds__`` implies: 16384 registers
    per scheduler over its share of the MIN_BLOCKS one-warp programs."""
    try:
        res = compile_mma(slot_i64, head_rows, min_blocks, prefetch)
    except OSError as exc:  # no libnvrtc in this environment (a compile error is a RuntimeError)
        pytest.skip(f"NVRTC is not available here: {exc}")
    assert res["local_bytes"] == 0 and res["shared_bytes"] == 0
    assert res["regs"] <= min(255, 16384 // (32 * -(-min_blocks // 4)))
    if head_rows == 8:  # the Llama-shape variants must not spill at all
        assert res["stack_bytes"] == 0
    # the loop keeps its codes and values in registers: no shared-memory traffic or barrier
    assert res["LDS"] == res["STS"] == res["BAR"] == 0 and res["HMMA"] > 0


def test_register_cap_maps_to_resident_programs():
    assert tq_decode_mma.min_blocks_for(None) == 12  # the default cap, 168
    assert tq_decode_mma.min_blocks_for(168) == 12
    assert tq_decode_mma.min_blocks_for(128) == 16
    assert tq_decode_mma.min_blocks_for(32) == 32  # the SM's limit of resident blocks


def test_rendered_source_carries_the_lookup_ptx():
    src = tq_decode_mma.render_source(False, 8, 12)
    assert "@LUT4@" not in src and "prmt.b32 %0, lx, hx, 0x5140;" in src
    assert src.startswith(
        "#define INDPTR_T int\n#define SLOT_T int\n#define HEAD_ROWS 8\n#define MIN_BLOCKS 12\n"
        "#define PREFETCH 0\n"
    )


@pytest.mark.parametrize(
    "args, why",
    [
        ((3, 3, 128, 4), "4-bit keys and values"),
        ((4, 4, 64, 4), "head_dim 128"),
        ((4, 4, 128, 32), "up to 16 query heads"),
    ],
)
def test_unsupported_calls_name_the_reason(args, why):
    assert why in tq_decode_mma.unsupported(*args)
    assert tq_decode_mma.unsupported(4, 4, 128, 8) is None
    assert "soft-cap" in tq_decode_mma.unsupported(4, 4, 128, 8, logit_cap=30.0)
    assert "MLA" in tq_decode_mma.unsupported(4, 4, 128, 8, shared_kv=True)


def test_tq_decode_refuses_mma_where_it_cannot_run():
    """An explicit impl="mma" on k3v3 is refused before any launch, naming the way out."""
    codec, bufs, indptr, indices, q = _decode_inputs(128, 3, 3, 4, "cpu", lens=(5,))
    with pytest.raises(ValueError, match="impl='triton'"):
        run_decode(q, bufs, indptr, indices, codec, impl="mma")
    with pytest.raises(ValueError, match="impl must be one of triton, mma"):
        run_decode(q, bufs, indptr, indices, codec, impl="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the mma kernel runs on CUDA only")
@pytest.mark.parametrize("gqa", [1, 4, 6, 8, 12, 16])
@pytest.mark.parametrize(
    "indptr_dtype, index_dtype",
    [(torch.int32, torch.int32), (torch.int32, torch.int64), (torch.int64, torch.int64)],
)
def test_mma_decode_matches_reference(gqa, indptr_dtype, index_dtype):
    lens = (1, 31, 33, 517, 1000)
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 4, gqa, "cuda", lens=lens, seed=gqa)
    indptr, indices = indptr.to(indptr_dtype), indices.to(index_dtype)
    out = run_decode(q, bufs, indptr, indices, codec, max_splits=8, impl="mma")
    assert_decode_matches_ref(out, q, bufs, indptr, indices, codec)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the mma kernel runs on CUDA only")
def test_mma_decode_agrees_with_triton_and_is_split_invariant():
    """The two stage-1 kernels on the same pool, and the mma kernel at 1 and 16 splits."""
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 4, 4, "cuda", lens=(700, 2049))
    tri = run_decode(q, bufs, indptr, indices, codec, max_splits=8, impl="triton")
    mma = run_decode(q, bufs, indptr, indices, codec, max_splits=8, impl="mma")
    one = run_decode(q, bufs, indptr, indices, codec, max_splits=1, impl="mma")
    many = run_decode(q, bufs, indptr, indices, codec, max_splits=16, impl="mma")
    pre = run_decode(q, bufs, indptr, indices, codec, max_splits=8, impl="mma", prefetch=True)
    for other in (tri, one, many, pre):
        # both accumulate fp16 products in fp32 and round to bf16: a few bf16 ulps apart
        assert torch.allclose(mma.float(), other.float(), rtol=2**-6, atol=2**-8)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the mma kernel runs on CUDA only")
def test_mma_decode_replays_in_a_cuda_graph():
    """Captured once, replayed: the same output as the eager call (the launch goes to the
    capturing stream)."""
    codec, bufs, indptr, indices, q = _decode_inputs(128, 4, 4, 4, "cuda", lens=(64, 300))
    eager = run_decode(q, bufs, indptr, indices, codec, impl="mma")
    ws = DecodeWorkspace.create(2, q.shape[1], 128, 4, "cuda")
    splits = torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    kw = dict(num_kv_splits=splits, max_kv_splits=4, workspace=ws, impl="mma")
    tq_decode(q, *bufs, indptr, indices, codec, 128**-0.5, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tq_decode(q, *bufs, indptr, indices, codec, 128**-0.5, **kw)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)

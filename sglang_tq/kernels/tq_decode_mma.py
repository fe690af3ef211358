"""Decode stage 1 as a CUDA kernel on tensor-core fragments in registers (issue 13).

The Triton stage 1 (``tq_decode.py``) decodes packed codes into registers and then moves the
K and V tiles through shared memory into the MMA operand layout. ``tq_decode_mma.cu`` lets
every thread decode exactly the codes of its own ``mma.sync.m16n8k16`` fragments: the key
codes of a token's row are the B fragment of the scores once the rotated query is gathered
into the same coordinate order (TurboQuant's rotation Π leaves the coordinate order ours to
choose, paper Sec. 3.1), and the value codes of two tokens merged nibble by nibble are the
B fragment of the output. The lookup is ``_lut.py``'s PTX (one source for both kernels), the
softmax and the partial outputs are stage 1's, so ``tq_decode.py``'s stage 2 merges them.

Compiled at first use with NVRTC (``torch.cuda._compile_kernel``, torch's binding of the
runtime compiler that its CUDA wheels ship), one variant per (slot index type, head rows,
register target); launched on the current stream, so CUDA graphs capture it. Scope: 4-bit
keys and values, head_dim 128, GQA groups up to 16, no sliding window or logit soft-cap;
:func:`unsupported` names what is missing otherwise.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch

from ..format.codec import LayerCodec
from ._checks import partial_strides, pool_strides
from ._lut import lut4_asm

SOURCE = "tq_decode_mma.cu"
KERNEL = "tq_decode_mma_stage1"
HEAD_DIM = 128
MAX_GQA = 16
TILE_TOKENS = 32  # tokens per step of a program (the .cu's TILE; its fragments assume 32)
# The default register cap: the Triton stage 1's measured best (168). The SM spreads its
# warps over 4 schedulers of 16384 registers each, so one-warp programs get
# 16384 / (32 * ceil(programs / 4)) registers: 168 at 9-12 programs, 128 at 16, 255 at 8 (the
# prefetch variant needs 218).
DEFAULT_MAXNREG = 168


def min_blocks_for(maxnreg: int | None) -> int:
    """``__launch_bounds__``' resident one-warp programs per SM for a register cap per
    thread (None or 0: the default cap)."""
    return max(1, min(32, 65536 // (32 * (maxnreg or DEFAULT_MAXNREG))))


def unsupported(
    k_bits: int,
    v_bits: int,
    head_dim: int,
    gqa: int,
    *,
    shared_kv: bool = False,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
) -> str | None:
    """Why the mma kernel cannot run this decode (one sentence), or None."""
    if k_bits != 4 or v_bits != 4:
        return f"the mma decode kernel reads 4-bit keys and values (k4v4), not k{k_bits}v{v_bits}"
    if head_dim != HEAD_DIM:
        return f"the mma decode kernel needs head_dim {HEAD_DIM}, not {head_dim}"
    if gqa > MAX_GQA:
        return f"the mma decode kernel holds up to {MAX_GQA} query heads per KV head, not {gqa}"
    if shared_kv:
        return "the mma decode kernel does not read MLA's shared latent"
    if logit_cap > 0 or sliding_window > 0:
        return "the mma decode kernel has no logit soft-cap or sliding window"
    return None


def _c_string(ptx: str) -> str:
    """PTX text as a C string literal (Triton's $N operands become CUDA's %N)."""
    return json.dumps(ptx.replace("$", "%"))


@functools.cache
def render_source(
    slot_i64: bool,
    head_rows: int,
    min_blocks: int,
    indptr_i64: bool = False,
    prefetch: bool = False,
) -> str:
    """The kernel's CUDA source with its macros and the lookup PTX filled in."""
    if head_rows not in (8, 16) or min_blocks < 1:
        raise ValueError("head_rows must be 8 or 16 and min_blocks >= 1.")
    # the PTX does not depend on the codebook (the table words are operands); any
    # symmetric 4-bit codebook passes lut4_asm's check
    cb = torch.arange(1, 9, dtype=torch.float32)
    cb = torch.cat([cb, -cb])
    body = resources.files(__package__).joinpath(SOURCE).read_text()
    body = body.replace("@LUT4@", _c_string(lut4_asm(cb, "bytes")))
    head = [
        f"#define INDPTR_T {'long long' if indptr_i64 else 'int'}",
        f"#define SLOT_T {'long long' if slot_i64 else 'int'}",
        f"#define HEAD_ROWS {head_rows}",
        f"#define MIN_BLOCKS {min_blocks}",
        f"#define PREFETCH {int(prefetch)}",
        f"#define TILE {TILE_TOKENS}",
    ]
    return "\n".join(head) + "\n" + body


def compile_source(source: str, compute_capability: str | None = None):
    """NVRTC: CUDA source -> cubin (with ``compute_capability``, e.g. "90", no GPU needed)
    and the kernel's lowered name; raises RuntimeError with the compiler log."""
    from torch.cuda._utils import _nvrtc_compile

    return _nvrtc_compile(source, KERNEL, compute_capability, None, ["-lineinfo"])


@functools.cache
def _kernel(
    slot_i64: bool, head_rows: int, min_blocks: int, indptr_i64: bool, prefetch: bool, device: int
):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(
            render_source(slot_i64, head_rows, min_blocks, indptr_i64, prefetch),
            KERNEL,
            nvcc_options=["-lineinfo"],
        )


def _check_rows(name: str, t: torch.Tensor, row_bytes: int, align: int) -> None:
    elem = t.element_size()
    if (
        t.stride(-1) != 1
        or t.data_ptr() % align
        or any((s * elem) % align for s in t.stride()[:-1])
        or t.shape[-1] * elem != row_bytes
    ):
        raise ValueError(
            f"{name} must hold {row_bytes}-byte rows, contiguous and {align}-byte aligned, "
            "as LayerCodec.alloc_buffers makes them, for the mma decode kernel."
        )


def stage1_mma(
    q_rot: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    num_kv_splits: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    codec: LayerCodec,
    sm_scale: float,
    min_block_kv: int,
    min_blocks: int,
    prefetch: bool = False,
) -> None:
    """Stage 1 of :func:`tq_decode.tq_decode`, which has checked the call against
    :func:`unsupported` (its arguments, q already rotated into fp32 ``q_rot`` [B, Hq, D]):
    each split's normalized partial output into ``mid_o`` [B, Hq, splits, D] and its
    log-sum-exp into ``mid_lse`` [B, Hq, splits]. ``min_block_kv`` is the split granularity
    stage 2 is given, ``min_blocks`` the resident programs per SM (:func:`min_blocks_for`);
    ``prefetch`` issues each step's loads one step ahead (more registers)."""
    bsz, hq = q_rot.shape[:2]
    hkv = k_codes.shape[1]
    gqa = hq // hkv
    if q_rot.dtype != torch.float32 or q_rot.stride(2) != 1:
        raise ValueError("q_rot must be fp32 and contiguous in head_dim.")
    _check_rows("k_codes", k_codes, HEAD_DIM // 2, 16)
    _check_rows("v_codes", v_codes, HEAD_DIM // 2, 8)
    if k_norms.dtype != torch.float16 or v_norms.dtype != torch.float16:
        raise ValueError("the mma decode kernel reads fp16 norms.")
    if {kv_indptr.dtype, kv_indices.dtype} - {torch.int32, torch.int64}:
        raise ValueError("kv_indptr and kv_indices must be int32 or int64.")
    if mid_o.stride(3) != 1 or mid_lse.stride(2) != 1:
        raise ValueError("mid_o must be contiguous in head_dim and mid_lse in splits.")
    kernel = _kernel(
        kv_indices.dtype == torch.int64,
        16 if gqa > 8 else 8,
        min_blocks,
        kv_indptr.dtype == torch.int64,
        bool(prefetch),
        q_rot.device.index or 0,
    )
    kernel(
        grid=(bsz, hkv, mid_o.shape[2]),
        block=(32, 1, 1),
        args=[
            q_rot,
            k_codes,
            k_norms,
            v_codes,
            v_norms,
            codec.k_lut_words,
            codec.v_lut_words,
            kv_indptr,
            kv_indices,
            num_kv_splits,
            mid_o,
            mid_lse,
            float(sm_scale) * 1.4426950408889634,
            gqa,
            int(min_block_kv),
            q_rot.stride(0),
            q_rot.stride(1),
            *pool_strides(k_codes, k_norms, v_codes, v_norms),
            *partial_strides(mid_o, mid_lse),
        ],
    )

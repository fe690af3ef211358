"""The baselines of ``python -m sglang_tq.bench decode``, each called as SGLang's attention
backend calls it, so that a row of the decode table is what the server would run:

* SGLang's Triton decode kernel (``decode_attention_fwd``), as ``TritonAttnBackend.forward_decode``
  launches it, with the split count of SGLang's ``get_num_kv_splits_triton`` (a Python mirror
  where the kernel cannot run);
* FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``, as ``FlashInferAttnBackend`` plans and
  runs it (NHD, page size 1, backend "fa2", SGLang's tensor-core rule);
* sgl-kernel's FlashAttention-3 (``flash_attn_with_kvcache``), as
  ``FlashAttentionBackend.forward_decode`` calls it (page size 1, scheduler metadata computed once
  per batch).

Libraries are imported into a :class:`Ctx` once per run (:func:`load_baselines`); one that does
not import leaves its reason in ``Ctx.import_errors`` and its rows are written with that error
while the rest runs. Each ``build_*`` returns a no-argument step that writes its output tensor.
It is a module of its own because the decode benchmark's orchestration is long enough without
the three backends' calling conventions.
"""

from __future__ import annotations

import math

from .kernel_io import log

# SGLang's default FlashInfer workspace (srt/environ.py SGLANG_FLASHINFER_WORKSPACE_SIZE).
FLASHINFER_WORKSPACE_BYTES = 384 * 1024 * 1024
# SGLang's default --triton-attention-num-kv-splits (srt/server_args.py).
SGLANG_DEFAULT_MAX_KV_SPLITS = 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------
# split-KV of SGLang's Triton backend
# --------------------------------------------------------------------------------------
def sglang_num_kv_splits(seq_lens, num_head, num_kv_head, max_kv_splits, core_count, num_group=1):
    """Python mirror of sglang.kernels.ops.attention.metadata.get_num_kv_splits_triton
    (SGLang 0.5.17), as TritonAttnBackend.get_num_kv_splits launches it."""
    max_len, min_len = max(seq_lens), min(seq_lens)
    num_seq = len(seq_lens)
    if max_len * 8 < min_len * 10:
        min_len = max_len
    s1 = min(cdiv(max_len, min_len), max_kv_splits)
    chunk1 = cdiv(max_len, s1)
    ext_seq_len = max_len / 64.0
    ext_core = int(core_count * max(math.log2(ext_seq_len), 1.0)) if ext_seq_len > 0 else core_count
    group = num_head // num_kv_head
    if group == 1:
        token_grid = num_seq * num_group * num_head
    else:
        block_h = min(16, group)
        token_grid = num_seq * num_group * cdiv(num_head, block_h)
    s2 = min(cdiv(ext_core, token_grid), max_kv_splits)
    chunk2 = cdiv(max_len, s2)
    return [max(cdiv(n, chunk1), cdiv(n, chunk2)) for n in seq_lens]


class Ctx:
    """Lazily imported modules and shared per-run state of one decode benchmark run."""

    def __init__(self):
        self.torch = None
        self.device = None
        self.sm_count = None
        self.decode_attention_fwd = None
        self.get_num_kv_splits_triton = None
        self.flashinfer = None
        self.fi_workspace = None
        self.fa3 = None  # sgl_kernel.flash_attn.flash_attn_with_kvcache
        self.fa3_sched = None  # sgl_kernel.flash_attn.get_scheduler_metadata (None: not built)
        self.use_pdl = False
        self.import_errors: dict = {}


def probe_fa3(ctx) -> str | None:
    """Load sgl-kernel's FA3 into ctx; return None, or why the fa3 rows cannot run."""
    torch = ctx.torch
    if ctx.device is None or ctx.device.type != "cuda":
        return f"FA3 needs a CUDA device, got {ctx.device}"
    try:
        from sgl_kernel import flash_attn as fa
    except Exception as e:
        return (
            f"sgl-kernel's FA3 library did not import ({type(e).__name__}: {str(e)[:200]}); "
            f"on the GPU host stage it with dev/gpu_host/stage_fa3.sh"
        )
    try:
        ok = bool(fa.is_fa3_supported(ctx.device))
    except Exception as e:
        return f"sgl_kernel.flash_attn.is_fa3_supported failed: {e!r}"
    if not ok:
        cap = torch.cuda.get_device_capability(ctx.device)
        return f"FA3 needs sm80/sm90 with CUDA >= 12.3, got sm{cap[0]}{cap[1]} with CUDA {torch.version.cuda}"
    ctx.fa3 = fa.flash_attn_with_kvcache
    ctx.fa3_sched = getattr(fa, "get_scheduler_metadata", None)
    return None


def load_baselines(ctx: Ctx, args) -> None:
    """Import what the baseline rows of ``args.impl_set`` need into ``ctx`` (SGLang's Triton
    kernel also checks sglang-tq and the write path); a failed import is logged once and kept
    in ``ctx.import_errors`` under the impl it disables."""
    torch = ctx.torch
    if "sglang-triton" in args.impl_set or "sglang-tq" in args.impl_set or not args.no_write_path:
        try:
            from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

            ctx.decode_attention_fwd = decode_attention_fwd
        except Exception as e:
            ctx.import_errors["sglang-triton"] = f"import decode_attention_fwd failed: {e!r}"
            log(f"[skip] sglang-triton: {ctx.import_errors['sglang-triton']}")
        try:
            from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

            ctx.get_num_kv_splits_triton = get_num_kv_splits_triton
        except Exception as e:
            log(f"[note] get_num_kv_splits_triton unavailable ({e!r}); using the Python mirror")
        try:
            from sgl_kernel.utils import is_arch_support_pdl

            ctx.use_pdl = bool(is_arch_support_pdl())
        except Exception:
            ctx.use_pdl = (
                ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device)[0] >= 9
            )
        if ctx.device.type != "cuda":
            ctx.use_pdl = False
    if "flashinfer" in args.impl_set:
        try:
            import flashinfer

            ctx.flashinfer = flashinfer
            ctx.fi_workspace = torch.zeros(
                FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=ctx.device
            )
        except Exception as e:
            ctx.import_errors["flashinfer"] = f"import flashinfer failed: {e!r}"
            log(f"[skip] flashinfer: {ctx.import_errors['flashinfer']}")
    if "fa3" in args.impl_set:
        why = probe_fa3(ctx)
        if why:
            ctx.import_errors["fa3"] = why
            log(f"[skip] FA3 rows not run: {why}")


def sglang_splits_tensor(ctx: Ctx, args, B, L, max_kv_splits):
    """num_kv_splits [B] int32 for the SGLang Triton baseline, from SGLang's own kernel if importable
    (cross-checked against the Python mirror), else from the mirror."""
    torch = ctx.torch
    mirror = sglang_num_kv_splits(
        [L] * B, args.num_q_heads, args.num_kv_heads, max_kv_splits, ctx.sm_count
    )
    t = torch.tensor(mirror, dtype=torch.int32, device=ctx.device)
    if ctx.get_num_kv_splits_triton is not None:
        try:
            import triton

            out = torch.empty(B, dtype=torch.int32, device=ctx.device)
            seq_lens = torch.full((B,), L, dtype=torch.int64, device=ctx.device)
            sched = 256 if B < 256 else triton.next_power_of_2(B)
            ctx.get_num_kv_splits_triton[(1,)](
                out,
                seq_lens,
                B,
                1,
                args.num_q_heads,
                args.num_kv_heads,
                max_kv_splits,
                ctx.sm_count,
                MAX_NUM_SEQ=sched,
            )
            if out.tolist() != mirror:
                log(
                    f"[note] SGLang get_num_kv_splits_triton gave {out[:4].tolist()}.., mirror {mirror[:4]}..; "
                    "using SGLang's"
                )
            t = out
        except Exception as e:
            log(f"[note] get_num_kv_splits_triton failed ({e!r}); using the Python mirror")
    return t


# --------------------------------------------------------------------------------------
# the baselines: each builder returns fn() -> output tensor [B, Hq, D]
# --------------------------------------------------------------------------------------
def build_sglang_triton(
    ctx, q, kbuf, vbuf, indptr, indices64, sm_scale, max_kv_splits, num_kv_splits
):
    """Mirrors TritonAttnBackend.forward_decode (srt/layers/attention/triton_backend.py)."""
    torch = ctx.torch
    B, Hq, D = q.shape
    Dv = vbuf.shape[-1]
    o = torch.empty((B, Hq, Dv), dtype=q.dtype, device=q.device)
    attn_logits = torch.empty((B, Hq, max_kv_splits, Dv), dtype=torch.float32, device=q.device)
    attn_lse = torch.empty((B, Hq, max_kv_splits), dtype=torch.float32, device=q.device)
    f = ctx.decode_attention_fwd
    use_pdl = ctx.use_pdl

    def fn():
        f(
            q,
            kbuf,
            vbuf,
            o,
            indptr,
            indices64,
            attn_logits,
            attn_lse,
            num_kv_splits,
            max_kv_splits,
            sm_scale,
            1.0,
            1.0,  # sm_scale, k_scale, v_scale (forward_decode passes 1.0 without scales)
            logit_cap=0.0,
            sinks=None,
            xai_temperature_len=-1,
            has_mla=False,
            use_pdl=use_pdl,
            page_size=1,
        )
        return o

    return fn, o


def flashinfer_use_tc(args, kv_dtype_name):
    if args.flashinfer_tensor_cores != "auto":
        return args.flashinfer_tensor_cores == "on"
    # sglang/srt/layers/attention/flashinfer_backend.py should_use_tensor_core
    if kv_dtype_name == "fp8_e4m3":
        return True
    return args.num_q_heads // args.num_kv_heads >= 4


def build_flashinfer(ctx, args, q, kbuf, vbuf, indptr32, indices32, sm_scale, kv_dtype_name):
    """Mirrors FlashInferAttnBackend decode: wrapper(workspace, "NHD", backend="fa2",
    use_tensor_cores=...), plan(indptr, indices, last_page_len, Hq, Hkv, D, page_size=1, ...), run."""
    torch = ctx.torch
    fi = ctx.flashinfer
    B, Hq, D = q.shape
    use_tc = flashinfer_use_tc(args, kv_dtype_name)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(
        ctx.fi_workspace, "NHD", use_tensor_cores=use_tc, backend="fa2"
    )
    last_page_len = torch.ones(B, dtype=torch.int32, device=q.device)
    w.plan(
        indptr32,
        indices32,
        last_page_len,
        Hq,
        args.num_kv_heads,
        D,
        1,
        q_data_type=q.dtype,
        kv_data_type=kbuf.dtype,
        sm_scale=sm_scale,
    )
    out = torch.empty_like(q)
    scale = (
        1.0 if kv_dtype_name == "fp8_e4m3" else None
    )  # SGLang passes layer.k_scale_float (1.0 / None)

    def fn():
        w.run(q, (kbuf, vbuf), k_scale=scale, v_scale=scale, out=out)
        return out

    return fn, out, {"use_tensor_cores": use_tc, "backend": "fa2"}


def build_fa3(
    ctx,
    args,
    q,
    kbuf,
    vbuf,
    page_table,
    cache_seqlens,
    cu_seqlens_q,
    sm_scale,
    kv_dtype_name,
    window: int = -1,
    sinks=None,
):
    """Mirrors FlashAttentionBackend.forward_decode (srt/layers/attention/flashattention_backend.py,
    SGLang 0.5.17, MHA, page_size 1, no cascade): q [B, Hq, D] (cast to the KV dtype for fp8
    KV), k/v cache viewed as [-1, page_size, Hkv, D], page_table int32 [B, L], cache_seqlens
    int32, cu_seqlens_q arange(B+1), max_seqlen_q 1, softmax_scale, causal=True, window
    (-1, -1) or, for a sliding-window layer, (sliding_window_size, 0), ``sinks`` [Hq] passed
    as ``sinks=`` where given, softcap 0, num_splits 0, scheduler_metadata precomputed per
    batch (with window (-1, -1), as SGLang computes it for every layer)."""
    torch = ctx.torch
    B, Hq, D = q.shape
    Hkv = kbuf.shape[1]
    fp8 = kv_dtype_name == "fp8_e4m3"
    q_in = q.to(kbuf.dtype) if fp8 else q  # forward_decode: q = q.to(self.kv_cache_dtype)
    k_cache = kbuf.view(-1, 1, Hkv, D)
    v_cache = vbuf.view(-1, 1, Hkv, vbuf.shape[-1])
    # FA3 reads the sinks in the query's dtype (SGLang's gpt-oss keeps them in bf16)
    kw = {} if sinks is None else {"sinks": sinks.to(torch.bfloat16)}
    if fp8 and args.fa3_descale:  # layer.k_scale.expand((batch_size, tp_k_head_num)) with scale 1.0
        kw["k_descale"] = torch.ones(1, 1, dtype=torch.float32, device=q.device).expand(B, Hkv)
        kw["v_descale"] = torch.ones(1, 1, dtype=torch.float32, device=q.device).expand(B, Hkv)
    meta = {
        "q_dtype": str(q_in.dtype).replace("torch.", ""),
        "descale": "k_descale" in kw,
        "num_splits": 0,
        "scheduler_metadata": False,
    }
    sched = None
    if ctx.fa3_sched is not None and not args.fa3_no_scheduler_metadata:
        # FlashAttentionBackend._compute_scheduler_metadata: once per batch, for all layers
        sched = ctx.fa3_sched(
            batch_size=B,
            max_seqlen_q=1,
            max_seqlen_k=page_table.shape[1],
            num_heads=Hq,
            num_heads_k=Hkv,
            headdim=D,
            cache_seqlens=cache_seqlens,
            qkv_dtype=kbuf.dtype,
            cu_seqlens_q=cu_seqlens_q,
            page_size=1,
            causal=True,
            has_softcap=False,
            num_splits=0,
        )
        meta["scheduler_metadata"] = sched is not None
    out = torch.empty(B, Hq, vbuf.shape[-1], dtype=torch.bfloat16, device=q.device)
    f = ctx.fa3

    def fn():
        o = f(
            q=q_in,
            k_cache=k_cache,
            v_cache=v_cache,
            page_table=page_table,
            cache_seqlens=cache_seqlens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=1,
            softmax_scale=sm_scale,
            causal=True,
            window_size=(window, 0) if window >= 0 else (-1, -1),
            softcap=0.0,
            return_softmax_lse=False,
            num_splits=0,
            scheduler_metadata=sched,
            out=out,
            **kw,
        )
        return o[0] if isinstance(o, (tuple, list)) else o

    return fn, out, meta


def fa3_tables(ctx, slots, B, L):
    """FlashAttentionBackend's decode metadata for B sequences of L tokens (page size 1):
    page_table = req_to_token rows (int32 slot ids), cache_seqlens, cu_seqlens_q."""
    torch = ctx.torch
    page_table = slots.view(B, L).to(torch.int32)
    cache_seqlens = torch.full((B,), L, dtype=torch.int32, device=slots.device)
    cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=slots.device)
    return page_table, cache_seqlens, cu_seqlens_q

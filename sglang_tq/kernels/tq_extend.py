"""Extend (prefill) attention with a packed prefix: chunked prefill and radix hits.

For each sequence, the new chunk's queries attend to

* the prefix already in the cache (a radix-cache hit or earlier chunks), read
  from packed TurboQuant slots;
* the chunk itself, causally, from its bf16 K and V (or, with ``chunk_slots``,
  read back from the packed cache, so that a cold prefill sees exactly the
  values a later radix hit or decode step sees).

Prefill is compute-bound, unlike decode: each query block of the chunk visits the
whole prefix, so the prefix is dequantized once per token and KV head
(``tq_dequant.py``, codes → codebook → Πᵀ on tensor cores) into a dense scratch
buffer, and an exact attention kernel (FA3 or SGLang's Triton extend kernel, below)
attends to it with the chunk. The scratch holds the prefix of one layer at a time:
2 · Hkv · D · 2 bytes per prefix token (4 KiB at Llama-3.1-8B).

Requests of one batch that hit the same radix prefix list the same slots; each slot
is decoded once (:func:`dedup_prefix`: a sort, no host sync, so CUDA graphs can hold
it) and the attention kernel reads every request's prefix through an index into the
deduplicated scratch. A batch of n requests over one shared prefix decodes it once,
not n times, and the scratch holds ``PrefixDedup.rows`` prefix rows: the prefix
length by default, the distinct count when the caller measured it
(:func:`exact_rows`, one host sync), so that 150 questions over one 100k-token
document allocate 100k rows, not 15M (the backend's prefill plan bounds it further).

Two attention kernels run over the dense rows (``impl``):

* ``"fa3"`` (the default on Hopper in bf16/fp16): sgl-kernel's FlashAttention-3, the
  kernel SGLang's own default prefill runs there. A chunk without a prefix is one
  varlen causal call over its bf16 K/V; with a prefix, the chunk's rows follow the
  deduplicated prefix rows in one scratch, and a page table of page size 1
  (:func:`extend_kv_table`, built with the batch's :class:`PrefixDedup`) lists each
  sequence's rows, prefix first, so one causal
  call (aligned to the last key) covers both. Prefill is GEMM-bound, but attention
  is ~10% of a 6k-token prompt's FLOPs, and this kernel runs them faster;
* ``"triton"``: SGLang's Triton extend kernel (everywhere else, and the interpreter).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from sglang_tq.env import extend_impl_override, triton_interpreting
from sglang_tq.format.codec import LayerCodec

from ._checks import check_attention_args
from .tq_decode import attention_ref
from .tq_dequant import tq_dequant, tq_dequant_ref

EXTEND_IMPLS = ("fa3", "triton")


def default_extend_impl(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel :func:`tq_extend` runs for queries of ``dtype`` on ``device``
    when not told: FA3 for bf16/fp16 on Hopper (sm90) where sgl-kernel ships it, SGLang's
    Triton extend kernel elsewhere (both exact; the KV format is the same);
    ``SGLANG_TQ_EXTEND_IMPL`` overrides it."""
    forced = extend_impl_override()
    if forced is None:
        return "fa3" if _fa3_usable(device, dtype) else "triton"
    return _check_impl(forced, "SGLANG_TQ_EXTEND_IMPL", device, dtype)


def _fa3_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        not triton_interpreting()
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(device)[0] == 9
        and _fa3_importable()
    )


@functools.cache
def _fa3_importable() -> bool:
    try:
        _fa3()
    except RuntimeError:
        return False
    return True


def _check_impl(impl: str, where: str, device: torch.device, dtype: torch.dtype) -> str:
    """``impl`` if it is known and runs for ``dtype`` on ``device``; else one sentence."""
    if impl not in EXTEND_IMPLS:
        raise ValueError(f"{where} must be one of {', '.join(EXTEND_IMPLS)}, got {impl!r}.")
    if impl == "fa3" and not _fa3_usable(device, dtype):
        raise ValueError(
            f"{where}=fa3 needs bf16 or fp16 on a Hopper GPU with sgl-kernel's "
            f"FA3 library, got {dtype} on {device}; use triton."
        )
    return impl


def _fa3():
    try:
        from sgl_kernel.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError as e:
        raise RuntimeError(
            f"the fa3 extend path needs sgl-kernel's FlashAttention-3, which did "
            f"not import ({e}); set SGLANG_TQ_EXTEND_IMPL=triton."
        ) from e
    return flash_attn_varlen_func, flash_attn_with_kvcache


@dataclasses.dataclass(frozen=True)
class PrefixDedup:
    """The prefix slots of a batch with repeats removed, all on the device."""

    slots: torch.Tensor  # [N]: the distinct slots first (ascending), then padding
    count: torch.Tensor | None  # int32 [1]: how many distinct slots (None: all of them)
    index: torch.Tensor  # int64 [N]: prefix position i -> its row in ``slots``
    # the fa3 path's (page table, key lengths) of the batch (:func:`with_kv_table`)
    kv_table: tuple[torch.Tensor, torch.Tensor] | None = None
    rows: int = -1  # scratch rows, known on the host and >= the distinct count (-1: N)

    def __post_init__(self):
        if self.rows < 0:
            object.__setattr__(self, "rows", self.index.numel())


def dedup_prefix(prefix_slots: torch.Tensor) -> PrefixDedup:
    """Distinct slots of ``prefix_slots`` [N] (N > 0) and where each position finds its
    slot, by a sort: sizes stay N, the count stays on the device (``rows`` = N)."""
    ordered, order = torch.sort(prefix_slots)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rank = torch.cumsum(first, 0) - 1  # row of each sorted position's slot
    slots = torch.zeros_like(prefix_slots)
    slots[rank] = ordered  # repeats write the same value
    index = torch.empty_like(rank)
    index[order] = rank
    return PrefixDedup(slots, (rank[-1:] + 1).to(torch.int32), index)


def exact_rows(dd: PrefixDedup) -> PrefixDedup:
    """``dd`` with ``rows`` = its distinct count, read from the device (one host sync):
    the scratch then holds the distinct slots only."""
    rows = dd.index.numel() if dd.count is None else int(dd.count)
    return dataclasses.replace(dd, slots=dd.slots[:rows], rows=rows)


def extend_kv_table(qo_indptr, kv_indptr, prefix_index, max_kv_len: int, rows: int | None = None):
    """Page table (page size 1) of each sequence's keys in a scratch that holds ``rows``
    prefix rows (default N = ``prefix_index.numel()``), then the chunk's rows in
    ``qo_indptr`` order.

    ``qo_indptr`` and ``kv_indptr``: [B+1] int32 or int64; ``prefix_index``: int64 [N]
    (``PrefixDedup.index``). Key j of sequence b is prefix row
    ``prefix_index[kv_indptr[b] + j]`` for j below its prefix length, else chunk row
    ``rows + qo_indptr[b] + j - prefix_len``. Returns (table int32 [B, max_kv_len], key
    lengths int32 [B]); entries past a sequence's length point at a row of the scratch and
    are never read. No host sync."""
    n = prefix_index.numel()
    rows = n if rows is None else rows
    pre = (kv_indptr[1:] - kv_indptr[:-1]).long()[:, None]
    j = torch.arange(max_kv_len, device=qo_indptr.device)[None, :]
    row = rows + qo_indptr[:-1].long()[:, None] + (j - pre)
    if n:
        at = (kv_indptr[:-1].long()[:, None] + j).clamp_(max=n - 1)
        row = torch.where(j < pre, prefix_index[at], row)
    row = torch.minimum(row.clamp_(min=0), rows + qo_indptr[-1:].long() - 1)
    lens = (kv_indptr[1:] - kv_indptr[:-1]) + (qo_indptr[1:] - qo_indptr[:-1])
    return row.to(torch.int32), lens.to(torch.int32)


def with_kv_table(dd: PrefixDedup, qo_indptr, kv_indptr, max_kv_len: int | None) -> PrefixDedup:
    """``dd`` with the fa3 path's page table of its batch (:func:`extend_kv_table`), so that
    every layer shares one; ``max_kv_len`` ≥ every prefix + chunk length from host metadata
    (None: one device sync)."""
    if max_kv_len is None:
        max_kv_len = int((kv_indptr.diff() + qo_indptr.diff()).max())
    return dataclasses.replace(
        dd, kv_table=extend_kv_table(qo_indptr, kv_indptr, dd.index, max_kv_len, dd.rows)
    )


def tq_extend(
    q,
    k,
    v,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    qo_indptr,
    kv_indptr,
    kv_indices,
    codec: LayerCodec,
    sm_scale: float,
    *,
    max_extend_len: int,
    num_prefix_tokens: int | None = None,
    chunk_slots=None,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    prefix_dedup: PrefixDedup | None = None,
    out=None,
    impl: str | None = None,
    max_kv_len: int | None = None,
    sinks=None,
):
    """Causal attention of new tokens over a packed prefix plus themselves.

    q [T, Hq, D], k/v [T, Hkv, D]: the new tokens of all sequences, concatenated
    as delimited by ``qo_indptr`` [B+1]. ``kv_indptr`` [B+1] / ``kv_indices``
    list each sequence's prefix slots, as SGLang's Triton backend builds them
    (int32 or int64). ``k_codes`` uint8 [S, Hkv, D·k_bits/8], ``k_norms`` fp16 [S, Hkv],
    ``v_codes`` uint8 [S, Hkv, D·v_bits/8], ``v_norms`` fp16 [S, Hkv]: the pool of S slots
    as ``LayerCodec.alloc_buffers`` makes it.
    ``chunk_slots`` [T] (the chunk's own slots, already written by
    ``tq_store_kv``) makes the chunk's K and V come from the packed cache instead
    of ``k``/``v``. ``max_extend_len`` ≥ every chunk length and
    ``num_prefix_tokens`` = kv_indptr[-1]: pass both from host metadata to avoid a
    device sync. ``prefix_dedup`` = ``dedup_prefix(kv_indices[:num_prefix_tokens])``
    (or its :func:`exact_rows`), computed once per batch and shared by its layers (else
    computed here); the prefix scratch holds its ``rows``. Writes
    ``out`` [T, Hq, D] when given, else returns a new tensor in q's dtype.

    ``impl`` picks the attention kernel ("fa3" or "triton"; default
    :func:`default_extend_impl`). Over a prefix the fa3 path reads its page table from
    ``prefix_dedup`` (:func:`with_kv_table`, once for all layers), else builds it here
    with ``max_kv_len`` ≥ every prefix + chunk length (host metadata, else a device sync).
    ``sinks`` [Hq]: one logit per query head that joins every softmax without a value
    (attention sinks); both kernels take it.
    """
    t = q.shape[0]
    hq, d, hkv = check_attention_args(q, k_codes, v_codes, codec)
    if k.shape != (t, hkv, d) or v.shape != (t, hkv, d):
        raise ValueError(
            f"k and v must be [{t}, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}."
        )
    bsz = qo_indptr.numel() - 1
    if kv_indptr.shape != (bsz + 1,):
        raise ValueError(f"kv_indptr must have {bsz + 1} entries like qo_indptr.")
    if chunk_slots is not None and chunk_slots.shape != (t,):
        raise ValueError(f"chunk_slots must hold one slot per new token ({t}).")
    if sinks is not None and (sinks.shape != (hq,) or not sinks.is_floating_point()):
        raise ValueError(
            f"sinks must be a float tensor [{hq}] (one logit per query head), got "
            f"{sinks.dtype} {tuple(sinks.shape)}."
        )
    impl = (
        default_extend_impl(q.device, q.dtype)
        if impl is None
        else _check_impl(impl, "impl", q.device, q.dtype)
    )
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}.")
    if t == 0:
        return out
    if num_prefix_tokens is None:
        num_prefix_tokens = int(kv_indptr[-1])
    # -- the prefix's distinct slots, and where each prefix position finds its row
    if num_prefix_tokens:
        dd = prefix_dedup or dedup_prefix(kv_indices[:num_prefix_tokens])
        if dd.index.shape != (num_prefix_tokens,):
            raise ValueError(
                f"prefix_dedup covers {dd.index.numel()} prefix tokens, the batch "
                f"has {num_prefix_tokens}; build it from this batch's kv_indices."
            )
        if not 0 < dd.rows <= min(num_prefix_tokens, dd.slots.numel()):
            raise ValueError(
                f"prefix_dedup.rows must lie in [1, {num_prefix_tokens}] and within "
                f"its slots, got {dd.rows}; take it from exact_rows()."
            )
    else:
        dd = None
    # The interpreter has no bf16 arithmetic: there SGLang's kernel runs in fp32.
    work = torch.float32 if triton_interpreting() else q.dtype
    n = num_prefix_tokens

    def dequant(slots, c=None, rows=None):
        return tq_dequant(
            k_codes, k_norms, v_codes, v_norms, slots, codec, dtype=work, count=c, out=rows
        )

    if impl == "fa3":
        varlen, paged = _fa3()
        qo_indptr = qo_indptr.to(torch.int32)  # FA3 takes int32 offsets (SGLang's are int64)
        window = (sliding_window - 1, 0) if sliding_window > 0 else (-1, -1)
        o = out if out.is_contiguous() else torch.empty_like(q)
        # FA3 reads the sinks in the query's dtype (SGLang's gpt-oss keeps them in bf16 for it)
        kw = dict(
            softmax_scale=sm_scale,
            causal=True,
            window_size=window,
            softcap=logit_cap,
            out=o,
            **({} if sinks is None else {"sinks": sinks.to(q.dtype).contiguous()}),
        )
        if n == 0:  # -- no prefix: one varlen call over the chunk itself
            if chunk_slots is not None:
                k, v = dequant(chunk_slots)
            varlen(q, k, v, qo_indptr, qo_indptr, max_extend_len, max_extend_len, **kw)
        else:  # -- [distinct prefix rows; chunk rows], one page-table call
            r = dd.rows
            k_all = torch.empty(r + t, hkv, d, dtype=work, device=q.device)
            v_all = torch.empty_like(k_all)
            dequant(dd.slots[:r], dd.count, (k_all[:r], v_all[:r]))
            if chunk_slots is not None:
                dequant(chunk_slots, None, (k_all[r:], v_all[r:]))
            else:
                k_all[r:].copy_(k)
                v_all[r:].copy_(v)
            if dd.kv_table is None:
                dd = with_kv_table(dd, qo_indptr, kv_indptr, max_kv_len)
            table, lens = dd.kv_table
            paged(
                q,
                k_all.unsqueeze(1),
                v_all.unsqueeze(1),
                page_table=table,
                cache_seqlens=lens,
                cu_seqlens_q=qo_indptr,
                max_seqlen_q=max_extend_len,
                **kw,
            )
        if o is not out:
            out.copy_(o)
        return out

    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    if dd is None:
        dd = PrefixDedup(kv_indices[:0], None, kv_indices[:0].long())
    k_pre, v_pre = dequant(dd.slots[: dd.rows], dd.count)
    if chunk_slots is not None:
        k, v = dequant(chunk_slots)
    o = (
        out
        if work == q.dtype and out.is_contiguous()
        else torch.empty(q.shape, dtype=work, device=q.device)
    )
    extend_attention_fwd(
        q.to(work).contiguous(),
        k.to(work).contiguous(),
        v.to(work).contiguous(),
        o,
        k_pre,
        v_pre,
        qo_indptr,
        kv_indptr,
        dd.index,
        None,
        True,
        None,
        max_extend_len,
        1.0,
        1.0,
        sm_scale,
        logit_cap=logit_cap,
        # SGLang's window counts the keys before the query; ours includes the query
        sliding_window_size=sliding_window - 1 if sliding_window > 0 else -1,
        sinks=None if sinks is None else sinks.float().contiguous(),
    )
    if o is not out:
        out.copy_(o)
    return out


def tq_extend_ref(
    q,
    k,
    v,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    qo_indptr,
    kv_indptr,
    kv_indices,
    codec: LayerCodec,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = 0,
    chunk_slots=None,
    dtype=torch.float64,
    sinks=None,
):
    """Pure-torch twin of :func:`tq_extend`, on the reference quantizer's dequantization."""
    sinks = None if sinks is None else sinks.to(dtype)
    outs = []
    for b in range(qo_indptr.numel() - 1):
        qs, qe = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = kv_indices[int(kv_indptr[b]) : int(kv_indptr[b + 1])].long()
        if chunk_slots is not None:
            slots = torch.cat([slots, chunk_slots[qs:qe].long()])
        kp, vp = tq_dequant_ref(k_codes, k_norms, v_codes, v_norms, slots, codec, dtype)
        if chunk_slots is None:
            kp = torch.cat([kp, k[qs:qe].to(dtype)])
            vp = torch.cat([vp, v[qs:qe].to(dtype)])
        qb = q[qs:qe].to(dtype)
        offset = kp.shape[0] - qb.shape[0]
        if sliding_window > 0:
            out = (
                torch.stack(
                    [
                        attention_ref(
                            qb[i : i + 1],
                            kp[max(0, offset + i - sliding_window + 1) : offset + i + 1],
                            vp[max(0, offset + i - sliding_window + 1) : offset + i + 1],
                            sm_scale,
                            logit_cap,
                            sinks=sinks,
                        )[0]
                        for i in range(qb.shape[0])
                    ]
                )
                if qb.shape[0]
                else qb
            )
        else:
            out = attention_ref(qb, kp, vp, sm_scale, logit_cap, causal_offset=offset, sinks=sinks)
        outs.append(out)
    return torch.cat(outs)

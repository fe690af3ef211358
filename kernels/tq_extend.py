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
buffer and SGLang's own Triton extend kernel (``extend_attention_fwd``, pinned
with SGLang) attends to it with the chunk. The scratch holds the prefix of one
layer at a time: 2 · Hkv · D · 2 bytes per prefix token (4 KiB at Llama-3.1-8B).

Requests of one batch that hit the same radix prefix list the same slots; each slot
is decoded once (:func:`dedup_prefix`: a sort, no host sync, so CUDA graphs can hold
it) and the extend kernel reads every request's prefix through an index into the
deduplicated scratch. A batch of n requests over one shared prefix decodes it once,
not n times.
"""

from __future__ import annotations

import dataclasses

import torch

from sglang_tq.codec import LayerCodec

from sglang_tq.env import triton_interpreting

from ._checks import check_attention_args
from .tq_dequant import tq_dequant, tq_dequant_ref
from .tq_decode import attention_ref


@dataclasses.dataclass(frozen=True)
class PrefixDedup:
    """The prefix slots of a batch with repeats removed, all on the device."""

    slots: torch.Tensor  # [N]: the distinct slots first (ascending), then padding
    count: torch.Tensor  # int32 [1]: how many distinct slots
    index: torch.Tensor  # int64 [N]: prefix position i -> its row in ``slots``


def dedup_prefix(prefix_slots: torch.Tensor) -> PrefixDedup:
    """Distinct slots of ``prefix_slots`` [N] (N > 0) and where each position finds its
    slot, by a sort: sizes stay N, the count stays on the device."""
    ordered, order = torch.sort(prefix_slots)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rank = torch.cumsum(first, 0) - 1  # row of each sorted position's slot
    slots = torch.zeros_like(prefix_slots)
    slots[rank] = ordered  # repeats write the same value
    index = torch.empty_like(rank)
    index[order] = rank
    return PrefixDedup(slots, (rank[-1:] + 1).to(torch.int32), index)


def tq_extend(q, k, v, k_codes, k_norms, v_codes, v_norms, qo_indptr, kv_indptr, kv_indices,
              codec: LayerCodec, sm_scale: float, *, max_extend_len: int,
              num_prefix_tokens: int | None = None, chunk_slots=None, logit_cap: float = 0.0,
              sliding_window: int = 0, prefix_dedup: PrefixDedup | None = None, out=None):
    """Causal attention of new tokens over a packed prefix plus themselves.

    q [T, Hq, D], k/v [T, Hkv, D]: the new tokens of all sequences, concatenated
    as delimited by ``qo_indptr`` [B+1]. ``kv_indptr`` [B+1] / ``kv_indices``
    list each sequence's prefix slots, as SGLang's Triton backend builds them.
    ``chunk_slots`` [T] (the chunk's own slots, already written by
    ``tq_store_kv``) makes the chunk's K and V come from the packed cache instead
    of ``k``/``v``. ``max_extend_len`` ≥ every chunk length and
    ``num_prefix_tokens`` = kv_indptr[-1]: pass both from host metadata to avoid a
    device sync. ``prefix_dedup`` = ``dedup_prefix(kv_indices[:num_prefix_tokens])``,
    computed once per batch and shared by its layers (else computed here). Writes
    ``out`` [T, Hq, D] when given, else returns a new tensor in q's dtype.
    """
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    t = q.shape[0]
    hq, d, hkv = check_attention_args(q, k_codes, v_codes, codec)
    if k.shape != (t, hkv, d) or v.shape != (t, hkv, d):
        raise ValueError(f"k and v must be [{t}, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}.")
    bsz = qo_indptr.numel() - 1
    if kv_indptr.shape != (bsz + 1,):
        raise ValueError(f"kv_indptr must have {bsz + 1} entries like qo_indptr.")
    if chunk_slots is not None and chunk_slots.shape != (t,):
        raise ValueError(f"chunk_slots must hold one slot per new token ({t}).")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}.")
    if t == 0:
        return out
    if num_prefix_tokens is None:
        num_prefix_tokens = int(kv_indptr[-1])
    # The interpreter has no bf16 arithmetic: there SGLang's kernel runs in fp32.
    work = torch.float32 if triton_interpreting() else q.dtype
    # -- prefix (and, with chunk_slots, the chunk) from the packed cache, once per slot
    if num_prefix_tokens:
        dd = prefix_dedup or dedup_prefix(kv_indices[:num_prefix_tokens])
        if dd.index.shape != (num_prefix_tokens,):
            raise ValueError(f"prefix_dedup covers {dd.index.numel()} prefix tokens, the batch "
                             f"has {num_prefix_tokens}; build it from this batch's kv_indices.")
        prefix_slots, count, prefix_index = dd.slots, dd.count, dd.index
    else:
        prefix_slots, count, prefix_index = kv_indices[:0], None, kv_indices[:0].long()
    k_pre, v_pre = tq_dequant(k_codes, k_norms, v_codes, v_norms, prefix_slots, codec, dtype=work,
                              count=count)
    if chunk_slots is not None:
        k, v = tq_dequant(k_codes, k_norms, v_codes, v_norms, chunk_slots, codec, dtype=work)
    o = out if work == q.dtype and out.is_contiguous() else torch.empty(q.shape, dtype=work,
                                                                          device=q.device)
    extend_attention_fwd(
        q.to(work).contiguous(), k.to(work).contiguous(), v.to(work).contiguous(), o, k_pre, v_pre,
        qo_indptr, kv_indptr, prefix_index, None, True, None,
        max_extend_len, 1.0, 1.0, sm_scale, logit_cap=logit_cap,
        # SGLang's window counts the keys before the query; ours includes the query
        sliding_window_size=sliding_window - 1 if sliding_window > 0 else -1,
    )
    if o is not out:
        out.copy_(o)
    return out


def tq_extend_ref(q, k, v, k_codes, k_norms, v_codes, v_norms, qo_indptr, kv_indptr, kv_indices,
                  codec: LayerCodec, sm_scale: float, logit_cap: float = 0.0,
                  sliding_window: int = 0, chunk_slots=None, dtype=torch.float64):
    """Pure-torch twin of :func:`tq_extend`, on the reference quantizer's dequantization."""
    outs = []
    for b in range(qo_indptr.numel() - 1):
        qs, qe = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = kv_indices[int(kv_indptr[b]): int(kv_indptr[b + 1])].long()
        if chunk_slots is not None:
            slots = torch.cat([slots, chunk_slots[qs:qe].long()])
        kp, vp = tq_dequant_ref(k_codes, k_norms, v_codes, v_norms, slots, codec, dtype)
        if chunk_slots is None:
            kp = torch.cat([kp, k[qs:qe].to(dtype)])
            vp = torch.cat([vp, v[qs:qe].to(dtype)])
        qb = q[qs:qe].to(dtype)
        offset = kp.shape[0] - qb.shape[0]
        if sliding_window > 0:
            out = torch.stack([
                attention_ref(qb[i : i + 1], kp[max(0, offset + i - sliding_window + 1): offset + i + 1],
                              vp[max(0, offset + i - sliding_window + 1): offset + i + 1],
                              sm_scale, logit_cap)[0]
                for i in range(qb.shape[0])
            ]) if qb.shape[0] else qb
        else:
            out = attention_ref(qb, kp, vp, sm_scale, logit_cap, causal_offset=offset)
        outs.append(out)
    return torch.cat(outs)

"""The ``turboquant`` attention backend: SGLang's Triton backend with packed-KV kernels.

All metadata comes from :class:`TritonAttnBackend` unchanged: per-token slot lists
(``kv_indptr``/``kv_indices``), ``qo_indptr``, the split counts, and the CUDA-graph
buffers it fills before every replay. That code only indexes slots; it never
reads KV bytes, so it works on the packed pool as is. What changes is the math:

* decode: ``tq_decode`` over the packed slots, writing into a
  :class:`~sglang_tq.kernels.tq_decode.DecodeWorkspace` preallocated for the
  largest captured batch (graphs; eager steps that fit share it) or sized to a larger
  eager batch, so a captured decode step writes into fixed buffers and never syncs
  with the host; SGLang's own split-KV logits are allocated empty unless bf16 layers
  need its decode kernel;
* extend (prefill, chunked prefill, radix hits): the new K/V are quantized into
  the cache first, then ``tq_extend`` dequantizes the packed prefix once per
  slot (a batch of requests over one radix prefix decodes it once; the dedup is
  computed with the batch's metadata, :func:`plan_prefill`, which also bounds the
  dense scratch by the distinct prefix tokens and by ``context_len`` rows, the
  budget the pool sizing set aside) and runs FA3 (Hopper, where sgl-kernel ships
  it) or SGLang's Triton extend kernel over it plus the chunk in bf16, or, with
  ``--kv-quant-packed-prefill``, plus the chunk read back from the packed cache,
  so a cold prefill sees the same values a warm radix hit would; the prefix
  dequant is compiled when the backend is built (:meth:`TQAttnBackend.compile_prefix_path`),
  since SGLang's start-up warm-up request has no prefix to read;
* mixed batches (``--enable-mixed-chunk``: a prefill chunk plus one new token per
  running request): the trailing one-token requests go to ``tq_decode`` over their
  packed context (slot lists from ``req_to_token`` as for a decode batch, no host
  sync), the rest to ``tq_extend``, so a running request's context is not dequantized per step;
* sliding-window layers (``layer.sliding_window_size`` > -1, on the plain pool, as SGLang
  0.5.17 serves Gemma 3): decode reads the parent's window metadata (the last
  ``sliding_window_size`` slots of each sequence, SGLang's own semantics, with their split
  counts), and extend runs a second prefill plan over the window part of the prefix
  with the kernels' window of ``sliding_window_size + 1`` keys (the query included);
  still refused at launch until measured (issue 16, notes/modern-archs-design.md);
* layers in ``--kv-quant-bf16-layers`` hold plain bf16 buffers and go to the
  Triton kernels of the parent class unchanged.

The split count per sequence follows our kernel's occupancy rule
(``default_num_kv_splits``); it is computed outside the graph, like Triton's. Its
ceiling grows as the batch shrinks (:meth:`TQAttnBackend.max_splits`): SGLang's
``--triton-attention-num-kv-splits`` (8) suits a large batch, but one long sequence
then runs only Hkv · 8 programs; the workspace keeps the same (sequence, split) pairs,
so a batch of one may use up to 64 splits in the memory a batch of 64 uses for 8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend, logit_capping_mod
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

from ..env import decode_impl, fwht_rotations
from ..kernels import tq_decode_mma
from ..kernels.tq_decode import (
    SPLIT_REF_BATCH,
    DecodeWorkspace,
    decode_launch,
    default_num_kv_splits,
    split_ceiling,
    tq_decode,
)
from ..kernels.tq_dequant import tq_dequant
from ..kernels.tq_extend import (
    PrefixDedup,
    dedup_prefix,
    default_extend_impl,
    exact_rows,
    tq_extend,
    with_kv_table,
)
from . import refusals
from .pool import TQTokenToKVPool, packed_pools, prefill_scratch_bytes, resolve_layer

# SGLang wraps its own Triton launchers the same way: no torch.compile tracing.
_tq_decode = torch.compiler.disable(tq_decode)
_tq_extend = torch.compiler.disable(tq_extend)
_DEFAULT_NUM_SMS = 132
EAGER_WS_ROWS = 64  # an eager decode workspace grows in steps of this many sequences
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _MixedSplit:
    """A mixed batch cut in two: requests [0, num_extend) extend, the rest decode one
    token each over ``kv_indptr`` / ``kv_indices`` (their prefix plus the new slot)."""

    num_extend: int  # requests that extend
    extend_tokens: int  # their new tokens (the decode rows of q follow)
    kv_indptr: torch.Tensor  # [n_decode + 1] int32
    kv_indices: torch.Tensor  # [Σ (prefix + 1)] int64
    num_kv_splits: torch.Tensor  # [n_decode] int32


@dataclasses.dataclass(frozen=True)
class PrefillGroup:
    """Requests [b0, b1) of an extend batch that attend through one prefix scratch: their
    new-token rows [q0, q1) and their metadata, rebased to the group's first request."""

    b0: int
    b1: int
    q0: int
    q1: int
    prefix_tokens: int  # Σ prefix lengths (host)
    max_extend_len: int
    qo_indptr: torch.Tensor  # [b1 - b0 + 1]
    kv_indptr: torch.Tensor  # [b1 - b0 + 1]
    kv_indices: torch.Tensor  # the group's prefix slots
    dedup: PrefixDedup | None  # None: no prefix


def plan_prefill(
    qo_indptr,
    kv_indptr,
    kv_indices,
    prefix_lens: list[int],
    extend_lens: list[int],
    budget: int,
    fa3: bool,
) -> list[PrefillGroup]:
    """Cut an extend batch into groups whose dense prefix scratch fits ``budget`` rows.

    The whole batch is one group when its prefix tokens fit (no sync), or when its
    *distinct* prefix slots do (one host sync reads the count: 150 requests over one
    100k-token document need 100k rows, not 15M). Otherwise consecutive requests are
    grouped while their prefix tokens fit, each group deduplicated on its own; a single
    request's prefix is below ``context_len``, which is what ``budget`` is, so every
    group fits. Attention of one request never depends on another's, so the cut is exact.
    With ``fa3`` each group carries its page table (:func:`with_kv_table`)."""
    b = len(prefix_lens)
    if b == 0:
        return []
    q_off = [0]
    for e in extend_lens:
        q_off.append(q_off[-1] + e)
    kv_off = [0]
    for p in prefix_lens:
        kv_off.append(kv_off[-1] + p)

    def group(b0: int, b1: int, dd: PrefixDedup | None = None) -> PrefillGroup:
        n = kv_off[b1] - kv_off[b0]
        qo, kv = qo_indptr[b0 : b1 + 1], kv_indptr[b0 : b1 + 1]
        if b0:
            qo, kv = qo - qo[0], kv - kv[0]
        slots = kv_indices[kv_off[b0] : kv_off[b1]]
        if n and dd is None:
            dd = dedup_prefix(slots)
        if dd is not None and fa3:
            dd = with_kv_table(
                dd, qo, kv, max(prefix_lens[i] + extend_lens[i] for i in range(b0, b1))
            )
        return PrefillGroup(
            b0,
            b1,
            q_off[b0],
            q_off[b1],
            n,
            max(extend_lens[b0:b1]),
            qo,
            kv,
            slots,
            dd if n else None,
        )

    n = kv_off[b]
    if n <= budget:
        return [group(0, b)]
    dd = exact_rows(dedup_prefix(kv_indices[:n]))
    if dd.rows <= budget:
        return [group(0, b, dd)]
    groups, b0 = [], 0
    for i in range(1, b + 1):
        if i == b or kv_off[i + 1] - kv_off[b0] > budget:
            if kv_off[i] - kv_off[b0] > budget:
                raise RuntimeError(
                    f"a request's prefix of {kv_off[i] - kv_off[b0]} tokens exceeds "
                    f"the prefill scratch of {budget} rows (context_len); "
                    f"lower --context-length or use --kv-quant none."
                )
            groups.append(group(b0, i))
            b0 = i
    return groups


class _ShapeOnlyPool:
    """Stands in for the pool while ``TritonAttnBackend.__init__`` runs: it reads
    ``get_value_buffer(0).shape[-1]`` (or, for a hybrid linear-attention pool,
    ``get_v_head_dim()``) for v_head_dim, which has no bf16 tensor here."""

    def __init__(self, pool, packed: TQTokenToKVPool):
        self._pool, self._packed = pool, packed

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return torch.empty((0, self._packed.head_num, self._packed.v_head_dim), device="meta")

    def get_v_head_dim(self) -> int:
        return self._packed.v_head_dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class PackedDecodeState:
    """Decode workspace and SGLang-logits handling shared by the packed backends (this
    module's and :mod:`sglang_tq.serving.mla_backend`), mixed in before ``TritonAttnBackend``. The
    backend sets ``_sglang_decode`` (bf16 layers need SGLang's own decode) and provides
    ``_workspace(rows)``."""

    _graph_ws: DecodeWorkspace | None = None
    _eager_ws: DecodeWorkspace | None = None
    _decode_ws: DecodeWorkspace | None = None

    def _sglang_attention(self, method: str, q, k, v, layer, forward_batch, save_kv_cache, **kw):
        """SGLang's own ``forward_decode`` / ``forward_extend`` (the Triton backend's) for a
        layer this backend does not pack (``--kv-quant-bf16-layers``)."""
        return getattr(super(), method)(q, k, v, layer, forward_batch, save_kv_cache, **kw)

    @contextlib.contextmanager
    def _without_sglang_logits(self):
        """While the parent builds metadata: SGLang's split-KV logits [B, H, splits, Dv] fp32
        serve its own decode kernel only, so with no bf16 layer they are shaped [.., 0] and
        hold no bytes (at B = 4096, 32 heads, 8 splits: 0.5 GB beside our workspace; MLA's
        [.., 256, 512] per captured row: 8 MiB)."""
        if self._sglang_decode:
            yield
            return
        saved, self.v_head_dim = self.v_head_dim, 0
        try:
            yield
        finally:
            self.v_head_dim = saved

    def _use_eager_workspace(self, bs: int) -> None:
        """The workspace of an eager decode of ``bs`` sequences: the CUDA-graph one when it
        fits (graph replays and eager steps share the stream, never run at once), else one
        of ``bs`` rounded up to 64 rows, kept across steps and replaced only when it is over
        twice what the batch needs, so a burst of 4096 requests does not pin its workspace
        for the server's life."""
        g = self._graph_ws
        if g is not None and g.q_rot.shape[0] >= bs:
            self._eager_ws, self._decode_ws = None, g
            return
        ws, need = self._eager_ws, max(bs, SPLIT_REF_BATCH)
        if ws is None or not bs <= ws.q_rot.shape[0] <= 2 * need:
            self._eager_ws = ws = None  # freed before the next one is made
            ws = self._eager_ws = self._workspace(-(-bs // EAGER_WS_ROWS) * EAGER_WS_ROWS)
        self._decode_ws = ws

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs) -> None:
        with self._without_sglang_logits():
            super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self._eager_ws = None
        self._graph_ws = self._workspace(max_num_tokens)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        self._decode_ws = self._graph_ws


class TQAttnBackend(PackedDecodeState, TritonAttnBackend):
    """Attention over the packed TurboQuant pool (see the module docstring)."""

    def __init__(self, model_runner):
        pool = model_runner.token_to_kv_pool
        self._packed_pools = packed_pools(pool)
        if not self._packed_pools:
            raise RuntimeError(
                f"the turboquant attention backend needs the packed TurboQuant KV pool but SGLang "
                f"built {type(pool).__name__}; start the server with --kv-quant turboquant "
                f"(not just --attention-backend turboquant)."
            )
        tq = self._tq = self._packed_pools[0]  # config, heads and dtype: the same in every one
        model_runner.token_to_kv_pool = _ShapeOnlyPool(pool, tq)
        try:
            super().__init__(model_runner)
        finally:
            model_runner.token_to_kv_pool = pool
        self.token_to_kv_pool = pool  # the pool SGLang built: ours, or a hybrid pool around ours
        self.use_sliding_window_kv_pool = isinstance(pool, SWAKVPool)
        # SGLang's own Triton decode runs only for bf16 layers (--kv-quant-bf16-layers)
        self._sglang_decode = any(
            not p.is_packed_layer(i) for p in self._packed_pools for i in p.layer_ids
        )
        server_args = model_runner.server_args
        self.packed_prefill = bool(getattr(server_args, "kv_quant_packed_prefill", False))
        self.out_dtype = getattr(model_runner, "dtype", tq.model_dtype)
        self.num_sms = self.device_core_count if self.device_core_count > 0 else _DEFAULT_NUM_SMS
        self._eager_ws: DecodeWorkspace | None = None
        self._graph_ws: DecodeWorkspace | None = None
        self._decode_ws: DecodeWorkspace | None = None
        self._prefill: list[PrefillGroup] | None = None
        self._prefill_window: list[PrefillGroup] | None = None
        self._mixed: _MixedSplit | None = None
        self.extend_impl = default_extend_impl(torch.device(self.device), self.out_dtype)
        self.fwht = fwht_rotations()  # SGLANG_TQ_FWHT: the decode's rotations (0: dense, for A/B)
        if not self.fwht:
            logger.info(
                "sglang-tq: SGLANG_TQ_FWHT=0: store and decode rotate by dense Π "
                "products instead of the fast Walsh-Hadamard transform."
            )
        # the dense prefix rows a prefill step may hold: what the pool sizing set aside
        self.prefill_scratch_rows = int(self.max_context_len)
        logger.info(
            "sglang-tq: prefill attention over the dequantized prefix runs %s; its "
            "scratch holds at most %d prefix tokens (%.1f MiB, reserved from the KV pool).",
            "sgl-kernel's FA3" if self.extend_impl == "fa3" else "SGLang's Triton extend kernel",
            self.prefill_scratch_rows,
            prefill_scratch_bytes(
                tq.cfg, tq.global_layer_ids, tq.head_num, self.prefill_scratch_rows, tq.model_dtype
            )
            / 2**20,
        )
        # layers kept in bf16 run SGLang's Triton decode, sized for max_kv_splits
        self._fixed_splits = self.max_kv_splits if tq.cfg.bf16_layers else None
        self.compile_prefix_path()
        self.decode_impl = decode_impl()
        if self.decode_impl == "mma":  # opt-in: refuse at start-up what the kernel cannot run
            why = tq_decode_mma.unsupported(
                tq.cfg.k_bits, tq.cfg.v_bits, tq.head_dim, self.num_head // self.num_kv_head
            )
            if why:
                raise ValueError(f"SGLANG_TQ_DECODE_IMPL=mma: {why}; unset it for this model.")
            logger.info("sglang-tq: decode stage 1 runs the CUDA mma kernel (opt-in).")

    def compile_prefix_path(self) -> None:
        """Run the packed-prefix dequant of every packed layer once on slot 0 (SGLang's
        padding slot; nothing is written to the pool), as ``tq_extend`` calls it.

        SGLang's start-up warm-up request has no cached prefix, so without this the first
        radix hit or second prefill chunk waits for Triton to compile the dequant kernel:
        the whole first batch of a shared-prefix load test did (TTFT p90 1.26 s vs fp8's
        0.53 s at 751c473)."""
        slots = torch.zeros(1, dtype=torch.int64, device=self.device)
        count = torch.ones(1, dtype=torch.int32, device=self.device)
        for pool in self._packed_pools:
            for layer_id in pool.layer_ids:
                if not pool.is_packed_layer(layer_id):
                    continue
                p = pool.get_packed_layer(layer_id)
                for c in (count, None) if self.packed_prefill else (count,):
                    tq_dequant(
                        p.k_codes,
                        p.k_norms,
                        p.v_codes,
                        p.v_norms,
                        slots,
                        p.codec,
                        dtype=pool.model_dtype,
                        count=c,
                    )

    # -- metadata ----------------------------------------------------------------
    def max_splits(self, bs: int) -> int:
        """Split ceiling for a decode batch of ``bs``: ``max_kv_splits`` at 64 sequences and
        above, doubling as the batch halves, at most 64 (``max_kv_splits`` alone when
        bf16 layers share the split counts with SGLang's kernel)."""
        if self._fixed_splits is not None:
            return self._fixed_splits
        return split_ceiling(bs, self.max_kv_splits)

    def get_num_kv_splits(self, num_kv_splits: torch.Tensor, seq_lens: torch.Tensor) -> None:
        num_kv_splits.copy_(
            default_num_kv_splits(
                seq_lens,
                self.num_kv_head,
                self.max_splits(seq_lens.numel()),
                num_sms=self.num_sms,
                launch=decode_launch(
                    self.decode_impl, self._tq.head_dim, self._tq.cfg.k_bits, self._tq.cfg.v_bits
                ),
            )
        )

    def _workspace(self, batch: int) -> DecodeWorkspace:
        # room for every batch up to ``batch`` at its split ceiling (max_splits)
        return DecodeWorkspace.create(
            max(batch, SPLIT_REF_BATCH),
            self.num_head,
            self._tq.head_dim,
            self.max_kv_splits,
            self.device,
            out_dtype=self.out_dtype,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        with self._without_sglang_logits():
            super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self._prefill = self._prefill_window = None
        self._mixed = None
        if mode.is_decode_or_idle():
            self._use_eager_workspace(forward_batch.batch_size)
        else:
            if mode.is_mixed():
                self._mixed = self._split_mixed(forward_batch)
            self._prefill = self._plan(forward_batch)

    def _plan(self, forward_batch, window: bool = False) -> list[PrefillGroup]:
        """The extend requests' prefill groups (:func:`plan_prefill`), shared by every layer
        of the batch: the same dedup, page tables and scratch bound. ``window``: over the
        parent's window metadata, the last ``sliding_window_size`` prefix slots of each
        request, for the sliding-window layers."""
        md = self.forward_metadata
        b = md.qo_indptr.numel() - 1 if self._mixed is None else self._mixed.num_extend
        pre, ext = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
        if pre is None or ext is None:  # no host metadata: read it once
            pre, ext = (
                forward_batch.extend_prefix_lens.tolist(),
                forward_batch.extend_seq_lens.tolist(),
            )
        pre, ext = [int(x) for x in pre[:b]], [int(x) for x in ext[:b]]
        indptr, indices = md.kv_indptr, md.kv_indices
        if window:
            pre = [min(p, self.sliding_window_size) for p in pre]
            indptr, indices = md.window_kv_indptr, md.window_kv_indices
        return plan_prefill(
            md.qo_indptr,
            indptr,
            indices,
            pre,
            ext,
            self.prefill_scratch_rows,
            self.extend_impl == "fa3",
        )

    def _split_mixed(self, forward_batch) -> _MixedSplit | None:
        """The decode half of a mixed batch: its trailing run of one-token requests (the
        running requests SGLang appends). Their slot lists come from ``req_to_token``,
        where ``prepare_for_decode`` already wrote the new token's slot, by the kernel
        SGLang's decode metadata uses; sizes come from host metadata, so nothing waits
        on the device."""
        ext = forward_batch.extend_seq_lens_cpu
        pre = forward_batch.extend_prefix_lens_cpu
        if ext is None or pre is None:
            return None
        ext, pre = [int(x) for x in ext], [int(x) for x in pre]
        first = len(ext)
        while first > 0 and ext[first - 1] == 1:
            first -= 1
        n_dec = len(ext) - first
        if n_dec == 0:
            return None
        dev = self.forward_metadata.kv_indices.device
        seq_lens = forward_batch.seq_lens[first:]
        indptr = torch.zeros(n_dec + 1, dtype=torch.int32, device=dev)
        indptr[1:] = torch.cumsum(seq_lens, 0)
        indices = torch.empty(sum(pre[first:]) + n_dec, dtype=torch.int64, device=dev)
        create_flashinfer_kv_indices_triton[(n_dec,)](
            self.req_to_token,
            forward_batch.req_pool_indices[first:],
            seq_lens,
            indptr,
            None,
            indices,
            self.req_to_token.stride(0),
        )
        splits = torch.empty(n_dec, dtype=torch.int32, device=dev)
        self.get_num_kv_splits(splits, seq_lens)
        self._use_eager_workspace(n_dec)
        return _MixedSplit(first, sum(ext[:first]), indptr, indices, splits)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        self._prefill = self._prefill_window = (
            None  # an extend here plans its own, never a stale one
        )
        self._mixed = None

    # -- attention -----------------------------------------------------------------
    def _check_call(self, k, sinks, score_mod, forward_batch) -> None:
        if k is None:
            raise RuntimeError(
                "the turboquant backend needs this layer's own K/V (cross-layer KV "
                "sharing is not supported); use --kv-quant none for this model."
            )
        if score_mod is not None:
            raise RuntimeError(
                "the turboquant backend does not implement score_mod; use "
                "--kv-quant none for this model."
            )
        if forward_batch.forward_mode.is_target_verify():
            raise RuntimeError(
                "the turboquant backend does not support speculative verification; "
                "drop --speculative-algorithm or use --kv-quant none."
            )

    def _store(self, layer, forward_batch, k, v) -> None:
        """Quantize this layer's new K/V into the pool SGLang built (a hybrid pool routes the
        write to the inner pool of the layer, with the SWA slots the metadata carries)."""
        loc = forward_batch.out_cache_loc
        if not isinstance(self.token_to_kv_pool, TQTokenToKVPool):
            loc = KVWriteLoc(loc, getattr(self.forward_metadata, "swa_out_cache_loc", None))
        self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)

    def forward_decode(
        self,
        q,
        k,
        v,
        layer,
        forward_batch,
        save_kv_cache=True,
        sinks=None,
        score_mod=None,
        aux_tensors=None,
    ):
        inner, idx = resolve_layer(self.token_to_kv_pool, layer.layer_id)
        if not inner.is_packed_layer(idx):
            return self._sglang_attention(
                "forward_decode", q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )  # fmt: skip
        self._check_call(k, sinks, score_mod, forward_batch)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, hq, d)
        bs = q.shape[0]
        if save_kv_cache:
            self._store(layer, forward_batch, k, v)
        packed = inner.get_packed_layer(idx)
        md = self.forward_metadata
        indptr, indices, splits = (
            (md.window_kv_indptr, md.window_kv_indices, md.window_num_kv_splits)
            if _window_layer(layer)
            else (md.kv_indptr, md.kv_indices, md.num_kv_splits)
        )
        # A fresh output per layer (the workspace is shared by all layers), written in place.
        o = torch.empty((bs, hq * d), dtype=q.dtype, device=q.device)
        _tq_decode(
            q,
            packed.k_codes,
            packed.k_norms,
            packed.v_codes,
            packed.v_norms,
            indptr[: bs + 1],
            indices,
            packed.codec,
            layer.scaling,
            num_kv_splits=splits[:bs],
            max_kv_splits=self.max_splits(bs),
            workspace=self._decode_ws,
            logit_cap=_logit_cap(layer),
            out=o.view(bs, hq, d),
            sinks=sinks,
            fwht=self.fwht,
            impl=self.decode_impl,
        )
        return o

    def forward_extend(
        self,
        q,
        k,
        v,
        layer,
        forward_batch,
        save_kv_cache=True,
        sinks=None,
        score_mod=None,
        aux_tensors=None,
    ):
        inner, idx = resolve_layer(self.token_to_kv_pool, layer.layer_id)
        if not inner.is_packed_layer(idx):
            return self._sglang_attention(
                "forward_extend", q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )  # fmt: skip
        self._check_call(k, sinks, score_mod, forward_batch)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        o = getattr(forward_batch, "_attn_output", None)
        if o is None:
            o = torch.empty((q.shape[0], hq * d), dtype=q.dtype, device=q.device)
        if save_kv_cache:
            self._store(layer, forward_batch, k, v)
        elif self.packed_prefill:
            raise RuntimeError(
                "--kv-quant-packed-prefill needs the chunk written to the cache "
                "before attention, but this model skipped the write; drop "
                "--kv-quant-packed-prefill."
            )
        md = self.forward_metadata
        packed = inner.get_packed_layer(idx)
        q, k, v = q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)
        o3 = o.view(-1, hq, d)
        mx = self._mixed
        window = _window_layer(layer)
        if mx is not None and window:
            raise RuntimeError(
                "the turboquant backend does not yet run sliding-window layers in "
                "mixed batches; drop --enable-mixed-chunk."
            )
        if mx is not None:  # the decode half first, then the extend half below
            t = mx.extend_tokens
            _tq_decode(
                q[t:],
                packed.k_codes,
                packed.k_norms,
                packed.v_codes,
                packed.v_norms,
                mx.kv_indptr,
                mx.kv_indices,
                packed.codec,
                layer.scaling,
                num_kv_splits=mx.num_kv_splits,
                max_kv_splits=self.max_splits(q.shape[0] - t),
                workspace=self._decode_ws,
                logit_cap=_logit_cap(layer),
                out=o3[t:],
                sinks=sinks,
                fwht=self.fwht,
            )
        t = q.shape[0] if mx is None else mx.extend_tokens
        if window:  # the window layers' own plan, once per batch
            if not self._prefill_window or self._prefill_window[-1].q1 != t:
                self._prefill_window = self._plan(forward_batch, window=True)
            groups, sliding = self._prefill_window, layer.sliding_window_size + 1
        else:
            if not self._prefill or self._prefill[-1].q1 != t:  # once per batch, graphs too
                self._prefill = self._plan(forward_batch)
            groups, sliding = self._prefill, 0
        # the chunk's own slots in the layer's pool (a window pool holds it at the SWA slots)
        slots = (
            md.swa_out_cache_loc
            if inner is getattr(self.token_to_kv_pool, "swa_kv_pool", None)
            else forward_batch.out_cache_loc
        )
        for g in groups:
            if g.b1 == g.b0:
                continue
            r = slice(g.q0, g.q1)
            _tq_extend(
                q[r],
                k[r],
                v[r],
                packed.k_codes,
                packed.k_norms,
                packed.v_codes,
                packed.v_norms,
                g.qo_indptr,
                g.kv_indptr,
                g.kv_indices,
                packed.codec,
                layer.scaling,
                max_extend_len=g.max_extend_len,
                num_prefix_tokens=g.prefix_tokens,
                prefix_dedup=g.dedup,
                chunk_slots=slots[r] if self.packed_prefill else None,
                logit_cap=_logit_cap(layer),
                out=o3[r],
                impl=self.extend_impl,
                sinks=sinks,
                sliding_window=sliding,
            )
        return o


def _window_layer(layer) -> bool:
    """Whether SGLang runs ``layer`` with a sliding window (its Triton backend's test)."""
    return (
        getattr(layer, "sliding_window_size", None) is not None and layer.sliding_window_size > -1
    )


def _logit_cap(layer) -> float:
    return float(logit_capping_mod(layer.logit_capping_method, layer.logit_cap) or 0.0)


def create_tq_backend(runner) -> TritonAttnBackend:
    """Factory registered as the ``turboquant`` attention backend; refuses what it cannot run.
    An MLA model's latent pool gets :class:`~sglang_tq.serving.mla_backend.TQMLAAttnBackend`."""
    pool = runner.token_to_kv_pool
    from .mla_pool import TQMLATokenToKVPool

    if isinstance(pool, TQMLATokenToKVPool):
        from .mla_backend import TQMLAAttnBackend

        return TQMLAAttnBackend(runner)
    if not packed_pools(pool):
        raise RuntimeError(
            f"--attention-backend turboquant needs the packed TurboQuant KV pool but SGLang built "
            f"{type(pool).__name__}; start the server with --kv-quant turboquant."
        )
    refusals.check_model_layers(runner, pool)
    return TQAttnBackend(runner)

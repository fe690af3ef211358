"""The ``turboquant`` attention backend over the packed MLA latent pool (DeepSeek-V2/V3).

SGLang's Triton backend runs MLA models in two shapes per layer (notes/mla-design.md §3):

* ``attn_mqa``, the absorbed form (decode, and prefill over a cached prefix): q [T, H, 576]
  = (q_nope·W_UK | q_pe), one latent KV head [T, 1, 576] = (c | k_pe), values = c, output
  [T, H, 512] (W_UV is applied by the model afterwards);
* ``attn_mha`` (prefill without a prefix): plain attention over the chunk's decompressed
  K/V (qk 192, v 128), ``save_kv_cache=False``; the model has already written the latent
  with ``set_mla_kv_buffer``.

Decode runs ``tq_decode`` with the latent codes as keys and values and the bf16 RoPE keys
(``q_pe``/``k_pe``), the whole group of H query heads on one latent head. Prefill with a
prefix dequantizes the batch's distinct prefix slots into a dense [rows, 1, 576] scratch
and runs the parent's Triton extend over it (the kernel stock SGLang runs there), the
prefix lists remapped to scratch rows; without a prefix the parent runs as is, with the
chunk standing in for the (never read) prefix buffers. Metadata, CUDA-graph buffers and
split counts are the parent's, with its MLA split ceiling (256) set back to
``--triton-attention-num-kv-splits``: our workspace, not SGLang's logits, holds the splits.
Layers in ``--kv-quant-bf16-layers`` go to the parent unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from ..env import fwht_rotations
from ..kernels.tq_decode import (
    SPLIT_REF_BATCH,
    DecodeWorkspace,
    mla_num_kv_splits,
    split_ceiling,
    tq_decode,
)
from ..kernels.tq_dequant import tq_dequant
from .backend import _DEFAULT_NUM_SMS, PackedDecodeState
from .mla_pool import TQMLATokenToKVPool

_tq_decode = torch.compiler.disable(tq_decode)


class _Buffers:
    """The pool as the parent sees it: ``get_key_buffer``/``get_value_buffer`` answer
    ``key``/``value`` (a meta tensor while the parent is built, the dense scratch or the
    chunk during an extend); everything else, writes included, goes to the real pool."""

    def __init__(self, pool, key: torch.Tensor, value: torch.Tensor):
        self._pool, self._key, self._value = pool, key, value

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self._key

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self._value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class TQMLAAttnBackend(PackedDecodeState, TritonAttnBackend):
    """Attention over :class:`~sglang_tq.serving.mla_pool.TQMLATokenToKVPool` (module docstring)."""

    def __init__(self, model_runner):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TQMLATokenToKVPool):
            raise RuntimeError(
                f"the turboquant MLA backend needs the packed MLA pool but SGLang "
                f"built {type(pool).__name__}; start with --kv-quant turboquant."
            )
        meta = torch.empty((0, 1, pool.kv_cache_dim), device="meta")
        model_runner.token_to_kv_pool = _Buffers(pool, meta, meta[..., : pool.kv_lora_rank])
        try:
            super().__init__(model_runner)
        finally:
            model_runner.token_to_kv_pool = pool
        self.token_to_kv_pool = pool
        # the parent raises the split ceiling to 256 for MLA, sized for its own logits
        self.max_kv_splits = int(model_runner.server_args.triton_attention_num_kv_splits)
        self.num_kv_head = 1
        self.fwht = fwht_rotations()
        self._sglang_decode = any(not pool.is_packed_layer(i) for i in pool.layer_ids)
        self.prefill_scratch_rows = int(self.max_context_len)
        self.num_sms = self.device_core_count if self.device_core_count > 0 else _DEFAULT_NUM_SMS
        self._compile_prefix_path()

    def _compile_prefix_path(self) -> None:
        """Dequantize slot 0 (SGLang's padding slot) of the first packed layer once, as a
        prefill with a prefix does: SGLang's warm-up request has none, so the first radix hit
        would otherwise wait for Triton to compile the keys-only dequant (every layer shares
        its constants)."""
        pool = self.token_to_kv_pool
        packed = [i for i in pool.layer_ids if pool.is_packed_layer(i)]
        if packed:
            p = pool.get_packed_layer(packed[0])
            tq_dequant(
                p.latent_codes,
                p.latent_norms,
                None,
                None,
                torch.zeros(1, dtype=torch.int64, device=self.device),
                p.codec,
                dtype=pool.model_dtype,
            )

    # -- metadata ----------------------------------------------------------------
    def max_splits(self, bs: int) -> int:
        return self.max_kv_splits if self._sglang_decode else split_ceiling(bs, self.max_kv_splits)

    def get_num_kv_splits(self, num_kv_splits: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Our occupancy rule, as in the MHA backend: one latent head gives a sequence a
        single program per split, so a batch of one needs many splits to fill the GPU (the
        parent's rule would give it 8)."""
        if self._sglang_decode:
            return super().get_num_kv_splits(num_kv_splits, seq_lens)
        pool = self.token_to_kv_pool
        num_kv_splits.copy_(
            mla_num_kv_splits(
                seq_lens,
                self.max_splits(seq_lens.numel()),
                pool.cfg.k_bits,
                num_sms=self.num_sms,
                latent_dim=pool.kv_lora_rank,
            )
        )

    def _workspace(self, batch: int) -> DecodeWorkspace:
        pool = self.token_to_kv_pool
        return DecodeWorkspace.create(
            max(batch, SPLIT_REF_BATCH),
            self.num_head,
            pool.kv_lora_rank,
            self.max_kv_splits,
            self.device,
            out_dtype=pool.model_dtype,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        with self._without_sglang_logits():
            super().init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_decode_or_idle():
            self._use_eager_workspace(forward_batch.batch_size)

    # -- attention -----------------------------------------------------------------
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
        pool = self.token_to_kv_pool
        if not pool.is_packed_layer(layer.layer_id):
            return self._sglang_attention(
                "forward_decode", q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )  # fmt: skip
        _check_mla_call(layer, k, sinks, score_mod)
        hq, lat = layer.tp_q_head_num, pool.kv_lora_rank
        q = q.reshape(-1, hq, pool.kv_cache_dim)
        bs = q.shape[0]
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        p = pool.get_packed_layer(layer.layer_id)
        md = self.forward_metadata
        o = torch.empty((bs, hq * lat), dtype=q.dtype, device=q.device)
        _tq_decode(
            q[..., :lat],
            p.latent_codes,
            p.latent_norms,
            None,
            None,
            md.kv_indptr[: bs + 1],
            md.kv_indices,
            p.codec,
            layer.scaling,
            num_kv_splits=md.num_kv_splits[:bs],
            max_kv_splits=self.max_splits(bs),
            workspace=self._decode_ws,
            out=o.view(bs, hq, lat),
            fwht=self.fwht,
            q_pe=q[..., lat:],
            k_pe=p.k_pe,
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
        pool = self.token_to_kv_pool
        if not pool.is_packed_layer(layer.layer_id):
            return self._sglang_attention(
                "forward_extend", q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )  # fmt: skip
        if layer.qk_head_dim != pool.kv_cache_dim:
            # attn_mha: no prefix anywhere in the batch; the chunk stands in for the buffers
            if save_kv_cache:
                raise RuntimeError(
                    "the turboquant MLA backend expects the decompressed-K/V "
                    "prefill to leave the cache write to the model; use "
                    "--kv-quant none for this model."
                )
            with self._swapped(_Buffers(pool, k, v), self.forward_metadata):
                return super().forward_extend(
                    q,
                    k,
                    v,
                    layer,
                    forward_batch,
                    False,
                    sinks=sinks,
                    score_mod=score_mod,
                    aux_tensors=aux_tensors,
                )
        _check_mla_call(layer, k, sinks, score_mod)
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        md = self.forward_metadata
        o = getattr(forward_batch, "_attn_output", None)
        if o is None:
            o = q.new_empty((q.shape[0], layer.tp_q_head_num * pool.kv_lora_rank))
        qo, kv = md.qo_indptr.tolist(), md.kv_indptr.tolist()  # eager prefill: one host read
        for b0, b1 in self._prefix_groups(kv):
            r = slice(qo[b0], qo[b1])
            scratch, g = self._dense_prefix(
                layer.layer_id, k.dtype, _group_metadata(md, b0, b1, qo, kv)
            )
            with (
                self._swapped(_Buffers(pool, scratch, scratch[..., : pool.kv_lora_rank]), g),
                _no_preset_output(forward_batch),
            ):
                o[r] = super().forward_extend(
                    q[r],
                    k[r],
                    v[r],
                    layer,
                    forward_batch,
                    False,
                    sinks=sinks,
                    score_mod=score_mod,
                    aux_tensors=aux_tensors,
                )
        return o

    def _prefix_groups(self, kv: list[int]) -> list[tuple[int, int]]:
        """Consecutive requests [b0, b1) whose prefix tokens (``kv``: the prefix indptr on
        the host) fit the scratch budget (``context_len`` rows, set aside by the pool
        sizing): the whole batch unless many requests with long prefixes prefill together."""
        groups, b0 = [], 0
        for b in range(1, len(kv)):
            if kv[b] - kv[b - 1] > self.prefill_scratch_rows:
                raise RuntimeError(
                    f"a request's cached prefix of {kv[b] - kv[b - 1]} tokens "
                    f"exceeds the prefill scratch of {self.prefill_scratch_rows} "
                    f"rows (context_len); lower --context-length or use "
                    f"--kv-quant none."
                )
            if kv[b] - kv[b0] > self.prefill_scratch_rows:
                groups.append((b0, b - 1))
                b0 = b - 1
        groups.append((b0, len(kv) - 1))
        return groups

    def _dense_prefix(self, layer_id: int, dtype: torch.dtype, md):
        """A request group's distinct prefix slots as dense [rows, 1, 576] rows in the
        chunk's ``dtype`` (latent dequantized, RoPE key copied) and its metadata with the
        prefix lists remapped to those rows. Prefill is eager for MLA (SGLang turns its
        prefill graphs off for non-DSA MLA), so the distinct count may sync with the host."""
        pool = self.token_to_kv_pool
        slots, rows = torch.unique(md.kv_indices, return_inverse=True)
        p = pool.get_packed_layer(layer_id)
        scratch = torch.empty(slots.numel(), 1, pool.kv_cache_dim, dtype=dtype, device=slots.device)
        tq_dequant(
            p.latent_codes,
            p.latent_norms,
            None,
            None,
            slots,
            p.codec,
            dtype=dtype,
            out=(scratch[..., : pool.kv_lora_rank], None),
        )
        scratch[:, 0, pool.kv_lora_rank :] = p.k_pe[slots]
        return scratch, dataclasses.replace(md, kv_indices=rows.to(md.kv_indices.dtype))

    @contextlib.contextmanager
    def _swapped(self, buffers, md):
        saved = self.token_to_kv_pool, self.forward_metadata
        self.token_to_kv_pool, self.forward_metadata = buffers, md
        try:
            yield
        finally:
            self.token_to_kv_pool, self.forward_metadata = saved


@contextlib.contextmanager
def _no_preset_output(forward_batch):
    """A group's rows are only part of the batch: the parent must allocate its own output
    rather than write into the batch's preset one (``forward_batch._attn_output``)."""
    saved = getattr(forward_batch, "_attn_output", None)
    if saved is not None:
        forward_batch._attn_output = None
    try:
        yield
    finally:
        if saved is not None:
            forward_batch._attn_output = saved


def _group_metadata(md, b0: int, b1: int, qo: list[int], kv: list[int]):
    """The parent's extend metadata for requests b0..b1-1 alone: their query rows and
    prefix lists, rebased to 0 (``qo``/``kv``: the indptrs on the host)."""
    return dataclasses.replace(
        md,
        qo_indptr=md.qo_indptr[b0 : b1 + 1] - qo[b0],
        kv_indptr=md.kv_indptr[b0 : b1 + 1] - kv[b0],
        kv_indices=md.kv_indices[kv[b0] : kv[b1]],
        max_extend_len=max(qo[b + 1] - qo[b] for b in range(b0, b1)),
    )


def _check_mla_call(layer, k, sinks, score_mod) -> None:
    if k is None or sinks is not None or score_mod is not None:
        raise RuntimeError(
            "the turboquant MLA backend runs DeepSeek-style absorbed attention "
            "only (its own K, no sinks, no score_mod); use --kv-quant none for "
            "this model."
        )

"""The packed TurboQuant KV pool that replaces SGLang's MHA token-to-KV pool.

Per attention layer the pool holds either

* packed codes and norms, as the kernels expect them (``LayerCodec.alloc_buffers``):
  K codes uint8 [slots, Hkv, D·b_k/8], K norms fp16 [slots, Hkv], and the same for
  V, with the layer's :class:`~sglang_tq.format.codec.LayerCodec` (rotation seeded by
  ``TQConfig.layer_seed`` of the *global* layer id, so every TP rank agrees); or
* plain K/V buffers [slots, Hkv, D] in the model dtype, for the layers listed in
  ``TQConfig.bf16_layers``.

A slot is one token (``slots = size + page_size``, the extra page absorbing the
padded writes to slot 0, as in SGLang's MHA pool), so paged allocation needs
nothing special: SGLang's attention metadata lists per-token slot ids for every
page size.

:func:`bytes_per_token` is the single source of the pool's size: the pool
configurator hook returns it as the cell size, and the allocation below uses the
same per-layer rule, so ``max_total_num_tokens`` grows by exactly the bytes ratio.

Nothing here hands out bf16 views of packed bytes: ``get_key_buffer`` and friends
raise for packed layers and :meth:`TQTokenToKVPool.get_packed_layer` is the way in.
SGLang subclasses of ``MHATokenToKVPool`` are deliberately not used, so HiCache,
PD transfer and offload code (which test ``isinstance(pool, MHATokenToKVPool)``)
never mistake the codes for bf16.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc

from ..config import TQConfig
from ..env import debug_memory_pool, fwht_rotations, store_row_tokens
from ..format.codec import LayerCodec
from ..kernels.tq_store import tq_store_kv

MODEL_DTYPES = (torch.bfloat16, torch.float16)


def check_model_dtype(model_dtype: torch.dtype) -> None:
    """The packed pools dequantize into the model's dtype: bf16 or fp16 only."""
    if model_dtype not in MODEL_DTYPES:
        raise ValueError(
            f"the model dtype of a TurboQuant pool must be bf16 or fp16, got {model_dtype}."
        )


# Kept out of torch.compile tracing, like SGLang's own Triton kernel wrappers.
_store_kv = torch.compiler.disable(tq_store_kv)


def bytes_per_token(
    cfg: TQConfig, layer_ids: Iterable[int], num_kv_heads: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """KV bytes one token costs over ``layer_ids``: packed layers at
    ``cfg.bytes_per_token_per_head`` per head, bf16 layers at 2·D·itemsize per head."""
    plain = 2 * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return sum(
        num_kv_heads * (plain if cfg.is_bf16_layer(i) else cfg.bytes_per_token_per_head)
        for i in layer_ids
    )


def prefill_scratch_bytes(
    cfg: TQConfig,
    layer_ids: Iterable[int],
    num_kv_heads: int,
    context_len: int,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes of the dense prefix scratch a prefill step may hold: ``context_len`` rows of
    K and V [Hkv, D] in ``dtype`` (one layer at a time), or 0 when every layer is bf16.
    The backend's prefill plan (``backend._plan_prefill``) never exceeds these rows, and
    the pool-sizing hook takes them out of the KV budget, so the scratch cannot OOM."""
    if all(cfg.is_bf16_layer(i) for i in layer_ids):
        return 0
    return (
        context_len * 2 * num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    )


def inner_pool_factory(
    cfg: TQConfig,
    layer_ids: dict[str | None, Sequence[int]],
    key_centers: torch.Tensor | None = None,
):
    """A stand-in for the ``MHATokenToKVPool`` class that SGLang's hybrid pools build their
    inner pools with (``SWAKVPool``'s ``token_to_kv_pool_class``, ``HybridLinearKVPool``'s
    ``full_kv_pool_class``): it takes their keyword arguments and builds a
    :class:`TQTokenToKVPool` whose model layer ids are ``layer_ids[allocation_label]``
    (SGLang labels SWAKVPool's pools "Full" and "SWA"; HybridLinearKVPool gives none)."""

    def build(
        *,
        size,
        page_size,
        dtype,
        head_num,
        head_dim,
        layer_num,
        device,
        enable_memory_saver=False,
        allocation_label=None,
        quant_method=None,
        enable_kv_cache_copy=False,
        post_capture_active=False,
        v_head_dim=None,
        **extra,
    ):
        unknown = sorted(k for k, v in extra.items() if v is not None)
        if unknown or quant_method is not None or enable_kv_cache_copy or post_capture_active:
            raise RuntimeError(
                f"--kv-quant turboquant cannot build SGLang's inner KV pool with "
                f"{unknown or 'a KV quantization, KV copy or post-capture sizing'}; use "
                f"--kv-quant none for this model."
            )
        if allocation_label not in layer_ids:
            raise RuntimeError(
                f"--kv-quant turboquant has no layer ids for SGLang's "
                f"{allocation_label!r} KV pool; use --kv-quant none for this model."
            )
        return TQTokenToKVPool(
            size,
            page_size,
            head_num,
            head_dim,
            layer_num,
            device,
            enable_memory_saver,
            cfg=cfg,
            model_dtype=dtype,
            v_head_dim=v_head_dim,
            start_layer=0,
            key_centers=key_centers,
            global_layer_ids=layer_ids[allocation_label],
        )

    return build


def resolve_layer(pool, layer_id: int) -> tuple[TQTokenToKVPool, int]:
    """The packed pool that holds model layer ``layer_id`` and the id it is addressed by
    there: ``pool`` itself, or the inner pool of SGLang's ``SWAKVPool`` (``layers_mapping``)
    or ``HybridLinearKVPool`` (``full_attention_layer_id_mapping``); one sentence when the
    layer has no packed pool."""
    if isinstance(pool, TQTokenToKVPool):
        return pool, layer_id
    swa_map = getattr(pool, "layers_mapping", None)
    full_map = getattr(pool, "full_attention_layer_id_mapping", None)
    if swa_map is not None and layer_id in swa_map:
        idx, is_swa = swa_map[layer_id]
        inner = pool.swa_kv_pool if is_swa else pool.full_kv_pool
    elif full_map is not None and layer_id in full_map:
        idx, inner = full_map[layer_id], pool.full_kv_pool
    else:
        raise RuntimeError(
            f"layer {layer_id} has no KV cache in the {type(pool).__name__} the "
            f"turboquant backend was given; use --kv-quant none for this model."
        )
    if not isinstance(inner, TQTokenToKVPool):
        raise RuntimeError(
            f"the {type(pool).__name__} holds a {type(inner).__name__} for layer "
            f"{layer_id}, not the packed pool; start with --kv-quant turboquant."
        )
    return inner, idx


def packed_pools(pool) -> list[TQTokenToKVPool]:
    """Every packed pool inside ``pool`` (itself, or a hybrid pool's inner pools)."""
    if isinstance(pool, TQTokenToKVPool):
        return [pool]
    inner = [getattr(pool, name, None) for name in ("full_kv_pool", "swa_kv_pool")]
    return [p for p in inner if isinstance(p, TQTokenToKVPool)]


class PackedLayer(NamedTuple):
    """One packed layer's buffers and codec, in the argument order of the kernels."""

    k_codes: torch.Tensor
    k_norms: torch.Tensor
    v_codes: torch.Tensor
    v_norms: torch.Tensor
    codec: LayerCodec


class PackedLayers:
    """Layer ids -> this pool's index, and which layers are packed (a codec) or bf16 (None),
    for both packed pools (``start_layer``, ``layer_num``, ``codecs`` per layer)."""

    def _index(self, layer_id: int) -> int:
        idx = layer_id - self.start_layer
        if not 0 <= idx < self.layer_num:
            raise IndexError(
                f"layer {layer_id} is outside this KV pool's layers "
                f"[{self.start_layer}, {self.start_layer + self.layer_num})."
            )
        return idx

    def is_packed_layer(self, layer_id: int) -> bool:
        return self.codecs[self._index(layer_id)] is not None


class RefusesRawMoves:
    """The KVCache paths that would move packed bytes as if they were bf16 (speculative
    decoding, PD transfer, HiCache, CPU offload): one sentence each, for both packed pools."""

    def _refuse(self, what: str, flag: str):
        raise RuntimeError(
            f"sglang-tq: {what} is not supported on the packed TurboQuant KV pool; "
            f"run without {flag} or start the server with --kv-quant none."
        )

    def move_kv_cache(self, tgt_loc, src_loc):
        self._refuse("moving KV slots (speculative decoding)", "--speculative-algorithm")

    def set_kv_buffer_prefix_valid(self, *args, **kwargs):
        self._refuse("prefix-valid KV writes (speculative decoding)", "--speculative-algorithm")

    def get_contiguous_buf_infos(self):
        self._refuse(
            "exporting raw KV buffers (PD disaggregation / HiCache)",
            "--disaggregation-mode and --enable-hierarchical-cache",
        )

    def get_cpu_copy(self, indices, mamba_indices=None):
        self._refuse("offloading KV to the CPU", "--disaggregation-decode-enable-offload-kvcache")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        self._refuse("loading KV from the CPU", "--disaggregation-decode-enable-offload-kvcache")


class TQTokenToKVPool(PackedLayers, RefusesRawMoves, KVCache):
    """Token-to-KV pool storing TurboQuant codes (and bf16 K/V for bf16 layers)."""

    def __init__(
        self,
        size: int,
        page_size: int,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        *,
        cfg: TQConfig,
        model_dtype: torch.dtype = torch.bfloat16,
        v_head_dim: int | None = None,
        start_layer: int | None = None,
        end_layer: int | None = None,
        key_centers: torch.Tensor | None = None,
        global_layer_ids: Sequence[int] | None = None,
    ):
        if cfg.head_dim != head_dim or (v_head_dim or head_dim) != head_dim:
            raise ValueError(
                f"TQTokenToKVPool needs equal K/V head dims matching TQConfig.head_dim={cfg.head_dim}, "
                f"got head_dim={head_dim} and v_head_dim={v_head_dim}."
            )
        check_model_dtype(model_dtype)
        # dtype is the storage dtype (uint8): SGLang's fused set-KV test
        # (pool.dtype == bfloat16) is then false for this pool by construction.
        super().__init__(
            size,
            page_size,
            torch.uint8,
            layer_num,
            device,
            enable_memory_saver,
            start_layer,
            end_layer,
        )
        self.cfg = cfg
        # the model's ids of this pool's layers: what the rotation seed, --kv-quant-bf16-layers
        # and the key centers are indexed by; an inner pool of SGLang's hybrid pools (SWA,
        # linear attention) addresses layers 0..n-1 but holds scattered model layers
        self.global_layer_ids = (
            tuple(self.layer_ids)
            if global_layer_ids is None
            else tuple(int(i) for i in global_layer_ids)
        )
        if len(self.global_layer_ids) != layer_num:
            raise ValueError(
                f"global_layer_ids must name {layer_num} layers, got {len(self.global_layer_ids)}."
            )
        self._debug = debug_memory_pool()
        self.fwht = fwht_rotations()  # SGLANG_TQ_FWHT: the store's rotation (0: dense, for A/B)
        self.row_tokens = store_row_tokens()  # SGLANG_TQ_STORE_ROW_TOKENS: one-token programs
        self.model_dtype = model_dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim
        self.num_slots = size + page_size
        self.codecs: list[LayerCodec | None] = []
        self.k_codes: list[torch.Tensor | None] = []
        self.k_norms: list[torch.Tensor | None] = []
        self.v_codes: list[torch.Tensor | None] = []
        self.v_norms: list[torch.Tensor | None] = []
        self.k_buffer: list[torch.Tensor | None] = []
        self.v_buffer: list[torch.Tensor | None] = []
        # The codecs (rotations, codebooks, lookup words, key centers) are constants, made
        # outside the KV region: --enable-memory-saver discards that region on release and
        # hands back undefined bytes on resume, which is right for the codes and norms only.
        codecs = {
            i: None
            if cfg.is_bf16_layer(g)
            else LayerCodec.create(
                head_dim,
                cfg.k_bits,
                cfg.v_bits,
                seed=cfg.layer_seed(g),
                device=device,
                k_center=None if key_centers is None else key_centers[g],
            )
            for i, g in zip(self.layer_ids, self.global_layer_ids)
        }
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            for layer_id in self.layer_ids:
                self._alloc_layer(layer_id, codecs[layer_id])
        self._finalize_allocation_log(size)

    @property
    def layer_ids(self) -> range:
        """The ids this pool's layers are addressed by (a pipeline stage holds a contiguous
        range; an inner pool of a hybrid pool 0..n-1, see ``global_layer_ids``)."""
        return range(self.start_layer, self.start_layer + self.layer_num)

    def _alloc_layer(self, layer_id: int, codec: LayerCodec | None) -> None:
        """The KV buffers of one layer: packed codes and norms for ``codec``, or plain
        model-dtype K/V for a bf16 layer (``codec`` None)."""
        if codec is None:
            shape = (self.num_slots, self.head_num, self.head_dim)
            self.k_buffer.append(torch.zeros(shape, dtype=self.model_dtype, device=self.device))
            self.v_buffer.append(torch.zeros(shape, dtype=self.model_dtype, device=self.device))
            for packed in (self.codecs, self.k_codes, self.k_norms, self.v_codes, self.v_norms):
                packed.append(None)
            return
        kc, kn, vc, vn = codec.alloc_buffers(self.num_slots, self.head_num, self.device)
        self.codecs.append(codec)
        self.k_codes.append(kc)
        self.k_norms.append(kn)
        self.v_codes.append(vc)
        self.v_norms.append(vn)
        self.k_buffer.append(None)
        self.v_buffer.append(None)

    # -- what the TurboQuant backend reads -----------------------------------
    def get_packed_layer(self, layer_id: int) -> PackedLayer:
        idx = self._index(layer_id)
        if self.codecs[idx] is None:
            raise RuntimeError(
                f"layer {layer_id} is kept in bf16 (--kv-quant-bf16-layers), so it has no packed "
                f"codes; read it with get_key_buffer/get_value_buffer instead."
            )
        return PackedLayer(
            self.k_codes[idx],
            self.k_norms[idx],
            self.v_codes[idx],
            self.v_norms[idx],
            self.codecs[idx],
        )

    # -- KVCache interface -----------------------------------------------------
    def _plain(self, layer_id: int, which: str) -> int:
        idx = self._index(layer_id)
        if self.codecs[idx] is not None:
            raise RuntimeError(
                f"sglang-tq: layer {layer_id} holds packed TurboQuant codes, which have no bf16 "
                f"{which} view; read them with TQTokenToKVPool.get_packed_layer() and the "
                f"sglang_tq.kernels decoders (or start the server with --kv-quant none)."
            )
        return idx

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[self._plain(layer_id, "key")]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[self._plain(layer_id, "value")]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._plain(layer_id, "key/value")
        return self.k_buffer[idx], self.v_buffer[idx]

    def get_v_head_dim(self) -> int:
        return self.v_head_dim

    def set_kv_buffer(
        self,
        layer,
        loc,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale=None,
        v_scale=None,
        layer_id_override: int | None = None,
        dcp_kv_mask=None,
    ) -> None:
        """Write new K/V [T, Hkv, D] to slots ``loc``: quantize-and-store for packed
        layers (one fused launch for K and V), a plain copy for bf16 layers.
        ``k_scale``/``v_scale`` only matter for fp8 stores and are ignored here."""
        if dcp_kv_mask is not None:
            raise RuntimeError(
                "the TurboQuant KV pool does not support decode context parallelism "
                "(--dcp-size); run without it or use --kv-quant none."
            )
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        loc = unwrap_write_loc(loc)[0]
        idx = self._index(layer_id)
        k = cache_k.reshape(-1, self.head_num, self.head_dim)
        v = cache_v.reshape(-1, self.head_num, self.head_dim)
        if self.codecs[idx] is None:
            self.k_buffer[idx][loc] = k.to(self.model_dtype)
            self.v_buffer[idx][loc] = v.to(self.model_dtype)
            return
        if self._debug:
            self._check_slots(loc)
        _store_kv(
            k,
            v,
            loc,
            self.k_codes[idx],
            self.k_norms[idx],
            self.v_codes[idx],
            self.v_norms[idx],
            self.codecs[idx],
            fwht=self.fwht,
            row_tokens=self.row_tokens,
        )
        if self._debug:
            self._check_norms(layer_id, loc)

    def _check_slots(self, loc: torch.Tensor) -> None:
        """SGLANG_DEBUG_MEMORY_POOL: every slot of a store inside the pool (synchronizes)."""
        if loc.numel() and (int(loc.min()) < 0 or int(loc.max()) >= self.num_slots):
            raise IndexError(
                f"a KV store addressed slots {int(loc.min())}..{int(loc.max())} of a "
                f"pool of {self.num_slots}; this is an allocator bug, please report it."
            )

    def _check_norms(self, layer_id: int, loc: torch.Tensor) -> None:
        """SGLANG_DEBUG_MEMORY_POOL: the fp16 norms just stored are finite (the kernel writes
        inf for a vector whose norm exceeds fp16's range; the reference quantizer raises)."""
        idx = self._index(layer_id)
        for which, norms in (("key", self.k_norms[idx]), ("value", self.v_norms[idx])):
            if not torch.isfinite(norms[loc.long()]).all():
                g = self.global_layer_ids[idx]
                raise ValueError(
                    f"layer {g}: a {which} vector's norm exceeds the fp16 range "
                    f"of the packed pool; keep this layer in bf16 "
                    f"(--kv-quant-bf16-layers {g})."
                )

    def get_kv_size_bytes(self) -> tuple[int, int]:
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        return (
            nbytes(self.k_codes) + nbytes(self.k_norms) + nbytes(self.k_buffer),
            nbytes(self.v_codes) + nbytes(self.v_norms) + nbytes(self.v_buffer),
        )

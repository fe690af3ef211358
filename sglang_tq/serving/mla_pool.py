"""The packed TurboQuant pool for MLA models (DeepSeek-V2/V3), in place of SGLang's
``MLATokenToKVPool``.

MLA caches one compressed latent c (``kv_lora_rank`` = 512) and one decoupled RoPE key
k_pe (``qk_rope_head_dim`` = 64) per token and layer, shared by every query head
(DeepSeek-V2, Sec. 2.1). In the absorbed form SGLang runs for decode and for prefill over a
cached prefix, the latent is both the key's first 512 columns and the value, so it is
packed once, as TurboQuant keys of dimension 512 (rotation Π of the layer's seed, norm in
fp16, Lloyd-Max codes; ``tq_store_kv`` keys-only), and ``tq_decode`` reads the same codes as
K and V. The RoPE part stays in the model dtype (a third of the bytes at 4 bits; quantizing
it is a later lever). Per packed layer:

* ``latent_codes`` uint8 [slots, 1, 512·b/8], ``latent_norms`` fp16 [slots, 1];
* ``k_pe`` [slots, 64] in the model dtype.

A layer in ``--kv-quant-bf16-layers`` keeps SGLang's layout, ``kv_buffer`` [slots, 1, 576],
and answers ``get_key_buffer`` / ``get_value_buffer`` as SGLang's pool does. Packed layers
have no bf16 view: those getters raise, and :meth:`TQMLATokenToKVPool.get_packed_layer` is
the way in. Like :class:`~sglang_tq.serving.pool.TQTokenToKVPool` this is not a subclass of
SGLang's pool, so HiCache, PD and offload code (which test ``isinstance(pool,
MLATokenToKVPool)``) never mistake the codes for bf16. The latent has one code width: the
config's key bits (a k≠v pair is refused at launch for MLA).

Writes arrive two ways (notes/mla-design.md §3): ``set_kv_buffer`` with the concatenated
[T, 1, 576] key from the backend (absorbed path), and ``set_mla_kv_buffer`` with the latent
and the RoPE part apart from the model (prefill without a prefix).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc

from ..config import TQConfig
from ..env import fwht_rotations
from ..format.codec import LayerCodec
from .pool import PackedLayers, RefusesRawMoves, _store_kv, check_model_dtype

MLA_LATENT_DIMS = (512,)
MLA_ROPE_DIMS = (64,)


def mla_bytes_per_token(
    cfg: TQConfig, layer_ids: Iterable[int], rope_dim: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """KV bytes one token costs over ``layer_ids`` of an MLA model: packed layers hold the
    latent's codes and norm (``cfg.key_bytes``, cfg.head_dim = the latent dim) plus the RoPE
    key in ``dtype``; bf16 layers SGLang's (latent + RoPE) row."""
    item = torch.empty((), dtype=dtype).element_size()
    plain = (cfg.head_dim + rope_dim) * item
    return sum(
        plain if cfg.is_bf16_layer(i) else cfg.key_bytes + rope_dim * item for i in layer_ids
    )


class MLAPackedLayer(NamedTuple):
    """One packed MLA layer: the latent's codes and norms, the RoPE keys, the codec."""

    latent_codes: torch.Tensor
    latent_norms: torch.Tensor
    k_pe: torch.Tensor
    codec: LayerCodec


class TQMLATokenToKVPool(PackedLayers, RefusesRawMoves, KVCache):
    """Token-to-KV pool storing the MLA latent as TurboQuant codes (module docstring)."""

    def __init__(
        self,
        size: int,
        page_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        *,
        cfg: TQConfig,
        model_dtype: torch.dtype = torch.bfloat16,
        start_layer: int | None = None,
        end_layer: int | None = None,
    ):
        if kv_lora_rank not in MLA_LATENT_DIMS or qk_rope_head_dim not in MLA_ROPE_DIMS:
            raise ValueError(
                f"the TurboQuant MLA pool supports a {MLA_LATENT_DIMS} latent with a "
                f"{MLA_ROPE_DIMS} RoPE part, got {kv_lora_rank} and {qk_rope_head_dim}; "
                f"use --kv-quant none for this model."
            )
        if cfg.head_dim != kv_lora_rank:
            raise ValueError(
                f"the MLA pool's TQConfig must have head_dim = kv_lora_rank "
                f"({kv_lora_rank}), got {cfg.head_dim}."
            )
        if cfg.k_bits != cfg.v_bits or cfg.key_variant != "mse":
            raise ValueError(
                f"an MLA latent is both key and value, so it takes one bit width "
                f"and plain codes: use --kv-quant-bits k{cfg.k_bits}v{cfg.k_bits}."
            )
        check_model_dtype(model_dtype)
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
        self.model_dtype = model_dtype
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv_cache_dim = kv_lora_rank + qk_rope_head_dim
        self.head_num = 1
        self.head_dim = self.v_head_dim = kv_lora_rank
        self.num_slots = size + page_size
        self.fwht = fwht_rotations()
        # codecs outside the KV region (--enable-memory-saver discards only codes and norms)
        self.codecs: list[LayerCodec | None] = [
            None
            if cfg.is_bf16_layer(i)
            else LayerCodec.create(
                kv_lora_rank, cfg.k_bits, cfg.k_bits, seed=cfg.layer_seed(i), device=device
            )
            for i in self.layer_ids
        ]
        self.latent_codes: list[torch.Tensor | None] = []
        self.latent_norms: list[torch.Tensor | None] = []
        self.k_pe: list[torch.Tensor | None] = []
        self.kv_buffer: list[torch.Tensor | None] = []
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            for codec in self.codecs:
                self._alloc_layer(codec)
        self._finalize_allocation_log(size)

    @property
    def layer_ids(self) -> range:
        return range(self.start_layer, self.start_layer + self.layer_num)

    def _alloc_layer(self, codec: LayerCodec | None) -> None:
        dev = dict(device=self.device)
        if codec is None:
            self.kv_buffer.append(
                torch.zeros(self.num_slots, 1, self.kv_cache_dim, dtype=self.model_dtype, **dev)
            )
            for packed in (self.latent_codes, self.latent_norms, self.k_pe):
                packed.append(None)
            return
        codes, norms, _, _ = codec.alloc_buffers(0, 1, self.device)
        self.latent_codes.append(
            torch.zeros(self.num_slots, 1, codes.shape[-1], dtype=torch.uint8, **dev)
        )
        self.latent_norms.append(torch.zeros(self.num_slots, 1, dtype=torch.float16, **dev))
        self.k_pe.append(
            torch.zeros(self.num_slots, self.qk_rope_head_dim, dtype=self.model_dtype, **dev)
        )
        self.kv_buffer.append(None)

    # -- what the TurboQuant backend reads -----------------------------------
    def get_packed_layer(self, layer_id: int) -> MLAPackedLayer:
        idx = self._index(layer_id)
        if self.codecs[idx] is None:
            raise RuntimeError(
                f"layer {layer_id} is kept in bf16 (--kv-quant-bf16-layers), so it "
                f"has no packed latent; read it with get_key_buffer instead."
            )
        return MLAPackedLayer(
            self.latent_codes[idx], self.latent_norms[idx], self.k_pe[idx], self.codecs[idx]
        )

    # -- KVCache interface -----------------------------------------------------
    def _plain(self, layer_id: int) -> int:
        idx = self._index(layer_id)
        if self.codecs[idx] is not None:
            raise RuntimeError(
                f"sglang-tq: layer {layer_id} holds the MLA latent as packed TurboQuant codes, "
                f"which have no bf16 view; read them with TQMLATokenToKVPool.get_packed_layer() "
                f"and the sglang_tq.kernels decoders (or start the server with --kv-quant none)."
            )
        return idx

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[self._plain(layer_id)]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[self._plain(layer_id)][..., : self.kv_lora_rank]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def get_v_head_dim(self) -> int:
        return self.kv_lora_rank

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
        """The absorbed path's write: ``cache_k`` [T, 1, 576] = latent | RoPE key;
        ``cache_v`` (the latent again) is not needed, as in SGLang's MLA pool."""
        if dcp_kv_mask is not None:
            raise RuntimeError(
                "the TurboQuant KV pool does not support decode context parallelism "
                "(--dcp-size); run without it or use --kv-quant none."
            )
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        k = cache_k.reshape(-1, 1, self.kv_cache_dim)
        self._write(
            layer_id,
            unwrap_write_loc(loc)[0],
            k[..., : self.kv_lora_rank],
            k[..., self.kv_lora_rank :],
        )

    def set_mla_kv_buffer(
        self, layer, loc: torch.Tensor, cache_k_nope: torch.Tensor, cache_k_rope: torch.Tensor
    ) -> None:
        """The model's write on prefill without a prefix: latent [T, 1, 512] and RoPE key
        [T, 1, 64] as separate (possibly strided) tensors."""
        self._write(
            layer.layer_id,
            loc,
            cache_k_nope.reshape(-1, 1, self.kv_lora_rank),
            cache_k_rope.reshape(-1, 1, self.qk_rope_head_dim),
        )

    def _write(
        self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor
    ) -> None:
        idx = self._index(layer_id)
        if self.codecs[idx] is None:
            buf = self.kv_buffer[idx]
            buf[loc, :, : self.kv_lora_rank] = latent.to(self.model_dtype)
            buf[loc, :, self.kv_lora_rank :] = rope.to(self.model_dtype)
            return
        if latent.stride(-1) != 1:
            latent = latent.contiguous()
        _store_kv(
            latent,
            None,
            loc,
            self.latent_codes[idx],
            self.latent_norms[idx],
            None,
            None,
            self.codecs[idx],
            fwht=self.fwht,
        )
        self.k_pe[idx][loc] = rope.reshape(-1, self.qk_rope_head_dim).to(self.model_dtype)

    def get_mla_kv_buffer(self, layer, loc, dst_dtype=None):
        self._refuse(
            "gathering the dense MLA latent (SGLang's fa3/flashinfer MLA prefill)",
            "--attention-backend",
        )

    def get_kv_size_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for group in (self.latent_codes, self.latent_norms, self.k_pe, self.kv_buffer)
            for t in group
            if t is not None
        )

"""Launcher argument checks shared by the kernels: one clear sentence per mistake."""

from __future__ import annotations

import functools

import torch

from sglang_tq.env import triton_interpreting
from sglang_tq.format.codec import LayerCodec

SUPPORTED_HEAD_DIMS = (64, 128, 256)
# MLA's compressed latent (DeepSeek-V2/V3: kv_lora_rank 512), stored once per token as the
# keys' and the values' shared part: only with ``shared_kv`` (values = the key codes)
SUPPORTED_LATENT_DIMS = (512,)


def check_head_dim(head_dim: int, latent: bool = False) -> None:
    dims = SUPPORTED_HEAD_DIMS + (SUPPORTED_LATENT_DIMS if latent else ())
    if head_dim not in dims:
        what = "head_dim (or MLA latent dim)" if latent else "head_dim"
        raise ValueError(
            f"the TurboQuant kernels support {what} in {dims}, got {head_dim}; "
            f"use --kv-quant none (or fp8 KV) for this model."
        )


def check_center(codec: LayerCodec, hkv: int) -> None:
    if codec.k_center is not None and tuple(codec.k_center.shape) != (hkv, codec.head_dim):
        raise ValueError(
            f"the codec's key center is {tuple(codec.k_center.shape)} but the pool has "
            f"{hkv} KV heads of dim {codec.head_dim}; the key centers file must match "
            f"the model (and its tensor-parallel KV heads)."
        )


def check_pool(k_codes: torch.Tensor, v_codes: torch.Tensor | None, codec: LayerCodec) -> int:
    """Validate packed K/V pages [slots, Hkv, bytes] against a codec; returns Hkv.
    ``v_codes`` None: the values are the key codes (MLA's shared latent)."""
    shared = v_codes is None
    check_head_dim(codec.head_dim, latent=shared)
    hkv = k_codes.shape[1]
    if k_codes.dtype != torch.uint8 or (not shared and v_codes.dtype != torch.uint8):
        raise ValueError("k_codes and v_codes must be uint8 packed pages, not bf16 views.")
    if k_codes.shape[1:] != (hkv, codec.k_code_bytes) or (
        not shared and v_codes.shape[1:] != (hkv, codec.v_code_bytes)
    ):
        raise ValueError(
            "the packed pool does not match the codec's bit widths; rebuild it with "
            "LayerCodec.alloc_buffers."
        )
    check_center(codec, hkv)
    return hkv


def check_attention_args(
    q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor | None, codec: LayerCodec
) -> tuple[int, int, int]:
    """Validate a query [·, Hq, D] against a packed pool; returns (Hq, D, Hkv)."""
    hq, d = q.shape[-2:]
    check_head_dim(d, latent=v_codes is None)
    if d != codec.head_dim:
        raise ValueError(f"q has head_dim {d} but the codec was built for {codec.head_dim}.")
    hkv = check_pool(k_codes, v_codes, codec)
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads.")
    return hq, d, hkv


@functools.cache
def pdl_supported() -> bool:
    """Programmatic dependent launch (griddepcontrol) needs sm_90+ and a real GPU."""
    return (
        not triton_interpreting()
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (9, 0)
    )


def check_pdl(pdl: bool) -> None:
    if pdl and not pdl_supported():
        raise ValueError(
            "pdl (programmatic dependent launch) needs a CUDA GPU of compute "
            "capability 9.0 or newer, outside the Triton interpreter."
        )


def pdl_launch(pdl: bool) -> dict:
    """Launch options of a kernel started with programmatic dependent launch."""
    return {"launch_pdl": True} if pdl else {}


def pool_strides(k_codes, k_norms, v_codes, v_norms) -> tuple[int, ...]:
    """The packed pool buffers' (slot, head) strides in the kernels' argument order:
    key codes, key norms, value codes, value norms."""
    return tuple(st for t in (k_codes, k_norms, v_codes, v_norms) for st in t.stride()[:2])


def partial_strides(mid_o, mid_lse) -> tuple[int, ...]:
    """The split partials' strides in the decode kernels' argument order: output (batch,
    head, split), log-sum-exp (batch, head)."""
    return (*mid_o.stride()[:3], *mid_lse.stride()[:2])

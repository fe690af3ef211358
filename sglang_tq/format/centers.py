"""Key centers: one vector μ per (layer, KV head) subtracted from keys before quantizing.

Why: a softmax row is unchanged when the same vector is subtracted from every key of a
head, q·(k − μ) = q·k − q·μ (a constant shift of the row). TurboQuant's error scales
with the norm of what it quantizes (paper Thm. 1: E‖k − k̂‖² = D_mse·‖k‖²), and keys
of many models carry a large common component: Qwen2.5's k_proj bias, the mean post-RoPE
key of SmolLM2 holds ~65% of the key energy. Quantizing k − μ removes that component
from the error: on Qwen2.5-Coder-0.5B the attention-row KL of k4v4 keys drops 8.6×
(``python -m sglang_tq.bench attn-error``,
benchmarks/results/attn_error/attn_error_qwen2.5-coder-0.5b_cpu.json).

μ is the mean post-RoPE key (what SGLang's pool receives) over a calibration text,
computed once per model by ``python -m sglang_tq.tools.key_centers``. RoPE turns the pre-RoPE bias
with position, so one static post-RoPE μ removes the slowly rotating part; on the
measured texts it does as well as each text's own mean.

File format: safetensors with one float32 tensor ``key_centers`` [layers, kv_heads,
head_dim] and string metadata (model, text digest, tokens). No pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

TENSOR = "key_centers"
# RoPE positions the k_proj-bias centers average over (``rope_mean_of_bias``); chosen by
# python -m sglang_tq.bench attn-error --bias-horizons on Qwen2.5-Coder-0.5B (notes/accuracy.md).
BIAS_HORIZON = 2048


def save_key_centers(path: str | Path, centers: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    if centers.dim() != 3:
        raise ValueError(
            f"key centers must be [layers, kv_heads, head_dim], got {tuple(centers.shape)}"
        )
    save_file(
        {TENSOR: centers.detach().float().contiguous().cpu()},
        str(path),
        metadata={k: str(v) for k, v in metadata.items()},
    )


def load_key_centers(
    path: str | Path, num_layers: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """float32 [num_layers, num_kv_heads, head_dim]; one clear error for a file that
    does not fit the model."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"key centers file {str(p)!r} does not exist; create it with "
            f"`python -m sglang_tq.tools.key_centers --model-path <model> --out {p}`."
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            if TENSOR not in f.keys():
                raise ValueError(f"{p} holds no {TENSOR!r} tensor")
            centers = f.get_tensor(TENSOR).float()
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(
            f"key centers file {str(p)!r} is not a readable safetensors file "
            f"({exc}); recreate it with python -m sglang_tq.tools.key_centers."
        ) from None
    want = (num_layers, num_kv_heads, head_dim)
    if tuple(centers.shape) != want:
        raise ValueError(
            f"key centers file {str(p)!r} has shape {tuple(centers.shape)} but this "
            f"model needs [layers, kv_heads, head_dim] = {list(want)}; recreate it "
            f"for this model with python -m sglang_tq.tools.key_centers."
        )
    if not torch.isfinite(centers).all():
        raise ValueError(f"key centers file {str(p)!r} holds non-finite values; recreate it.")
    check_center_range(centers, f"key centers file {str(p)!r}")
    return centers


# A centered key's norm is stored in fp16: a center this large makes ‖k − μ‖ overflow it
# for any key of a real model (bf16 keys of the models served are far below this).
MAX_CENTER_NORM = float(torch.finfo(torch.float16).max) / 2


def check_center_range(centers: torch.Tensor, what: str) -> None:
    """One sentence for centers whose norm would overflow the fp16 norms of centered keys."""
    worst = centers.float().norm(dim=-1).max().item() if centers.numel() else 0.0
    if worst > MAX_CENTER_NORM:
        raise ValueError(
            f"{what} holds a center of norm {worst:.4g}, beyond what the fp16 key "
            f"norms can hold (max {MAX_CENTER_NORM:.4g}); recreate it, or use "
            f"--kv-quant-key-centers none."
        )


# ---------------------------------------------------------------- centers from a k_proj bias
def rope_mean_of_bias(
    k_bias: torch.Tensor, rotate, horizon: int, chunk: int = 4096
) -> torch.Tensor:
    """float32 [kv_heads, head_dim]: the mean over positions 0 .. horizon−1 of RoPE(b).

    Why this is a center: the keys of a model with a k_proj bias b are k_p = R_p(W x + b)
    (R_p the RoPE rotation of position p), so every key holds R_p b. Each RoPE pair of b
    turns at its own frequency θ_i: the mean of R_p b over p ∈ [0, P) keeps the pairs with
    θ_i·P ≪ 1 (they barely turn: the constant part TurboQuant's error grows with) and
    averages the fast ones to ~0 (subtracting them would only move the error around).
    ``rotate(positions [n], k [n, kv_heads, head_dim]) -> same shape`` applies the model's
    own RoPE, so partial rotary dims and RoPE scaling come out right.
    """
    if k_bias.dim() != 2:
        raise ValueError(f"k_bias must be [kv_heads, head_dim], got {tuple(k_bias.shape)}")
    if horizon <= 0:
        raise ValueError(f"horizon must be positive, got {horizon}")
    b = k_bias.detach().float()
    total = torch.zeros_like(b)
    for start in range(0, horizon, chunk):
        pos = torch.arange(start, min(start + chunk, horizon), device=b.device)
        total += rotate(pos, b.expand(len(pos), *b.shape).contiguous()).float().sum(0)
    return total / horizon


def sglang_bias_key_centers(
    model, num_layers: int, num_kv_heads: int, head_dim: int, horizon: int
) -> torch.Tensor | None:
    """[num_layers, num_kv_heads, head_dim] float32 centers of an SGLang model whose
    attention modules carry a fused ``qkv_proj`` bias (Qwen2 and its kin), on this rank's
    KV heads; None when no attention module has one (no bias: nothing to remove).

    An attention module is recognised by what SGLang's MHA models share: ``qkv_proj``,
    ``q_size``/``kv_size``, ``rotary_emb`` and a RadixAttention ``attn`` with its
    ``layer_id``. Layers without a bias keep a zero center (exactly the uncentered code).
    """
    centers = torch.zeros(num_layers, num_kv_heads, head_dim)
    found = 0
    for m in model.modules():
        attn, qkv, rope = (getattr(m, a, None) for a in ("attn", "qkv_proj", "rotary_emb"))
        bias = getattr(qkv, "bias", None)
        if bias is None or rope is None or not hasattr(attn, "layer_id"):
            continue
        layer = attn.layer_id
        if not 0 <= layer < num_layers or m.kv_size != num_kv_heads * head_dim:
            raise ValueError(
                f"attention module of layer {layer} has kv_size {m.kv_size}, "
                f"expected {num_kv_heads} heads x {head_dim}: use "
                f"--kv-quant-key-centers none or FILE for this model."
            )
        k_bias = bias.detach()[m.q_size : m.q_size + m.kv_size].float().view(num_kv_heads, head_dim)
        limit = getattr(rope, "cos_sin_cache", None)
        h = min(horizon, limit.shape[0]) if limit is not None else horizon

        def rotate(pos, k, rope=rope):
            return rope.forward_native(pos, torch.zeros_like(k), k)[1].view_as(k)

        centers[layer] = rope_mean_of_bias(k_bias, rotate, h).cpu()
        found += 1
    if found:
        check_center_range(centers, "the k_proj bias of this model (--kv-quant-key-centers auto)")
    return centers if found else None

"""Key centers: one vector μ per (layer, KV head) subtracted from keys before quantizing.

Why: a softmax row is unchanged when the same vector is subtracted from every key of a
head, q·(k − μ) = q·k − q·μ (a constant shift of the row). TurboQuant's error scales
with the norm of what it quantizes (paper Thm. 1: E‖k − k̂‖² = D_mse·‖k‖²), and keys
of many models carry a large common component: Qwen2.5's k_proj bias, the mean post-RoPE
key of SmolLM2 holds ~65% of the key energy. Quantizing k − μ removes that component
from the error: on Qwen2.5-Coder-0.5B the attention-row KL of k4v4 keys drops 8.6×
(``scripts/attn_error.py``, benchmarks/results/attn_error_qwen2.5-coder-0.5b_cpu.json).

μ is the mean post-RoPE key (what SGLang's pool receives) over a calibration text,
computed once per model by ``scripts/key_centers.py``. RoPE turns the pre-RoPE bias
with position, so one static post-RoPE μ removes the slowly rotating part; on the
measured texts it does as well as each text's own mean.

File format: safetensors with one float32 tensor ``key_centers`` [layers, kv_heads,
head_dim] and string metadata (model, text digest, tokens). No pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

TENSOR = "key_centers"


def save_key_centers(path: str | Path, centers: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    if centers.dim() != 3:
        raise ValueError(f"key centers must be [layers, kv_heads, head_dim], got {tuple(centers.shape)}")
    save_file({TENSOR: centers.detach().float().contiguous().cpu()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def load_key_centers(path: str | Path, num_layers: int, num_kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """float32 [num_layers, num_kv_heads, head_dim]; one clear error for a file that
    does not fit the model."""
    from safetensors import safe_open  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"key centers file {str(p)!r} does not exist; create it with "
                         f"`python scripts/key_centers.py --model-path <model> --out {p}`.")
    try:
        with safe_open(str(p), framework="pt") as f:
            if TENSOR not in f.keys():
                raise ValueError(f"{p} holds no {TENSOR!r} tensor")
            centers = f.get_tensor(TENSOR).float()
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"key centers file {str(p)!r} is not a readable safetensors file "
                         f"({exc}); recreate it with scripts/key_centers.py.") from None
    want = (num_layers, num_kv_heads, head_dim)
    if tuple(centers.shape) != want:
        raise ValueError(f"key centers file {str(p)!r} has shape {tuple(centers.shape)} but this "
                         f"model needs [layers, kv_heads, head_dim] = {list(want)}; recreate it "
                         f"for this model with scripts/key_centers.py.")
    if not torch.isfinite(centers).all():
        raise ValueError(f"key centers file {str(p)!r} holds non-finite values; recreate it.")
    return centers

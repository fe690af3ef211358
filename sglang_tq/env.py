"""Every environment variable sglang-tq reads, in one place.

* ``TRITON_INTERPRET=1``: Triton runs kernels in its CPU interpreter (tests
  without a GPU). Kernels then take their portable lookup path, since the
  interpreter cannot execute inline PTX.
* ``SGLANG_TQ_COMMIT``: commit id recorded in result JSON where the checkout
  has no ``.git`` (the GPU host receives a bare copy of the working tree).
* ``SGLANG_TQ_DECODE_LAUNCH``: path of a decode launch table (the format of
  ``sglang_tq/kernels/decode_launch.json``, written by ``python -m sglang_tq.tools.tune``) used
  instead of the packaged one, e.g. to benchmark a fresh tuning before committing it.
* ``SGLANG_TQ_EXTEND_IMPL``: the prefill (extend) attention kernel, ``fa3`` or
  ``triton``, instead of the default (``sglang_tq/kernels/tq_extend.py``), e.g. for an A/B run.
* ``SGLANG_TQ_FWHT``: ``1`` (default) runs the rotations of the store, of the small-batch
  decode's fused query rotation and of its many-split merge as the fast Walsh-Hadamard
  transform Π is (``sglang_tq/kernels/tq_store.py``, ``sglang_tq/kernels/tq_decode.py``);
  ``0`` runs the dense Π products instead, for A/B runs. Default since the same-call A/B on an H100
  (``benchmarks/results/ab_decode/ab_fwht_h100_46f802e.json``): store 10.5 → 8.4 µs at one token,
  decode 1 × 4k 21.9 → 20.4 µs.
* ``SGLANG_TQ_STORE_ROW_TOKENS``: up to this many new tokens per layer (a decode step of a
  small batch), the store runs one token per one-warp program with its fast Walsh-Hadamard
  rotation in registers, instead of 16-token tensor-core tiles that one real row pads
  (``sglang_tq/kernels/tq_store.py``). Default 8: same-call A/B on an H100
  (``benchmarks/results/ab_decode/ab_store_rows_h100_8e620f2.json``), k4v4 8.35 → 6.54 µs at
  one token, 8.56 → 6.64 µs at eight; 0 keeps the tiles always.
* ``SGLANG_TQ_DECODE_IMPL``: the decode stage-1 kernel, ``triton`` (default) or ``mma``: the
  CUDA kernel that decodes codes straight into tensor-core fragments
  (``sglang_tq/kernels/tq_decode_mma.py``; 4-bit keys and values, head_dim 128, no window or
  soft-cap), compiled at first use with NVRTC. Opt-in until a same-run A/B on a GPU says
  which is faster.
* ``SGLANG_TQ_EXPERIMENTAL_MLA``: ``1`` admits MLA models (DeepSeek-V2/V3: the packed latent
  pool and backend, ``sglang_tq/serving/mla_pool.py``, ``sglang_tq/serving/mla_backend.py``)
  before a GPU run has validated them; without it they are refused at launch.
* ``SGLANG_DEBUG_MEMORY_POOL`` (SGLang's own debug switch, read here too): the packed
  pool checks every store's slots against its size and the stored norms for fp16
  overflow, raising one sentence (each check synchronizes the GPU: debugging only).
"""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def commit_override() -> str | None:
    return os.environ.get("SGLANG_TQ_COMMIT") or None


def decode_launch_file() -> str | None:
    return os.environ.get("SGLANG_TQ_DECODE_LAUNCH") or None


def extend_impl_override() -> str | None:
    """``SGLANG_TQ_EXTEND_IMPL`` (fa3 or triton): the prefill attention kernel, for A/B runs."""
    return os.environ.get("SGLANG_TQ_EXTEND_IMPL") or None


def debug_memory_pool() -> bool:
    return os.environ.get("SGLANG_DEBUG_MEMORY_POOL", "0").strip().lower() in ("1", "true", "yes")


def fwht_rotations() -> bool:
    """``SGLANG_TQ_FWHT``: the fast Walsh-Hadamard rotations in store and decode (1, the
    default) or the dense Π products (0)."""
    raw = os.environ.get("SGLANG_TQ_FWHT", "1").strip()
    if raw not in ("0", "1", ""):
        raise ValueError(f"SGLANG_TQ_FWHT must be 0 or 1, got {raw!r}.")
    return raw != "0"


def store_row_tokens() -> int:
    """``SGLANG_TQ_STORE_ROW_TOKENS``: the store's one-token-per-program threshold (>= 0)."""
    raw = os.environ.get("SGLANG_TQ_STORE_ROW_TOKENS", "8").strip() or "8"
    if not raw.isdigit():
        raise ValueError(f"SGLANG_TQ_STORE_ROW_TOKENS must be a token count >= 0, got {raw!r}.")
    return int(raw)


def experimental_mla() -> bool:
    """``SGLANG_TQ_EXPERIMENTAL_MLA``: admit MLA models before their GPU validation (0 or 1)."""
    raw = os.environ.get("SGLANG_TQ_EXPERIMENTAL_MLA", "0").strip()
    if raw not in ("0", "1", ""):
        raise ValueError(f"SGLANG_TQ_EXPERIMENTAL_MLA must be 0 or 1, got {raw!r}.")
    return raw == "1"


DECODE_IMPLS = ("triton", "mma")


def decode_impl() -> str:
    """``SGLANG_TQ_DECODE_IMPL``: the decode stage-1 kernel (triton or mma)."""
    raw = os.environ.get("SGLANG_TQ_DECODE_IMPL", "triton").strip() or "triton"
    if raw not in DECODE_IMPLS:
        raise ValueError(
            f"SGLANG_TQ_DECODE_IMPL must be one of {', '.join(DECODE_IMPLS)}, got {raw!r}."
        )
    return raw

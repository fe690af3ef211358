"""Prior-art KV formats served *simulated* through SGLang's own bf16 pool: accuracy, not memory.

``--kv-quant hadamard`` and ``--kv-quant kivi`` (``sglang_tq.format.priorart``: QuaRot-style
Hadamard + int, Ashkboos et al. 2024; KIVI, Liu et al. 2024) have no packed pool and no
fused kernel in sglang-tq. To measure their accuracy in the same engine, scheduler,
sampling and evaluation harness as TurboQuant, :class:`SimulatedKVPool` is SGLang's
``MHATokenToKVPool`` (same size, same bf16 buffers, same attention backend, chosen by
SGLang as for ``bf16``) in which every stored vector is replaced by its
quantize → dequantize round trip: numerically what a dequantize-on-read kernel gives,
with one extra bf16 rounding of the dequantized value. It saves no memory and is not
fast; the server log says so at start-up.

* **hadamard** (per token): :meth:`SimulatedKVPool.set_kv_buffer` round-trips K and V
  before SGLang's own store; with key centers μ (``--kv-quant-key-centers bias|FILE``,
  TurboQuant's centering applied to the prior art) a key is stored as Q(k − μ) + μ. Per layer and step that is a [D, D] float64 rotation
  (TurboQuant's own randomized Hadamard for the seed), a min/max and a rounding over the step's new tokens, in torch ops
  with static shapes, so it is captured by SGLang's decode CUDA graphs.
* **kivi** (per channel over token groups): K/V are stored exact; after each forward,
  :meth:`SimulatedKVPool.requantize_completed_groups` (called from the ``kivi-groups``
  patch on ``ModelRunner.forward``) finds the groups of G = 32 positions that this
  forward completed (from ``seq_lens_cpu`` and the new-token counts, no device sync),
  gathers their slots through ``req_to_token``, and overwrites their K (per channel)
  and V (per token) in every layer with the round trip. The incomplete group stays
  exact (KIVI's full-precision residual). The cost falls on one decode step in G: per
  completed group and layer, a gather, a quantize and a scatter of G·H·D values.

What attention sees in the step that writes: SGLang's backends read a prefill chunk's own
K/V either from the pool (fa3, flashinfer: then a hadamard prefill attends to the round
trip, as TurboQuant's ``--kv-quant-packed-prefill``) or from the forward pass (triton:
exact, as TurboQuant's default prefill). KIVI's group re-quantization runs after the
forward, so the step that completes a group still attends to it exact, as KIVI does.

A KIVI group must belong to one request: a radix-cache hit that ended inside a group
would make two requests share half a group. So ``--kv-quant kivi`` needs
``--disable-radix-cache`` or a ``--page-size`` that is a multiple of G (prefix hits are
then whole pages, hence whole groups); :mod:`sglang_tq.serving.refusals` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from ..config import TQConfig
from ..format.priorart import KIVI, KIVI_GROUP_TOKENS, HadamardInt

SIMULATED_MODES = ("hadamard", "kivi")


class SimulatedKVPool(MHATokenToKVPool):
    """SGLang's bf16 MHA pool whose stored K/V are round trips of a prior-art format.

    ``mode``: 'hadamard' or 'kivi'; ``k_bits``/``v_bits`` in 2..4; ``seed`` draws each
    layer's randomized Hadamard rotation (``TQConfig.layer_seed`` of the global layer id, so TP ranks
    agree); ``bf16_layers``: global layer ids stored exact. Everything else is
    ``MHATokenToKVPool``'s, so sizes, getters and transfers are stock."""

    def __init__(
        self,
        *args,
        mode: str,
        k_bits: int,
        v_bits: int,
        seed: int = 0,
        bf16_layers: Iterable[int] = (),
        group_tokens: int = KIVI_GROUP_TOKENS,
        key_centers: torch.Tensor | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if mode not in SIMULATED_MODES:
            raise ValueError(
                f"SimulatedKVPool mode must be one of {SIMULATED_MODES}, got {mode!r}."
            )
        if key_centers is not None and mode != "hadamard":
            raise ValueError(
                "key centers apply to --kv-quant hadamard only (KIVI's per-channel "
                "key scales absorb a common key part already)."
            )
        self.sim_mode = mode
        self.k_bits, self.v_bits = k_bits, v_bits
        self.bf16_layers = tuple(sorted(set(bf16_layers)))
        self.sim_seed = seed
        layers = range(self.start_layer, self.start_layer + self.layer_num)
        seeds = TQConfig(head_dim=8, seed=seed)
        self._k_fmt: dict[int, HadamardInt] = {}
        self._v_fmt: dict[int, HadamardInt] = {}
        self._rot: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kivi: KIVI | None = None
        if mode == "hadamard":
            for i in layers:
                if i in self.bf16_layers:
                    continue
                s = seeds.layer_seed(i)
                self._k_fmt[i] = HadamardInt(self.head_dim, k_bits, seed=s)
                self._v_fmt[i] = HadamardInt(self.v_head_dim, v_bits, seed=s)
                # on the pool's device now: CUDA-graph capture must not copy from the host
                self._rot[i] = (
                    self._k_fmt[i].rotation(self.device),
                    self._v_fmt[i].rotation(self.device),
                )
        else:
            self.kivi = KIVI(self.head_dim, k_bits, v_bits, group_tokens=group_tokens)
            self._arange = torch.arange(group_tokens, device=self.device)
        # [global layers, kv heads, D]: keys stored as Q(k - mu) + mu (attention unchanged)
        self._mu: dict[int, torch.Tensor] = (
            {}
            if key_centers is None
            else {i: key_centers[i].to(self.device, torch.float32) for i in self._k_fmt}
        )

    def describe(self) -> str:
        return (
            f"{self.sim_mode} k{self.k_bits}v{self.v_bits}"
            + (f", {self.kivi.group_tokens}-token key groups" if self.kivi else "")
            + (", keys centered" if self._mu else "")
        )

    def set_kv_buffer(
        self,
        layer,
        loc_info,
        cache_k,
        cache_v,
        k_scale=None,
        v_scale=None,
        layer_id_override=None,
        dcp_kv_mask=None,
    ):
        layer_id = layer.layer_id if layer is not None else layer_id_override
        if layer_id in self._k_fmt:
            k_pi, v_pi = self._rot[layer_id]
            mu = self._mu.get(layer_id)
            if mu is None:
                cache_k = self._k_fmt[layer_id].round_trip(cache_k, k_pi)
            else:
                k = cache_k.reshape(-1, *mu.shape).float() - mu
                cache_k = (
                    (self._k_fmt[layer_id].round_trip(k, k_pi) + mu)
                    .view(cache_k.shape)
                    .to(cache_k.dtype)
                )
            cache_v = self._v_fmt[layer_id].round_trip(cache_v, v_pi)
        return super().set_kv_buffer(
            layer, loc_info, cache_k, cache_v, k_scale, v_scale, layer_id_override, dcp_kv_mask
        )

    # ------------------------------------------------------------------------ KIVI
    def completed_groups(self, seq_lens: Iterable[int], new_tokens: Iterable[int]):
        """(batch row, first position) of every KIVI group a forward completed: the
        rows' sequences grew from seq_len − new to seq_len tokens, and group j (start jG)
        is quantized when the length reaches jG + residual."""
        g, r = self.kivi.group_tokens, self.kivi.residual_tokens
        out = []
        for row, (hi, n) in enumerate(zip(seq_lens, new_tokens)):
            lo = hi - n
            first = max(0, (lo - r) // g + 1)
            out.extend((row, j * g) for j in range(first, (hi - r) // g + 1))
        return out

    def requantize_completed_groups(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: Iterable[int],
        new_tokens: Iterable[int],
    ) -> int:
        """Overwrite the groups a forward completed with their KIVI round trip in every
        non-bf16 layer; returns how many groups it quantized."""
        groups = self.completed_groups(seq_lens, new_tokens)
        if not groups:
            return 0
        dev = req_pool_indices.device
        rows = torch.tensor([b for b, _ in groups], device=dev)
        starts = torch.tensor([s for _, s in groups], device=dev)
        cols = starts[:, None] + self._arange.to(dev)[None, :]
        slots = req_to_token[req_pool_indices[rows][:, None], cols].long()  # [n, G]
        for idx in range(self.layer_num):
            if self.start_layer + idx in self.bf16_layers:
                continue
            kb, vb = self.k_buffer[idx], self.v_buffer[idx]
            k_hat, v_hat = self.kivi.round_trip_groups(kb[slots], vb[slots])
            kb[slots] = k_hat
            vb[slots] = v_hat
        return len(groups)


def new_token_counts(forward_batch: Any) -> list[int] | None:
    """Tokens each request of a forward wrote (decode: 1, extend: its chunk), or None for
    forwards that write no KV of their own (idle)."""
    mode = forward_batch.forward_mode
    if mode.is_decode():
        return [1] * forward_batch.batch_size
    if mode.is_extend():
        return list(forward_batch.extend_seq_lens_cpu)
    return None

"""Prior-art KV-cache formats, as pure-torch quantize / dequantize pairs, for side-by-side runs.

DESIGN.md's fifth objection asks for TurboQuant next to the formats people already use,
in the same harness and at comparable bytes. fp8 e4m3 is SGLang's own pool
(``--kv-cache-dtype fp8_e4m3``); the two families here have no packed pool or fused
kernel in sglang-tq: the engine serves them *simulated* (``sglang_tq.serving.simulated``: the
bf16 pool stores each vector's quantize-dequantize round trip, which is numerically
what a dequantize-on-read kernel gives, without any memory saving), and the CPU tools
(``python -m sglang_tq.bench fidelity-ref`` and ``attn-error``) call the same functions.

* :class:`HadamardInt` (``hadamard_int``): QuaRot's KV cache (Ashkboos et al. 2024,
  "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", §3/§4: a randomized Hadamard
  transform of each head vector, then asymmetric round-to-nearest per group), which is
  also llama.cpp's rotated q4_0/q4_1-style cache. Each K or V vector x ∈ R^D (D a power
  of two) is rotated, y = H·diag(s)·x/√D with H the Sylvester Walsh-Hadamard matrix and
  s ∈ {±1}^D random signs from a seed (exactly TurboQuant's rotation for that seed,
  ``rotation.rotation_matrix``: the two formats differ only in the quantizer); each group of ``group`` coordinates of y gets a
  fp16 scale Δ = (max − min)/(2^b − 1) and a fp16 zero point m = min, and stores
  q = round((y − m)/Δ) ∈ [0, 2^b − 1]; reading back is y' = qΔ + m, rotated back.
  Default group: the whole head vector (QuaRot's KV setting, group size = head_dim 128),
  the choice closest to TurboQuant's bytes; ``group=32`` is llama.cpp's block size.
* :class:`KIVI` (``kivi``): Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
  Quantization for KV Cache" (ICML). Keys are quantized **per channel** over groups of
  G consecutive tokens (one fp16 scale and zero point per channel per group: the channel
  outliers of keys stay inside their channel), values **per token** (per vector, or per
  ``value_group`` coordinates); the most recent tokens, those of a group that is not yet
  complete (KIVI's full-precision residual; here R = G unless ``residual`` says more),
  stay in full precision. A group is quantized once, when the sequence passes its end.
  KIVI's own setting is G = 32 and per-token value groups of 32 coordinates; the default
  here keeps G = 32 (one 32-token page, page-aligned) and quantizes values per vector so
  the bytes stay near TurboQuant's.

Bytes per token per KV head at head_dim D = 128 (codes at b bits packed, fp16 metadata;
TurboQuant: D·b/8 code bytes + one fp16 norm per vector):

    format (one side)                    metadata per token         b=4      b=3      b=2
    TurboQuant kXvY, one side            2 B norm                   66       50       34
    hadamard_int, group = D (default)    2+2 B scale, zero          68       52       36
    hadamard_int, group = 32             4 groups × 4 B             80       64       48
    KIVI key, G = 32 tokens (default)    128 ch × 4 B / 32 tokens   80       64       48
    KIVI value, per vector (default)     4 B                        68       52       36
    KIVI value, value_group = 32         4 groups × 4 B             80       64       48
    bf16 / fp8 e4m3                      —                          256 / 128

So k4v4 costs 132 B per token per head in TurboQuant, 136 B as ``hadamard_int(4)`` and
148 B as ``kivi(4)`` (K 80 + V 68), plus KIVI's full-precision residual of up to G − 1
tokens per sequence (≤ 31 × 512 B per head, a per-request constant, not a per-token
cost). :func:`bytes_per_token_per_head` computes these numbers.

Uniform rounding bounds every coordinate's error by Δ/2 of its group (the property the
tests check against independent twins), up to the fp16 rounding of Δ and m.
"""

from __future__ import annotations

import dataclasses

import torch

from .rotation import is_power_of_two, rotation_matrix

BITS = (2, 3, 4)
KIVI_GROUP_TOKENS = 32
FP16_BYTES = 2


def _check_bits(bits: int, what: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{what} takes bits in {BITS}, got {bits!r}; pick 2, 3 or 4.")


def _check_group(head_dim: int, group: int | None, size: int, what: str) -> None:
    if head_dim % size:
        raise ValueError(
            f"{what} {group} must divide head_dim {head_dim}; pick a divisor such as 32."
        )


def quantize_minmax(
    x: torch.Tensor, bits: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest of ``x`` with one (scale, zero) per slice along ``dim``.

    Returns (codes uint8 in [0, 2^bits − 1], scale fp16, zero fp16), scale and zero with
    ``dim`` kept as size 1. A constant slice gets scale 0 and reads back exactly."""
    x = x.float()
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    zero = lo.half()
    scale = ((hi - zero.float()) / levels).half()
    s = scale.float()
    q = torch.where(s > 0, (x - zero.float()) / torch.where(s > 0, s, 1.0), 0.0)
    return q.round().clamp(0, levels).to(torch.uint8), scale, zero


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + zero.float()


@dataclasses.dataclass(frozen=True)
class HadamardInt:
    """QuaRot / llama.cpp-style rotated int KV: randomized Hadamard, then per-token
    asymmetric ``bits``-bit RTN with fp16 scale and zero per ``group`` coordinates
    (None: the whole vector). Stores codes [..., D] uint8 (b bits each when packed),
    scale and zero fp16 [..., D/group, 1]."""

    head_dim: int
    bits: int = 4
    group: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits, "hadamard_int")
        if not is_power_of_two(self.head_dim):
            raise ValueError(
                f"hadamard_int rotates by a Walsh-Hadamard matrix, which needs a "
                f"power-of-two head_dim, got {self.head_dim}; use kivi for this model."
            )
        _check_group(self.head_dim, self.group, self.group_size, "hadamard_int group")

    @property
    def group_size(self) -> int:
        return self.group or self.head_dim

    @property
    def bytes_per_vector(self) -> int:
        return self.head_dim * self.bits // 8 + (self.head_dim // self.group_size) * 2 * FP16_BYTES

    def rotation(self, device=None) -> torch.Tensor:
        """float64 Π [D, D] = H·diag(s)/√D: TurboQuant's own randomized Hadamard for this
        seed (``rotation.rotation_matrix``), applied in float64 so the rotation adds no
        error next to the quantizer's (TF32 matmuls would)."""
        return rotation_matrix(self.head_dim, self.seed).to(device=device, dtype=torch.float64)

    def rotate(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        pi = self.rotation(x.device) if pi is None else pi
        return (x.double() @ pi.T).float()

    def unrotate(self, y: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        pi = self.rotation(y.device) if pi is None else pi
        return (y.double() @ pi).float()

    def quantize(self, x: torch.Tensor, pi: torch.Tensor | None = None):
        """x [..., D] → (codes uint8 [..., D], scale fp16 [..., D/g, 1], zero fp16 [..., D/g, 1])."""
        y = self.rotate(x, pi)
        g = self.group_size
        codes, scale, zero = quantize_minmax(y.reshape(*y.shape[:-1], -1, g), self.bits, -1)
        return codes.reshape(y.shape), scale, zero

    def dequantize(self, codes, scale, zero, pi: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [..., D] read back from :meth:`quantize`'s output."""
        g = self.group_size
        y = dequantize_minmax(codes.reshape(*codes.shape[:-1], -1, g), scale, zero)
        return self.unrotate(y.reshape(codes.shape), pi)

    def round_trip(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        """What a dequantize-on-read pool gives back for ``x``, in ``x``'s dtype."""
        pi = self.rotation(x.device) if pi is None else pi
        return self.dequantize(*self.quantize(x, pi), pi).to(x.dtype)


def hadamard_int(
    bits: int, head_dim: int = 128, group: int | None = None, seed: int = 0
) -> HadamardInt:
    return HadamardInt(head_dim=head_dim, bits=bits, group=group, seed=seed)


@dataclasses.dataclass(frozen=True)
class KIVI:
    """KIVI (Liu et al., ICML 2024): per-channel keys over groups of ``group_tokens``
    tokens, per-token values (groups of ``value_group`` coordinates, None: the whole
    vector), asymmetric RTN with fp16 scale and zero, and a full-precision residual of
    the most recent tokens: group j (positions jG..jG+G−1) is quantized once the
    sequence holds jG + ``residual`` tokens (residual a multiple of G, default G: only
    the incomplete group stays exact)."""

    head_dim: int
    k_bits: int = 4
    v_bits: int = 4
    group_tokens: int = KIVI_GROUP_TOKENS
    value_group: int | None = None
    residual: int | None = None

    def __post_init__(self) -> None:
        _check_bits(self.k_bits, "kivi keys")
        _check_bits(self.v_bits, "kivi values")
        if self.group_tokens < 1:
            raise ValueError(f"kivi group_tokens must be positive, got {self.group_tokens}.")
        if self.residual_tokens % self.group_tokens:
            raise ValueError(
                f"kivi residual {self.residual} must be a multiple of group_tokens "
                f"{self.group_tokens}; round it to whole groups."
            )
        _check_group(self.head_dim, self.value_group, self.value_group_size, "kivi value_group")

    @property
    def residual_tokens(self) -> int:
        return self.group_tokens if self.residual is None else self.residual

    @property
    def value_group_size(self) -> int:
        return self.value_group or self.head_dim

    @property
    def key_bytes_per_token(self) -> float:
        return self.head_dim * self.k_bits / 8 + self.head_dim * 2 * FP16_BYTES / self.group_tokens

    @property
    def value_bytes_per_token(self) -> float:
        return (
            self.head_dim * self.v_bits / 8
            + (self.head_dim // self.value_group_size) * 2 * FP16_BYTES
        )

    def quantized_groups(self, seq_len: int) -> int:
        """How many leading groups a sequence of ``seq_len`` tokens holds quantized."""
        if seq_len < self.residual_tokens:
            return 0
        return (seq_len - self.residual_tokens) // self.group_tokens + 1

    def quantize_keys(self, k: torch.Tensor):
        """k [..., G, H, D] (one group of G tokens) → (codes, scale, zero), scale and zero
        [..., 1, H, D]: one pair per channel of each head, shared by the group's tokens."""
        return quantize_minmax(k, self.k_bits, -3)

    def quantize_values(self, v: torch.Tensor):
        """v [..., D] → (codes [..., D/g, g], scale, zero [..., D/g, 1]), per token."""
        g = self.value_group or v.shape[-1]
        return quantize_minmax(v.reshape(*v.shape[:-1], -1, g), self.v_bits, -1)

    def round_trip_groups(self, k: torch.Tensor, v: torch.Tensor):
        """Complete groups k, v [..., G, H, D] → their round trips, in the inputs' dtypes."""
        return self._key_groups(k), self._value_groups(v)

    def _key_groups(self, k: torch.Tensor) -> torch.Tensor:
        return dequantize_minmax(*self.quantize_keys(k)).to(k.dtype)

    def _value_groups(self, v: torch.Tensor) -> torch.Tensor:
        return dequantize_minmax(*self.quantize_values(v)).reshape(v.shape).to(v.dtype)

    def _sequence(self, x: torch.Tensor, groups_fn) -> torch.Tensor:
        n = self.quantized_groups(x.shape[-3]) * self.group_tokens
        if n == 0:
            return x.clone()
        lead, rest = x.shape[:-3], x.shape[-2:]
        done = groups_fn(
            x[..., :n, :, :].reshape(*lead, n // self.group_tokens, self.group_tokens, *rest)
        )
        return torch.cat([done.reshape(*lead, n, *rest), x[..., n:, :, :]], dim=-3)

    def round_trip_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Keys [..., T, H, D] of positions 0..T−1 as the KIVI cache holds them after T
        tokens: complete groups round-tripped per channel, the residual exact."""
        return self._sequence(k, self._key_groups)

    def round_trip_values(self, v: torch.Tensor) -> torch.Tensor:
        """Values [..., T, H, D] likewise: complete groups per token, the residual exact."""
        return self._sequence(v, self._value_groups)

    def round_trip(self, k: torch.Tensor, v: torch.Tensor):
        """A whole sequence k, v [..., T, H, D] (positions 0..T−1) → what the cache holds."""
        return self.round_trip_keys(k), self.round_trip_values(v)


def kivi(
    bits: int,
    head_dim: int = 128,
    group_tokens: int = KIVI_GROUP_TOKENS,
    residual: int | None = None,
    value_group: int | None = None,
    v_bits: int | None = None,
) -> KIVI:
    return KIVI(
        head_dim=head_dim,
        k_bits=bits,
        v_bits=bits if v_bits is None else v_bits,
        group_tokens=group_tokens,
        value_group=value_group,
        residual=residual,
    )


def bytes_per_token_per_head(fmt: str, head_dim: int, k_bits: int, v_bits: int) -> float:
    """K + V bytes per token per KV head of ``fmt`` ('turboquant', 'hadamard', 'kivi') in its
    default grouping, as a packed pool would store it (the module docstring's table)."""
    if fmt == "turboquant":
        return head_dim * (k_bits + v_bits) / 8 + 2 * FP16_BYTES
    if fmt == "hadamard":
        return (
            HadamardInt(head_dim, k_bits).bytes_per_vector
            + HadamardInt(head_dim, v_bits).bytes_per_vector
        )
    if fmt == "kivi":
        q = KIVI(head_dim, k_bits, v_bits)
        return q.key_bytes_per_token + q.value_bytes_per_token
    raise ValueError(f"unknown format {fmt!r}; use turboquant, hadamard or kivi.")

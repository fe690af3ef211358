"""The one configuration object of sglang-tq.

``TQConfig`` is frozen and validates itself on construction, so every layer
(quantizer, pool, kernels, server flags) can trust it. Bit widths follow the
paper's notation: ``k_bits``/``v_bits`` are bits per coordinate of the stored
code. With ``key_variant="prod"`` the key code is TurboQuant_prod (paper Alg. 2):
``k_bits − 1`` bits of MSE code plus a 1-bit QJL sign sketch of the residual.
"""

from __future__ import annotations

import dataclasses
import re

CONFIG_BITS = (2, 3, 4)
KEY_VARIANTS = ("mse", "prod")
NORM_BYTES = 2  # one fp16 norm per vector
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class TQConfig:
    head_dim: int
    k_bits: int = 4
    v_bits: int = 4
    seed: int = 0
    key_variant: str = "mse"
    bf16_layers: tuple[int, ...] = ()
    key_centers: str | None = (
        None  # 'auto', a key centers file (sglang_tq/format/centers.py), or None
    )

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 8:
            raise ValueError(f"head_dim must be a positive multiple of 8, got {self.head_dim!r}.")
        for name in ("k_bits", "v_bits"):
            value = getattr(self, name)
            if value not in CONFIG_BITS:
                raise ValueError(f"{name} must be one of {CONFIG_BITS}, got {value!r}.")
        if self.key_variant not in KEY_VARIANTS:
            raise ValueError(
                f"key_variant must be one of {KEY_VARIANTS}, got {self.key_variant!r}."
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        layers = tuple(self.bf16_layers)
        if any(not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(
                f"bf16_layers must be non-negative layer indices, got {self.bf16_layers!r}."
            )
        object.__setattr__(self, "bf16_layers", tuple(sorted(set(layers))))

    @property
    def key_bytes(self) -> int:
        """Packed key bytes per token per KV head, norms included."""
        extra = NORM_BYTES if self.key_variant == "prod" else 0
        return self.head_dim * self.k_bits // 8 + NORM_BYTES + extra

    @property
    def value_bytes(self) -> int:
        """Packed value bytes per token per KV head, norm included."""
        return self.head_dim * self.v_bits // 8 + NORM_BYTES

    @property
    def bytes_per_token_per_head(self) -> int:
        return self.key_bytes + self.value_bytes

    @property
    def bits_name(self) -> str:
        return f"k{self.k_bits}v{self.v_bits}"

    @staticmethod
    def parse_bits(spec: str) -> tuple[int, int]:
        """``"k4v3"`` → (4, 3); raises ``ValueError`` naming the accepted form."""
        m = re.fullmatch(r"k(\d)v(\d)", str(spec).strip().lower())
        if not m or int(m[1]) not in CONFIG_BITS or int(m[2]) not in CONFIG_BITS:
            raise ValueError(
                f"kv-quant bits must look like k4v4, k4v3, k3v3 or k4v2 (each digit in "
                f"{CONFIG_BITS}), got {spec!r}."
            )
        return int(m[1]), int(m[2])

    @staticmethod
    def parse_bits_list(text: str) -> list[tuple[str, int, int]]:
        """``"k4v4, k3v3"`` → [("k4v4", 4, 4), ("k3v3", 3, 3)] (empty items skipped), each by
        :meth:`parse_bits`; the scripts' ``--kv`` lists."""
        out = []
        for spec in str(text).split(","):
            if spec.strip():
                kb, vb = TQConfig.parse_bits(spec)
                out.append((f"k{kb}v{vb}", kb, vb))
        return out

    def is_bf16_layer(self, layer_id: int) -> bool:
        return layer_id in self.bf16_layers

    def layer_seed(self, layer_id: int) -> int:
        """Rotation seed of global layer ``layer_id``, a SplitMix64 mix of ``seed`` and the id.

        Every tensor-parallel rank derives the same seed for a layer, so all ranks
        draw the same Π; neighbouring layers get unrelated rotations.
        """
        if not isinstance(layer_id, int) or layer_id < 0:
            raise ValueError(f"layer_id must be a non-negative integer, got {layer_id!r}.")
        x = (self.seed * 0x9E3779B97F4A7C15 + layer_id + 1) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (x ^ (x >> 31)) >> 1

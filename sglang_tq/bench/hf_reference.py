"""The Hugging Face side of the accuracy tools: each KV pool format as a round trip on
transformers tensors, a cache that stores through it, and reference log-probabilities.

Shared by ``python -m sglang_tq.bench fidelity-ref`` (greedy decode through the cache),
``attn-error`` (attention rows over round-tripped keys) and ``fidelity --check-hf`` (the
HF model's full log-softmax, against which SGLang's bf16 logprobs are checked). torch and
transformers are imported inside the functions, so importing this module stays cheap.

Config names (`parse_config`): ``fp8`` (float8_e4m3fn and back, SGLang's ``--kv-cache-dtype
fp8_e4m3`` pool without scales); ``kKvV`` with each side 2/3/4 (TurboQuant at that many
bits: ``TurboQuantizer(head_dim, bits, seed=TQConfig.layer_seed(layer))``, exactly the codes
and norms the pool's store kernel writes), 8 (fp8 e4m3) or 16 (stored unquantized);
``-prod`` (TurboQuant_prod keys, paper Alg. 2); ``-c`` (keys centered by a key-centers
file, stored as Q(k − μ) and read as Q(k − μ) + μ); ``hqB`` / ``kiviB`` (the prior-art
baselines of ``sglang_tq.format.priorart`` at B bits). ``bf16`` is the unquantized reference.
"""

from __future__ import annotations

import re
from pathlib import Path

from sglang_tq.bench.results import write_doc

_CONFIG_RE = re.compile(r"k(2|3|4|8|16)v(2|3|4|8|16)(-prod)?(-c)?")
_PRIOR_ART_RE = re.compile(r"(hq|kivi)([2-4])")
_PRIOR_ART = {"hq": "hadamard", "kivi": "kivi"}
_ALIASES = {"fp8": "k8v8"}


def parse_config(name: str) -> tuple[int, int, str, bool]:
    """'k4v4' -> (4, 4, 'mse', False); 'k4v4-prod' -> (4, 4, 'prod', False);
    'k4v4-c' -> (4, 4, 'mse', True); 'fp8' -> (8, 8, 'mse', False);
    'hq4' -> (4, 4, 'hadamard', False); 'kivi2' -> (2, 2, 'kivi', False).

    Each side: 2/3/4 = TurboQuant at that many bits, 8 = fp8 e4m3 (SGLang's fp8 pool),
    16 = stored unquantized; '-prod' = TurboQuant_prod keys (paper Alg. 2); '-c' = keys
    centered by the --key-centers file; hqB / kiviB = the prior-art baselines at B bits."""
    c = name.strip().lower()
    p = _PRIOR_ART_RE.fullmatch(c)
    if p:
        return int(p[2]), int(p[2]), _PRIOR_ART[p[1]], False
    m = _CONFIG_RE.fullmatch(_ALIASES.get(c, c))
    if c == "bf16" or not m or ((m[3] or m[4]) and int(m[1]) not in (2, 3, 4)):
        raise ValueError(
            f"unknown config {name!r}: use fp8 or kKvV with each of K, V in 2/3/4 (TurboQuant "
            f"bits), 8 (fp8 e4m3) or 16 (unquantized), such as k4v4, k8v4, k16v4, k4v4-prod, "
            f"k4v4-c (-prod and -c need TurboQuant keys), or hqB / kiviB (B in 2/3/4)"
        )
    return int(m[1]), int(m[2]), "prod" if m[3] else "mse", bool(m[4])


def parse_configs(spec: str) -> list[str]:
    """'fp8,k4v4' -> ['bf16', 'fp8', 'k4v4']: bf16 first (reference), no duplicates."""
    names = ["bf16"]
    for c in (x.strip().lower() for x in spec.split(",")):
        if not c or c in names:
            continue
        parse_config(c)
        names.append(c)
    return names


def round_trip_fns(config: str, layer_id: int, head_dim: int, seed: int = 0, center=None):
    """(k_fn, v_fn): what the KV pool of `config` gives back for a stored K / V [B, H, T, D].

    center: this layer's key centers [H, D] (``sglang_tq.format.centers``), used by '-c'
    configs: their TurboQuant keys are stored as Q(k − μ), which attention reads as
    Q(k − μ) + μ (the same softmax: every key of a head moves by the same μ)."""
    import torch

    from sglang_tq.config import TQConfig
    from sglang_tq.format.quantizer import TurboQuantizer

    if config == "bf16":
        k_bits, v_bits, variant, centered = 16, 16, "mse", False
    else:
        k_bits, v_bits, variant, centered = parse_config(config)
    if centered and center is None:
        raise ValueError(f"config {config!r} centers keys: give --key-centers")
    layer_seed = TQConfig(head_dim=head_dim, seed=seed).layer_seed(layer_id)
    if variant in ("hadamard", "kivi"):
        return _prior_art_fns(variant, k_bits, v_bits, head_dim, layer_seed)

    def make(bits: int, var: str):
        if bits == 16:
            return lambda x: x
        if bits == 8:
            return lambda x: x.to(torch.float8_e4m3fn).to(x.dtype)
        q = TurboQuantizer(head_dim, bits, seed=layer_seed, variant=var)
        return lambda x: q.dequantize(*q.quantize(x.float())).to(x.dtype)

    k_fn = make(k_bits, variant)
    if centered:
        mu = center.float()[None, :, None, :]
        plain = k_fn
        k_fn = lambda x: (plain(x.float() - mu.to(x.device)) + mu.to(x.device)).to(x.dtype)  # noqa: E731
    return k_fn, make(v_bits, "mse")


def _prior_art_fns(variant: str, k_bits: int, v_bits: int, head_dim: int, layer_seed: int):
    """(k_fn, v_fn) of a prior-art format on [B, H, T, D]: hadamard per vector (the engine's
    per-layer signs); kivi over the whole sequence, T holding positions 0..T−1."""
    from sglang_tq.format.priorart import KIVI, HadamardInt

    if variant == "hadamard":
        kq = HadamardInt(head_dim, k_bits, seed=layer_seed)
        vq = HadamardInt(head_dim, v_bits, seed=layer_seed)
        return kq.round_trip, vq.round_trip
    q = KIVI(head_dim, k_bits, v_bits)
    return (
        lambda x: q.round_trip_keys(x.transpose(-3, -2)).transpose(-3, -2),
        lambda x: q.round_trip_values(x.transpose(-3, -2)).transpose(-3, -2),
    )


def make_cache(config: str, num_layers: int, head_dim: int, seed: int = 0, centers=None):
    """A transformers Cache whose layers store K/V as the `config` pool would."""
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    if config != "bf16" and parse_config(config)[2] == "kivi":
        raise ValueError(
            f"config {config!r} quantizes keys over 32-token groups, which this "
            f"step-by-step cache cannot see; measure it with python -m sglang_tq.bench "
            f"attn-error or in the engine (python -m sglang_tq.bench eval --configs {config})."
        )

    class RoundTripLayer(DynamicLayer):
        """DynamicLayer that stores round-tripped K/V; a multi-token step attends its own
        tokens unquantized (SGLang extend), a one-token step reads everything stored."""

        def __init__(self, k_fn, v_fn):
            super().__init__()
            self.k_fn, self.v_fn = k_fn, v_fn

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old_k, old_v = self.keys, self.values
            self.keys = torch.cat([old_k, self.k_fn(key_states)], dim=-2)
            self.values = torch.cat([old_v, self.v_fn(value_states)], dim=-2)
            if key_states.shape[-2] == 1:
                return self.keys, self.values
            return torch.cat([old_k, key_states], dim=-2), torch.cat([old_v, value_states], dim=-2)

    layers = [
        RoundTripLayer(
            *round_trip_fns(config, i, head_dim, seed, None if centers is None else centers[i])
        )
        for i in range(num_layers)
    ]
    return Cache(layers=layers)


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
}


def load_model(model_path: str, dtype: str = "float32", device: str = "cpu"):
    """The HF causal LM of ``model_path`` in ``dtype`` (a name of _DTYPES), on ``device``,
    in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dt = getattr(torch, _DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dt).to(device).eval()


def full_logprobs(model_path: str, seqs, dtypes: list[str], device: str | None) -> dict:
    """Full log-softmax of the HF model at every position of each sequence, per dtype:
    {dtype: {"device": ..., "logprobs": [float32 numpy [len, V] per sequence]}}."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name in dtypes:
        model = load_model(model_path, name, device)
        res = []
        with torch.no_grad():
            for s in seqs:
                ids = torch.tensor([s], device=device)
                logits = model(ids).logits[0].float()
                res.append(torch.log_softmax(logits, -1).cpu().numpy())
        out[name] = {"device": device, "logprobs": res}
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def write_result(path: str | Path, tool: str, args, prov: dict, **fields) -> None:
    """Write the result of fidelity-ref or attn-error to ``path`` through the package's one
    results writer (provenance, tool, argv; a non-finite value such as fidelity-ref's
    ``k4v4_over_fp8`` where fp8 has no top-1 disagreement is written as null) and say so."""
    write_doc(path, tool, args.argv, prov, **fields)
    print(f"wrote {path}")

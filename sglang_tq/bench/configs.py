"""KV-cache config labels and the SGLang server flags each one stands for.

One table for every benchmark, so that a label such as ``k4v4`` means the same server
in a load test, a fidelity run and an accuracy evaluation:

    bf16          (no flag)                                SGLang's default attention backend
    fp8           --kv-cache-dtype fp8_e4m3                the same backend, fp8 KV
    bf16-triton   --attention-backend triton               SGLang's Triton backend
    fp8-triton    --attention-backend triton --kv-cache-dtype fp8_e4m3
    bf16-fa3      --attention-backend fa3                  FA3 named explicitly
    fp8-fa3       --attention-backend fa3 --kv-cache-dtype fp8_e4m3
    kXvY          --kv-quant turboquant --kv-quant-bits kXvY   (X, Y in 2..4: k4v4, k3v3, k4v2, ...)
                  with the default key centers (auto: from the k_proj bias where there is one)
    kXvY-nc       the same with --kv-quant-key-centers none (keys quantized uncentered)
    kXvY[-nc]-b   the same with --kv-quant-bf16-layers 0,L-1: the first and last of the
                  model's L layers in bf16 (boundary layers; needs the model's config.json)
    kXvY-allb     the same with every layer in bf16: the plugin, its pool and backend with
                  no packed layer, a control run (e.g. is a slower GEMM the plugin's presence
                  or the packed kernels before it?)
    hqB           --kv-quant hadamard --kv-quant-bits kBvB     (B in 2..4: hq4, hq3, hq2)
                  QuaRot-style Hadamard + per-token asymmetric B-bit int, one fp16 scale and
                  zero per head vector; SGLang's default backend
    hqB-c         the same with --kv-quant-key-centers bias: keys centered by TurboQuant's
                  auto centers (the k_proj bias) before the rotation (prior art + our fix)
    kiviB         --kv-quant kivi --kv-quant-bits kBvB --disable-radix-cache   (kivi4, kivi2, ...)
                  KIVI: keys per channel in 32-token groups, values per token, the incomplete
                  group exact; SGLang's default backend

``hqB`` and ``kiviB`` are prior-art baselines (``sglang_tq.format.priorart``) *simulated* in SGLang's
bf16 pool (``sglang_tq.serving.simulated``): every stored K/V is its quantize-dequantize round trip,
read by SGLang's own attention kernels (the reference path; no fused kernel), so they
measure accuracy and leave the pool at bf16 size. KIVI's token groups must not be split by
a radix-cache hit, hence ``--disable-radix-cache``.

``bf16`` and ``fp8`` name no ``--attention-backend``, so SGLang picks its default for the
GPU at hand (fa3 on Hopper). Every subcommand that starts servers (load, smoke, soak,
fidelity, radix, eval) reads its flags from here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

BASELINE = "bf16"
KV_ORDER = ("bf16", "fp8", "bf16-triton", "fp8-triton", "bf16-fa3", "fp8-fa3", "k4v4", "k3v3")
TQ_RE = re.compile(r"^k[2-4]v[2-4](-nc)?(-b|-allb)?$")
PRIOR_ART_RE = re.compile(r"^(?:(hq)([2-4])(-c)?|(kivi)([2-4]))$")
_PRIOR_ART_FLAGS = {"hq": ["--kv-quant", "hadamard"], "kivi": ["--kv-quant", "kivi"]}
_PRIOR_ART_EXTRA = {"hq": [], "kivi": ["--disable-radix-cache"]}
_DTYPE_FLAGS = {"bf16": [], "fp8": ["--kv-cache-dtype", "fp8_e4m3"]}
_NAMED_BACKENDS = ("triton", "fa3")


def model_num_layers(model_path: str | Path) -> int:
    """``num_hidden_layers`` of a model folder's config.json (or of its text_config)."""
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot read the layer count from {path} ({exc}); boundary-layer labels "
            f"(kXvY-b) need a local model folder with a config.json"
        ) from None
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(n, int) or n < 2:
        raise ValueError(
            f"{path} gives no num_hidden_layers of at least 2 (got {n!r}); boundary-"
            f"layer labels (kXvY-b) need one"
        )
    return n


def kv_server_flags(kv: str, model_path: str | Path | None = None) -> list[str]:
    """Server flags of one KV config label; ValueError (one sentence) for an unknown label.
    ``model_path``: the model folder, read for its layer count by the ``-b`` labels only."""
    name, _, backend = kv.partition("-")
    if name in _DTYPE_FLAGS and backend == "":
        return list(_DTYPE_FLAGS[name])
    if name in _DTYPE_FLAGS and backend in _NAMED_BACKENDS:
        return ["--attention-backend", backend, *_DTYPE_FLAGS[name]]
    if TQ_RE.match(kv):
        bits, *suffixes = kv.split("-")
        flags = [
            "--kv-quant",
            "turboquant",
            "--kv-quant-bits",
            bits,
            *(["--kv-quant-key-centers", "none"] if "nc" in suffixes else []),
        ]
        if "b" in suffixes or "allb" in suffixes:
            if model_path is None:
                raise ValueError(
                    f"{kv} keeps layers of the model in bf16 by position, so it "
                    f"needs the model folder to count its layers"
                )
            n = model_num_layers(model_path)
            layers = range(n) if "allb" in suffixes else (0, n - 1)
            flags += ["--kv-quant-bf16-layers", ",".join(str(i) for i in layers)]
        return flags
    m = PRIOR_ART_RE.match(kv)
    if m:
        fmt, bits = m[1] or m[4], m[2] or m[5]
        return [
            *_PRIOR_ART_FLAGS[fmt],
            "--kv-quant-bits",
            f"k{bits}v{bits}",
            *_PRIOR_ART_EXTRA[fmt],
            *(["--kv-quant-key-centers", "bias"] if m[3] else []),
        ]
    raise ValueError(
        f"unknown KV config {kv!r}: use bf16, fp8 (SGLang's default backend), "
        f"bf16-triton, fp8-triton, bf16-fa3, fp8-fa3, kXvY (e.g. k4v4, k3v3), "
        f"kXvY-nc (uncentered keys), kXvY-b or kXvY-nc-b (bf16 first and last "
        f"layer), kXvY-allb (every layer bf16, a control), hqB, hqB-c (centered keys) or kiviB (B in 2..4, prior-art baselines)"
    )


def expected_backend(kv: str) -> str | None:
    """The attention backend a label's flags name, or None where SGLang chooses."""
    if TQ_RE.match(kv):
        return "turboquant"
    flags = kv_server_flags(kv)
    return flags[flags.index("--attention-backend") + 1] if "--attention-backend" in flags else None


def kv_sort_key(kv: str) -> tuple:
    return (KV_ORDER.index(kv) if kv in KV_ORDER else len(KV_ORDER), kv)


def parse_config_list(text: str, model_path: str | Path | None = None) -> list[str]:
    """Comma-separated labels, each checked (a ``-b`` label against ``model_path`` when
    given, else by name only); duplicates dropped, order kept."""
    out: list[str] = []
    for kv in (c.strip() for c in text.split(",")):
        if kv and kv not in out:
            if model_path is not None or not (TQ_RE.match(kv) and kv.endswith(("-b", "-allb"))):
                kv_server_flags(kv, model_path)
            out.append(kv)
    if not out:
        raise ValueError("no KV config given: name at least one, e.g. --configs bf16,k4v4")
    return out


def check_extra_server_args(extra: str | None, refused: tuple[str, ...]) -> list[str]:
    """shlex-split extra server arguments, refusing any flag in ``refused`` (flags the
    configs or the benchmark itself set, which an extra argument would silently override)."""
    toks = shlex.split(extra or "")
    for t in toks:
        name = t.split("=", 1)[0]
        if name in refused:
            raise ValueError(
                f"--extra-server-args may not contain {name}: the benchmark sets it "
                f"itself (the config labels own the KV dtype and attention backend)"
            )
    return toks

"""The one module where sglang-tq touches SGLang: named patches through SGLang's own hooks.

SGLang 0.5.17 loads ``sglang.srt.plugins`` entry points in every process (launcher,
scheduler, ``Engine``) and then applies the hooks registered in ``HookRegistry``.
:func:`install` (called by the entry point ``sglang_tq.serving.plugin:register``) checks the
pinned SGLang version, registers the ``turboquant`` attention backend, and
registers the patches listed in :data:`PATCHES`, each with a name:

* ``cli-flags``, ``cli-to-init``, ``init-options``: the ``--kv-quant*`` flags, carried
  from argparse (or ``Engine(**kwargs)``) onto ``ServerArgs`` as plain attributes,
  which survive pickling into the scheduler;
* ``validate``: start-up refusals (:mod:`sglang_tq.serving.refusals`);
* ``cell-size``, ``build-pool``, ``pool-guard``: size and build the packed pool
  (:mod:`sglang_tq.serving.pool`) instead of SGLang's MHA pool, and refuse to start if any
  other pool was built;
* ``scratch-budget``: the prefill scratch comes out of the KV budget;
* ``build-mla-pool`` (with ``cell-size``'s MLA branch): an MLA model's latent pool
  (:mod:`sglang_tq.serving.mla_pool`) instead of SGLang's ``MLATokenToKVPool``; MLA models are
  still refused at launch until the backend's MLA path lands (notes/mla-design.md);
* ``build-hybrid-linear-pool`` (Qwen3-Next), ``swa-cell-size``, ``swa-scratch-budget``,
  ``swa-cap-scratch-budget``, ``build-hybrid-swa-pool`` (gpt-oss): SGLang's hybrid pools
  sized by packed bytes and built around packed inner pools; ``model-adjustments`` and
  ``backend-name-for-model-checks``: SGLang's per-model server-args checks see our
  backend as the Triton backend it derives from (gpt-oss names the backends it accepts);
* ``no-fused-set-kv``: SGLang's fused rotary+set-KV path writes bf16 straight into
  pool buffers, so it is switched off for our pool and the hybrid pools around it;
* ``input-ids-range``: token ids outside the vocabulary answered with HTTP 400;
* ``server-info``: the ``kv_quant*`` settings in ``/get_server_info``;
* ``kivi-groups``: after each forward of a ``--kv-quant kivi`` server, re-quantize the
  KIVI key/value groups that forward completed (:mod:`sglang_tq.serving.simulated`).

``--kv-quant hadamard`` and ``--kv-quant kivi`` are prior-art baselines (QuaRot-style
Hadamard + int, KIVI; :mod:`sglang_tq.format.priorart`) *simulated* in SGLang's own bf16 pool:
``build-pool`` builds :class:`~sglang_tq.serving.simulated.SimulatedKVPool`, an
``MHATokenToKVPool`` of the stock size whose stored K/V are round trips of the format,
and SGLang keeps choosing its attention backend. They measure accuracy, save no memory,
and ``cell-size`` leaves their pool size stock.

With ``--kv-quant none`` (the default) every patch calls straight through to the
original with untouched arguments and returns its result: stock behaviour.
``HookRegistry`` swallows exceptions while applying hooks, so
:func:`verify_patches_applied` runs before our pool is built and refuses to start
with a half-installed plugin. Nothing needs a source patch (``sglang_tq/patches/series`` is
empty); what hooks cannot reach is listed in notes/sglang-0.5.17-integration.md §9.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from ..config import TQConfig
from . import refusals

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.17"
BACKEND_NAME = refusals.BACKEND_NAME
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
# ServerArgs attribute → default; also the ServerArgs(**kwargs) names Engine accepts.
OPTION_DEFAULTS = {
    "kv_quant": "none",
    "kv_quant_bits": "k4v4",
    "kv_quant_seed": 0,
    "kv_quant_bf16_layers": (),
    "kv_quant_packed_prefill": False,
    "kv_quant_key_centers": "auto",
}
AUTO_CENTERS = "auto"
BIAS_CENTERS = "bias"  # the k_proj-bias centers, asked for by name (refused without a bias)

# The pool class sglang-tq built in this process (TQTokenToKVPool or SimulatedKVPool), read
# by the fused set-KV patch: both need every K/V write to go through their set_kv_buffer.
_packed_pool_class: type | None = None
# Values parsed by argparse, handed from from_cli_args to the __init__ it calls.
_CLI_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "sglang_tq_cli_options", default=None
)


# --------------------------------------------------------------------------- options
def parse_bf16_layers(spec: Any) -> tuple[int, ...]:
    """``"0,31"`` / ``[0, 31]`` / ``""`` / ``"none"`` → sorted unique layer ids."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        layers = {int(str(p).strip()) for p in parts}
    except ValueError:
        layers = {-1}
    if any(i < 0 for i in layers):
        raise ValueError(
            f"--kv-quant-bf16-layers takes comma-separated non-negative layer ids such as 0,31 "
            f"(or none), got {spec!r}."
        )
    return tuple(sorted(layers))


def parse_key_centers(spec: Any) -> str | None:
    """``auto`` (centers from the model's k_proj bias where it has one, see
    ``_resolve_key_centers``), ``bias`` (the same, refused for a model without a bias), a
    key centers file path (checked to exist; its shape is checked against the model when the
    pool is built), or None (``none``: keys quantized uncentered)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, str) and spec.strip().lower() in (AUTO_CENTERS, BIAS_CENTERS):
        return spec.strip().lower()
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ValueError(
            f"--kv-quant-key-centers {str(spec)!r} is not a file; create one with "
            f"`python -m sglang_tq.tools.key_centers --model-path <model> --out {spec}`, "
            f"or give auto, bias or none."
        )
    return str(path.resolve())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_switch(value: Any, flag: str) -> bool:
    """A bool option given as a bool, 0/1 or a word (Engine(**kwargs) passes what the user
    wrote): ``"false"`` is False, not ``bool("false")``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{flag} is a switch: give True or False, got {value!r}.")


def parse_seed(spec: Any) -> int:
    """A non-negative integer seed (argparse hands a string)."""
    try:
        seed = int(spec) if isinstance(spec, str) else spec
    except ValueError:
        seed = None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--kv-quant-seed must be a non-negative integer, got {spec!r}.")
    return seed


def normalize_options(given: dict) -> dict:
    """Validated ``kv_quant*`` options with defaults filled in; raises ``ValueError``."""
    unknown = set(given) - set(OPTION_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown sglang-tq options {sorted(unknown)}; expected {list(OPTION_DEFAULTS)}."
        )
    opts = {**OPTION_DEFAULTS, **given}
    mode = str(opts["kv_quant"]).strip().lower()
    if mode not in refusals.KV_QUANT_CHOICES:
        raise ValueError(
            f"--kv-quant must be one of {refusals.KV_QUANT_CHOICES}, got {opts['kv_quant']!r}."
        )
    if mode in refusals.SIMULATED_MODES:
        # hadamard takes key centers by name (bias or FILE; its default stays QuaRot's
        # uncentered keys), kivi none: its per-channel key scales already absorb them
        lacks = {"kv_quant_packed_prefill": "packed prefill"}
        if mode != "hadamard":
            lacks["kv_quant_key_centers"] = "key centers"
        tq_only = [k for k in lacks if opts[k] != OPTION_DEFAULTS[k]]
        if tq_only:
            flags = ", ".join("--" + k.replace("_", "-") for k in tq_only)
            raise ValueError(
                f"the options {flags} need --kv-quant turboquant (--kv-quant {mode} "
                f"has no {' and no '.join(lacks.values())}); drop them."
            )
    k_bits, v_bits = TQConfig.parse_bits(opts["kv_quant_bits"])
    seed = opts["kv_quant_seed"]
    if isinstance(seed, str):  # Engine(kv_quant_seed="3") is as good as the flag
        seed = parse_seed(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--kv-quant-seed must be a non-negative integer, got {seed!r}.")
    normalized = {
        "kv_quant": mode,
        "kv_quant_bits": f"k{k_bits}v{v_bits}",
        "kv_quant_seed": seed,
        "kv_quant_bf16_layers": parse_bf16_layers(opts["kv_quant_bf16_layers"]),
        "kv_quant_packed_prefill": parse_switch(
            opts["kv_quant_packed_prefill"], "--kv-quant-packed-prefill"
        ),
        "kv_quant_key_centers": parse_key_centers(opts["kv_quant_key_centers"]),
    }
    if mode == "none":
        changed = [
            k for k in OPTION_DEFAULTS if k != "kv_quant" and normalized[k] != OPTION_DEFAULTS[k]
        ]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(
                f"the options {flags} need --kv-quant turboquant; add it or drop them."
            )
    if mode in refusals.SIMULATED_MODES and normalized["kv_quant_key_centers"] == AUTO_CENTERS:
        normalized["kv_quant_key_centers"] = None
    return normalized


def kv_quant_enabled(server_args: Any) -> bool:
    return getattr(server_args, "kv_quant", "none") == "turboquant"


def simulated_mode(server_args: Any) -> str | None:
    """'hadamard' / 'kivi' for a prior-art format simulated in the bf16 pool, else None."""
    mode = getattr(server_args, "kv_quant", "none")
    return mode if mode in refusals.SIMULATED_MODES else None


def tq_config(server_args: Any, head_dim: int) -> TQConfig:
    """The TQConfig a server runs with (bf16 layer ids are global layer ids)."""
    k_bits, v_bits = TQConfig.parse_bits(server_args.kv_quant_bits)
    return TQConfig(
        head_dim=head_dim,
        k_bits=k_bits,
        v_bits=v_bits,
        seed=server_args.kv_quant_seed,
        bf16_layers=tuple(server_args.kv_quant_bf16_layers),
        key_centers=getattr(server_args, "kv_quant_key_centers", None),
    )


def _argparse_type(parse: Callable) -> Callable:
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _bits(text: str) -> str:
    return "k{}v{}".format(*TQConfig.parse_bits(text))


# ----------------------------------------------------------------------------- hooks
def _add_cli_args(result, parser: argparse.ArgumentParser):
    if any("--kv-quant" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group(
        "TurboQuant KV cache (sglang-tq)",
        "Store the KV cache as packed 2-4-bit TurboQuant codes and decode from them with "
        "fused Triton kernels.",
    )
    group.add_argument(
        "--kv-quant",
        choices=refusals.KV_QUANT_CHOICES,
        default="none",
        help="KV-cache quantization. 'turboquant' stores K and V as rotated Lloyd-Max codes "
        "plus one fp16 norm per token and head (3.88x the tokens of bf16 at k4v4, head_dim 128) "
        "and selects the turboquant attention backend; 'hadamard' (QuaRot-style Hadamard + "
        "per-token int) and 'kivi' (per-channel keys in 32-token groups, per-token values) "
        "are prior-art baselines simulated in SGLang's bf16 pool with SGLang's backend: "
        "accuracy only, no memory saving; 'none' is stock SGLang. Default: none.",
    )
    group.add_argument(
        "--kv-quant-bits",
        type=_argparse_type(_bits),
        default="k4v4",
        metavar="kKvV",
        help="Bits per coordinate for keys and values, e.g. k4v4, k4v3, k3v3, k4v2 "
        "(each digit 2, 3 or 4), for every --kv-quant mode. Default: k4v4.",
    )
    group.add_argument(
        "--kv-quant-seed",
        type=_argparse_type(parse_seed),
        default=0,
        metavar="SEED",
        help="Seed of the random rotations; each layer derives its own from it and its layer "
        "id, identically on every tensor-parallel rank. Default: 0.",
    )
    group.add_argument(
        "--kv-quant-bf16-layers",
        type=_argparse_type(parse_bf16_layers),
        default=(),
        metavar="IDS",
        help="Comma-separated layer ids whose KV stays in plain bf16 (e.g. 0,31 for the "
        "boundary layers), or 'none'. Default: none.",
    )
    group.add_argument(
        "--kv-quant-packed-prefill",
        action="store_true",
        default=False,
        help="Make prefill attend to the chunk's own K/V read back from the packed cache "
        "rather than its bf16 values, so a cold prefill sees exactly what a later radix-"
        "cache hit sees. Default: off.",
    )
    group.add_argument(
        "--kv-quant-key-centers",
        type=_argparse_type(parse_key_centers),
        default=AUTO_CENTERS,
        metavar="auto|bias|none|FILE",
        help="Key centers mu per layer and KV head: keys are quantized as k - mu, which leaves "
        "attention unchanged and cuts the key error of models whose keys share a large "
        "common part. 'auto' (default) derives mu from the model's k_proj bias (Qwen2 "
        "and kin; RoPE-averaged, computed at start-up) and centers nothing for models "
        "without one; 'bias' is the same but refused for a model without a bias; FILE "
        "is a safetensors file from python -m sglang_tq.tools.key_centers (a calibration mean, also for "
        "bias-free models); 'none' turns centering off. Centered keys are refused for "
        "models with a logit soft-cap. With --kv-quant hadamard the default is QuaRot's "
        "uncentered keys, and bias or FILE centers them the same way.",
    )


# Set while SGLang's model-specific server-args adjustments run (gpt-oss asserts that its
# attention backend is one it knows; ours is a TritonAttnBackend with packed kernels).
_MODEL_ADJUSTMENTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tq_model_adjust", default=False
)


def _model_adjustments(orig, self, *args, **kwargs):
    token = _MODEL_ADJUSTMENTS.set(True)
    try:
        return orig(self, *args, **kwargs)
    finally:
        _MODEL_ADJUSTMENTS.reset(token)


def _resolved_attention_backends(result, self, *args, **kwargs):
    if not _MODEL_ADJUSTMENTS.get() or not kv_quant_enabled(self):
        return None
    return tuple("triton" if b == refusals.BACKEND_NAME else b for b in result)


def _from_cli_args(orig, cls, args):
    options = {k: getattr(args, k) for k in OPTION_DEFAULTS if hasattr(args, k)}
    token = _CLI_OPTIONS.set(options)
    try:
        return orig(cls, args)
    finally:
        _CLI_OPTIONS.reset(token)


def _server_args_init(orig, self, *args, **kwargs):
    given = {k: kwargs.pop(k) for k in OPTION_DEFAULTS if k in kwargs}
    if not given:
        given = _CLI_OPTIONS.get() or {}
        _CLI_OPTIONS.set(None)
    options = normalize_options(given)
    if options["kv_quant"] != "none":
        for name, value in options.items():
            object.__setattr__(self, name, value)
    if options["kv_quant"] == "turboquant":
        for name in BACKEND_FIELDS:
            if kwargs.get(name) == "triton":
                kwargs[name] = BACKEND_NAME
        if kwargs.get("attention_backend") is None:
            kwargs["attention_backend"] = BACKEND_NAME
    return orig(self, *args, **kwargs)


def _server_args_post_init(result, self):
    mode = simulated_mode(self)
    if mode:
        refusals.check_server_args(self)
        logger.info(
            "sglang-tq: --kv-quant %s %s is SIMULATED through SGLang's bf16 KV pool (every stored "
            "K/V is its quantize-dequantize round trip; same pool size as bf16, no memory "
            "saving, attention backend %s), bf16 layers %s.",
            mode,
            self.kv_quant_bits,
            self.attention_backend or "SGLang's default",
            list(self.kv_quant_bf16_layers) or "none",
        )
        return None
    if not kv_quant_enabled(self):
        for name in BACKEND_FIELDS:
            if getattr(self, name, None) == BACKEND_NAME:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} turboquant reads the packed TurboQuant KV cache, so it "
                    f"needs --kv-quant turboquant; add it or pick another backend."
                )
        return None
    refusals.check_server_args(self)
    logger.info(
        "sglang-tq: TurboQuant KV cache %s, seed %d, bf16 layers %s, packed prefill %s, "
        "key centers %s.",
        self.kv_quant_bits,
        self.kv_quant_seed,
        list(self.kv_quant_bf16_layers) or "none",
        "on" if self.kv_quant_packed_prefill else "off",
        self.kv_quant_key_centers or "none",
    )
    return None


def _attn_tp_size() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_size


def _attn_tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_rank


def rank_key_centers(centers: Any, tp_rank: int, tp_size: int) -> Any:
    """The KV heads of [layers, total_kv_heads, D] key centers that attention-TP rank
    ``tp_rank`` holds: a contiguous slice, or with more ranks than KV heads the one head
    SGLang replicates onto it (QKVParallelLinear: rank r holds head r // replicas)."""
    total = centers.shape[1]
    if tp_size <= total:
        per = total // tp_size
        return centers[:, tp_rank * per : (tp_rank + 1) * per].contiguous()
    head = tp_rank // (tp_size // total)
    return centers[:, head : head + 1].contiguous()


def _memory_saver_enabled() -> bool:
    from sglang.srt.runtime_context import get_exec

    return get_exec().features.enable_memory_saver


def _local_layers(kvc) -> Sequence[int]:
    """Model ids of the layers with a KV cache on this rank, as SGLang's configurator counts
    them: a hybrid linear-attention model's full-attention layers only."""
    from sglang.srt.configs.hybrid_arch import mambaish_config

    start = kvc.layer_info.start_layer
    hybrid = mambaish_config(kvc.model_config)
    if hybrid is not None:
        return [i for i in hybrid.full_attention_layer_ids if start <= i < kvc.layer_info.end_layer]
    return range(start, start + kvc.layer_info.num_effective_layers)


def _compute_cell_size(orig, self, kvc, num_layers, *args, **kwargs):
    if not kv_quant_enabled(kvc.server_args):
        return orig(self, kvc, num_layers, *args, **kwargs)
    if kvc.use_mla_backend:
        return _mla_cell_size(orig, self, kvc, num_layers, *args, **kwargs)
    from .pool import bytes_per_token, prefill_scratch_bytes

    refusals.check_kv_context(kvc)
    layers = _local_layers(kvc)
    if len(layers) != num_layers:
        raise RuntimeError(
            f"--kv-quant turboquant expected {len(layers)} KV layers on this rank but SGLang "
            f"sizes {num_layers}; use --kv-quant none for this model."
        )
    mc = kvc.model_config
    cfg, heads = tq_config(kvc.server_args, mc.head_dim), mc.get_num_kv_heads(_attn_tp_size())
    cell = bytes_per_token(cfg, layers, heads, kvc.kv_cache_dtype)
    stock = orig(self, kvc, num_layers, *args, **kwargs)
    logger.info(
        "sglang-tq: KV cell size %d B/token (bf16 pool: %d B/token, %.2fx the tokens).",
        cell,
        stock,
        stock / cell,
    )
    # read by the sizing patch below: the prefill scratch comes out of the pool's bytes
    self._tq_prefill_scratch_bytes = prefill_scratch_bytes(
        cfg, layers, heads, mc.context_len, kvc.kv_cache_dtype
    )
    return cell


def _mla_cell_size(orig, self, kvc, num_layers, *args, **kwargs):
    """An MLA model's cell: the packed latent and the RoPE key per layer
    (:func:`mla_pool.mla_bytes_per_token`; SGLang's ModelConfig reports head_dim 256 and the
    config's KV heads for MLA, neither of which the latent pool has), every attention-TP rank
    holding the whole latent as in SGLang. The prefill scratch is one layer's dense
    [context_len, 576] rows, as for the MHA pool."""
    from .mla_pool import mla_bytes_per_token

    mc = kvc.model_config
    layers = range(kvc.layer_info.start_layer, kvc.layer_info.start_layer + num_layers)
    cfg = tq_config(kvc.server_args, mc.kv_lora_rank)
    cell = mla_bytes_per_token(cfg, layers, mc.qk_rope_head_dim, kvc.kv_cache_dtype)
    stock = orig(self, kvc, num_layers, *args, **kwargs)
    logger.info(
        "sglang-tq: MLA KV cell size %d B/token (bf16 pool: %d B/token, %.2fx the tokens).",
        cell,
        stock,
        stock / cell,
    )
    packed = any(not cfg.is_bf16_layer(i) for i in layers)
    item = kvc.kv_cache_dtype.itemsize
    self._tq_prefill_scratch_bytes = (
        mc.context_len * (mc.kv_lora_rank + mc.qk_rope_head_dim) * item if packed else 0
    )
    return cell


def _calculate_pool_sizes(orig, self, available_bytes: int, page_size: int):
    scratch = getattr(self, "_tq_prefill_scratch_bytes", 0)
    if not scratch:
        return orig(self, available_bytes, page_size)
    if scratch >= available_bytes:
        raise RuntimeError(
            f"--kv-quant turboquant sets aside {scratch / 2**20:.0f} MiB for the prefill scratch "
            f"(context_len rows of dense K/V) but only {available_bytes / 2**20:.0f} MiB are left "
            f"for the KV cache; raise --mem-fraction-static or lower --context-length."
        )
    logger.info(
        "sglang-tq: %.1f MiB of the KV budget set aside for the prefill scratch.", scratch / 2**20
    )
    return orig(self, available_bytes - scratch, page_size)


def _swa_cell_size(result, self, kvc):
    """SGLang's hybrid-SWA sizing (full and window pools, ``--swa-full-tokens-ratio``) by
    packed bytes: the per-token bytes of both layer groups and the cell are recomputed with
    SGLang's formula, and the prefill scratch is set aside as for the plain pool."""
    if not kv_quant_enabled(kvc.server_args):
        return None
    from .pool import bytes_per_token, prefill_scratch_bytes

    refusals.check_kv_context(kvc)
    mc = kvc.model_config
    if self._draft_full_layers_num or self._draft_swa_full_layers_num:
        raise RuntimeError(
            "--kv-quant turboquant does not support speculative-decoding draft "
            "layers; drop --speculative-algorithm or use --kv-quant none."
        )
    heads = mc.get_num_kv_heads(_attn_tp_size())
    if (mc.get_swa_num_kv_heads(_attn_tp_size()), mc.swa_head_dim, mc.swa_v_head_dim) != (
        heads,
        mc.head_dim,
        mc.v_head_dim,
    ):
        raise RuntimeError(
            "--kv-quant turboquant needs the window layers to have the full "
            "layers' KV heads and head dims; use --kv-quant none for this model."
        )
    cfg = tq_config(kvc.server_args, mc.head_dim)
    full, swa = mc.full_attention_layer_ids, mc.swa_attention_layer_ids
    stock = self._cell_size
    self._full_per_token = bytes_per_token(cfg, full, heads, kvc.kv_cache_dtype) / max(len(full), 1)
    self._swa_per_token = bytes_per_token(cfg, swa, heads, kvc.kv_cache_dtype) / len(swa)
    self._cell_size = (
        self._swa_per_token * len(swa)
        if not full
        else self._full_per_token * len(full)
        + self._swa_full_tokens_ratio * self._swa_per_token * len(swa)
    )
    logger.info(
        "sglang-tq: hybrid SWA KV cell %.1f B/token (bf16 pools: %.1f, %.2fx the tokens).",
        self._cell_size,
        stock,
        stock / self._cell_size,
    )
    self._tq_prefill_scratch_bytes = prefill_scratch_bytes(
        cfg, [*full, *swa], heads, mc.context_len, kvc.kv_cache_dtype
    )
    return None


def _build_hybrid_swa_kv_pool(orig, self, *args, **kwargs):
    """SGLang's SWAKVPool with packed "Full" and "SWA" inner pools (window eviction, the
    SWA allocator and radix cache stay SGLang's: they move slot ids, never KV bytes)."""
    if not kv_quant_enabled(self.server_args):
        return orig(self, *args, **kwargs)
    mc = self.model_config
    return _build_packed_wrapper(
        orig,
        self,
        {"Full": tuple(mc.full_attention_layer_ids), "SWA": tuple(mc.swa_attention_layer_ids)},
        *args,
        **kwargs,
    )


def _build_packed_wrapper(orig, self, layer_ids, *args, **kwargs):
    """SGLang's own hybrid-pool build with :func:`pool.inner_pool_factory` as the class of
    its inner pools (``layer_ids``: model layer ids by SGLang's allocation label)."""
    global _packed_pool_class
    from .pool import TQTokenToKVPool, inner_pool_factory

    verify_patches_applied()
    refusals.check_kv_context(self)
    refusals.check_pool_build(self, kwargs.get("mha_pool_class"), None)
    cfg, key_centers = _resolve_key_centers(
        self, tq_config(self.server_args, self.model_config.head_dim)
    )
    _packed_pool_class = TQTokenToKVPool
    pool = orig(
        self, *args, **{**kwargs, "mha_pool_class": inner_pool_factory(cfg, layer_ids, key_centers)}
    )
    pool._tq_packed = True  # read by the no-fused-set-kv patch: the wrapper holds packed pools
    return pool


def _resolve_key_centers(kvc, cfg: TQConfig) -> tuple[TQConfig, Any]:
    """(cfg, [layers, local kv heads, D] centers or None) for the pool ``kvc`` builds.

    ``auto`` becomes the RoPE-averaged k_proj bias of the loaded model
    (``centers.sglang_bias_key_centers``) or, for a model without a bias, no centers: the
    returned cfg then says ``key_centers=None``, so the logit-cap refusal only sees
    centers that are really applied."""
    mu = key_centers_of(kvc, cfg.key_centers)
    if mu is None and cfg.key_centers == AUTO_CENTERS:
        return dataclasses.replace(cfg, key_centers=None), None
    return cfg, mu


def key_centers_of(kvc, spec: str | None):
    """The [layers, local kv heads, D] key centers ``spec`` (``parse_key_centers``) gives
    for the model ``kvc`` loaded, or None (``none``; ``auto`` for a model without a
    k_proj bias). ``bias`` without a bias is refused in one sentence."""
    from ..format import centers as kc

    mc = kvc.model_config
    if spec in (AUTO_CENTERS, BIAS_CENTERS):
        heads = mc.get_num_kv_heads(_attn_tp_size())
        mu = kc.sglang_bias_key_centers(
            kvc.model, mc.num_hidden_layers, heads, mc.head_dim, kc.BIAS_HORIZON
        )
        if mu is None:
            if spec == BIAS_CENTERS:
                raise ValueError(
                    "--kv-quant-key-centers bias needs a model with a k_proj bias; "
                    "this one has none: give a calibration file "
                    "(python -m sglang_tq.tools.key_centers) or none."
                )
            logger.info(
                "sglang-tq: key centers auto: the model has no k_proj bias, keys are "
                "quantized uncentered (a calibration file: --kv-quant-key-centers FILE)."
            )
            return None
        logger.info(
            "sglang-tq: key centers %s: from the k_proj bias, RoPE-averaged over "
            "positions 0..%d; largest center norm %.1f.",
            spec,
            kc.BIAS_HORIZON - 1,
            mu.norm(dim=-1).max().item(),
        )
        return mu
    if spec:
        return rank_key_centers(
            kc.load_key_centers(
                spec, mc.num_hidden_layers, mc.get_total_num_kv_heads(), mc.head_dim
            ),
            _attn_tp_rank(),
            _attn_tp_size(),
        )
    return None


def _build_simulated_pool(orig, kvc, mode: str, **kwargs):
    """SGLang's own MHA pool build, with :class:`SimulatedKVPool` as the class."""
    global _packed_pool_class
    from .simulated import SimulatedKVPool

    verify_patches_applied(mode)
    refusals.check_kv_context(kvc)
    refusals.check_pool_build(kvc, kwargs.get("mha_pool_class"), kwargs.get("quant_method"))
    sa = kvc.server_args
    if mode == "hadamard":
        refusals.check_model_config(kvc.model_config, sa)
    k_bits, v_bits = TQConfig.parse_bits(sa.kv_quant_bits)
    pool_class = functools.partial(
        SimulatedKVPool,
        mode=mode,
        k_bits=k_bits,
        v_bits=v_bits,
        seed=sa.kv_quant_seed,
        bf16_layers=sa.kv_quant_bf16_layers,
        key_centers=key_centers_of(kvc, getattr(sa, "kv_quant_key_centers", None)),
    )
    pool = orig(kvc, **{**kwargs, "mha_pool_class": pool_class})
    if not isinstance(pool, SimulatedKVPool):
        raise RuntimeError(
            f"--kv-quant {mode} could not install its simulated pool (SGLang built "
            f"{type(pool).__name__}); use --kv-quant none for this model."
        )
    _packed_pool_class = SimulatedKVPool
    logger.info(
        "sglang-tq: KV pool %s SIMULATED in SGLang's %s pool (size as bf16, no memory saving).",
        pool.describe(),
        pool.dtype,
    )
    return pool


def _build_mha_kv_pool(orig, self, *args, **kwargs):
    mode = simulated_mode(self.server_args)
    if mode:
        return _build_simulated_pool(orig, self, mode, **kwargs)
    if not kv_quant_enabled(self.server_args):
        return orig(self, *args, **kwargs)
    global _packed_pool_class
    from .pool import TQTokenToKVPool

    verify_patches_applied()
    refusals.check_kv_context(self)
    refusals.check_pool_build(self, kwargs.get("mha_pool_class"), kwargs.get("quant_method"))
    mc = self.model_config
    cfg, key_centers = _resolve_key_centers(self, tq_config(self.server_args, mc.head_dim))
    _packed_pool_class = TQTokenToKVPool
    return TQTokenToKVPool(
        kwargs["max_total_num_tokens"],
        self.pool_page_size,
        head_num=mc.get_num_kv_heads(_attn_tp_size()),
        head_dim=mc.head_dim,
        layer_num=self.layer_info.num_effective_layers,
        device=self.device,
        enable_memory_saver=_memory_saver_enabled(),
        cfg=cfg,
        key_centers=key_centers,
        model_dtype=self.kv_cache_dtype,
        v_head_dim=mc.v_head_dim,
        start_layer=self.layer_info.start_layer,
        end_layer=self.layer_info.end_layer,
    )


def _build_mla_kv_pool(orig, self, *args, **kwargs):
    """:class:`mla_pool.TQMLATokenToKVPool` instead of SGLang's ``MLATokenToKVPool``, with
    the arguments SGLang passes its own (kv_cache_configurator.py, ``_build_mla_kv_pool``)."""
    if not kv_quant_enabled(self.server_args):
        return orig(self, *args, **kwargs)
    global _packed_pool_class
    from .mla_pool import TQMLATokenToKVPool

    verify_patches_applied()
    mc = self.model_config
    _packed_pool_class = TQMLATokenToKVPool
    return TQMLATokenToKVPool(
        kwargs["max_total_num_tokens"],
        self.pool_page_size,
        mc.kv_lora_rank,
        mc.qk_rope_head_dim,
        layer_num=self.layer_info.num_effective_layers,
        device=self.device,
        enable_memory_saver=_memory_saver_enabled(),
        cfg=tq_config(self.server_args, mc.kv_lora_rank),
        model_dtype=self.kv_cache_dtype,
        start_layer=self.layer_info.start_layer,
        end_layer=self.layer_info.end_layer,
    )


def _after_build_token_to_kv_pool(result, self, *args, **kwargs):
    mode = simulated_mode(self.server_args)
    if mode:
        from .simulated import SimulatedKVPool

        if not isinstance(result, SimulatedKVPool):
            raise RuntimeError(
                f"--kv-quant {mode} could not install its simulated pool for this model (SGLang "
                f"built {type(result).__name__}); use --kv-quant none for this model."
            )
        return None
    if not kv_quant_enabled(self.server_args):
        return None
    from .mla_pool import TQMLATokenToKVPool
    from .pool import TQTokenToKVPool, packed_pools

    inner = [getattr(result, n, None) for n in ("full_kv_pool", "swa_kv_pool")]
    if not isinstance(result, (TQTokenToKVPool, TQMLATokenToKVPool)) and (
        not packed_pools(result)
        or any(p is not None and not isinstance(p, TQTokenToKVPool) for p in inner)
    ):
        raise RuntimeError(
            f"--kv-quant turboquant could not install its packed pool for this model (SGLang "
            f"built {type(result).__name__}); use --kv-quant none for this model."
        )
    return None


def _build_hybrid_linear_kv_pool(orig, self, *args, **kwargs):
    """SGLang's HybridLinearKVPool with packed inner pools for the full-attention layers
    (the recurrent state stays SGLang's): the class it builds them with becomes
    :func:`pool.inner_pool_factory`, keyed by the model ids of those layers."""
    if not kv_quant_enabled(self.server_args):
        return orig(self, *args, **kwargs)
    return _build_packed_wrapper(orig, self, {None: tuple(_local_layers(self))}, *args, **kwargs)


def _enable_fused_set_kv_buffer(orig, forward_batch, *args, **kwargs):
    # Runs inside model forwards (possibly under torch.compile): a global read and
    # an isinstance, nothing else. The class is set once our pool is built, so a
    # stock server only reads a None.
    pool_class = _packed_pool_class
    if pool_class is not None:
        from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

        pool = get_token_to_kv_pool()
        if isinstance(pool, pool_class) or getattr(pool, "_tq_packed", False):
            return False
    return orig(forward_batch, *args, **kwargs)


def _kivi_after_forward(result, self, forward_batch, *args, **kwargs):
    # Every forward of every process passes here: one attribute read unless the pool is a
    # KIVI simulated pool. Runs after the (possibly CUDA-graph) forward, on its stream.
    pool = getattr(self, "token_to_kv_pool", None)
    if getattr(pool, "kivi", None) is None:
        return None
    from .simulated import new_token_counts

    counts = new_token_counts(forward_batch)
    if counts:
        seq_lens = forward_batch.seq_lens_cpu
        if seq_lens is None:
            seq_lens = forward_batch.seq_lens.cpu()
        pool.requantize_completed_groups(
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            seq_lens[: len(counts)].tolist(),
            counts,
        )
    return None


def _resolved_config_dict(result, self, *args, **kwargs):
    server_args = getattr(self, "server_args", None)
    if kv_quant_enabled(server_args) or simulated_mode(server_args):
        result.update({k: getattr(server_args, k) for k in OPTION_DEFAULTS})
    return None


def _validate_one_request(result, self, obj, input_ids, *args, **kwargs):
    """Refuse token ids outside the vocabulary before they reach the embedding: SGLang 0.5.17
    defines ``_validate_input_ids_in_vocab`` but never calls it, so an id past the table
    indexes out of bounds on the GPU and can take the server down (issue 15's soak).
    A ValueError here becomes SGLang's HTTP 400."""
    server_args = getattr(self, "server_args", None)
    if not input_ids or not (kv_quant_enabled(server_args) or simulated_mode(server_args)):
        return None
    vocab = self.model_config.vocab_size
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab}); "
            f"send ids the model's tokenizer produces."
        )
    return None


def _create_backend(runner):
    from .backend import create_tq_backend

    return create_tq_backend(runner)


# --------------------------------------------------------------------------- patches
@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    target: str
    hook_type: HookType
    hook: Callable
    purpose: str


_SA = "sglang.srt.server_args.ServerArgs"
PATCHES = (
    Patch(
        "cli-flags",
        f"{_SA}.add_cli_args",
        HookType.AFTER,
        _add_cli_args,
        "add the --kv-quant* flags (shown in --help)",
    ),
    Patch(
        "cli-to-init",
        f"{_SA}.from_cli_args",
        HookType.AROUND,
        _from_cli_args,
        "carry the parsed flags to ServerArgs.__init__",
    ),
    Patch(
        "init-options",
        f"{_SA}.__init__",
        HookType.AROUND,
        _server_args_init,
        "accept kv_quant* options, set them as attributes, select the turboquant backend",
    ),
    Patch(
        "validate",
        f"{_SA}.__post_init__",
        HookType.AFTER,
        _server_args_post_init,
        "refuse unsupported combinations at start-up",
    ),
    Patch(
        "cell-size",
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        HookType.AROUND,
        _compute_cell_size,
        "size the KV pool by packed bytes per token",
    ),
    Patch(
        "scratch-budget",
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.calculate_pool_sizes",
        HookType.AROUND,
        _calculate_pool_sizes,
        "take the prefill scratch (context_len dense K/V rows) out of the KV budget",
    ),
    Patch(
        "build-pool",
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool",
        HookType.AROUND,
        _build_mha_kv_pool,
        "build TQTokenToKVPool instead of the MHA pool",
    ),
    Patch(
        "build-mla-pool",
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mla_kv_pool",
        HookType.AROUND,
        _build_mla_kv_pool,
        "build the packed MLA latent pool instead of SGLang's MLATokenToKVPool",
    ),
    Patch(
        "swa-cell-size",
        "sglang.srt.model_executor.pool_configurator.HybridSWAPoolConfigurator.__init__",
        HookType.AFTER,
        _swa_cell_size,
        "size SGLang's full + window pools by packed bytes per token",
    ),
    Patch(
        "swa-scratch-budget",
        "sglang.srt.model_executor.pool_configurator.HybridSWAPoolConfigurator.calculate_pool_sizes",
        HookType.AROUND,
        _calculate_pool_sizes,
        "take the prefill scratch out of the hybrid SWA budget",
    ),
    Patch(
        "swa-cap-scratch-budget",
        "sglang.srt.model_executor.pool_configurator.SWAChunkCapPoolConfigurator.calculate_pool_sizes",
        HookType.AROUND,
        _calculate_pool_sizes,
        "take the prefill scratch out of the chunk-capped hybrid SWA budget",
    ),
    Patch(
        "build-hybrid-swa-pool",
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_hybrid_swa_kv_pool",
        HookType.AROUND,
        _build_hybrid_swa_kv_pool,
        "build SWAKVPool's full and window pools as packed pools",
    ),
    Patch(
        "model-adjustments",
        f"{_SA}._handle_model_specific_adjustments",
        HookType.AROUND,
        _model_adjustments,
        "mark SGLang's per-model server-args checks (for the next patch)",
    ),
    Patch(
        "backend-name-for-model-checks",
        f"{_SA}._resolved_attention_backends",
        HookType.AFTER,
        _resolved_attention_backends,
        "inside the per-model checks, report turboquant as triton (gpt-oss's backend assert)",
    ),
    Patch(
        "build-hybrid-linear-pool",
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_hybrid_linear_kv_pool",
        HookType.AROUND,
        _build_hybrid_linear_kv_pool,
        "build HybridLinearKVPool's full-attention pool as packed pools",
    ),
    Patch(
        "pool-guard",
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool",
        HookType.AFTER,
        _after_build_token_to_kv_pool,
        "refuse any pool other than ours",
    ),
    Patch(
        "no-fused-set-kv",
        "sglang.srt.models.utils.enable_fused_set_kv_buffer",
        HookType.AROUND,
        _enable_fused_set_kv_buffer,
        "disable the fused bf16 rotary+set-KV write for the packed pool",
    ),
    Patch(
        "server-info",
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.resolved_config_dict",
        HookType.AFTER,
        _resolved_config_dict,
        "report kv_quant* in /get_server_info",
    ),
    Patch(
        "input-ids-range",
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        HookType.AFTER,
        _validate_one_request,
        "answer token ids outside the vocabulary with HTTP 400 instead of an out-of-bounds lookup",
    ),
    Patch(
        "kivi-groups",
        "sglang.srt.model_executor.model_runner.ModelRunner.forward",
        HookType.AFTER,
        _kivi_after_forward,
        "re-quantize the KIVI groups each forward completed (--kv-quant kivi only)",
    ),
)


def check_sglang_version() -> None:
    found = importlib.metadata.version("sglang")
    if found != SGLANG_VERSION:
        raise RuntimeError(
            f"sglang-tq is built against SGLang {SGLANG_VERSION} but SGLang {found} is installed; "
            f"install sglang=={SGLANG_VERSION} (the --kv-quant flags stay unavailable until then)."
        )


def verify_patches_applied(mode: str = "turboquant") -> None:
    """Refuse to run a --kv-quant mode when SGLang failed to apply any of our patches."""
    missing = [p.name for p in PATCHES if p.target not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            f"--kv-quant {mode} needs the sglang-tq patches {missing}, which SGLang did not "
            f"apply (see 'Failed to apply hooks' in the log); reinstall sglang-tq for SGLang "
            f"{SGLANG_VERSION} or use --kv-quant none."
        )


def install() -> None:
    """Register the backend, the ServerArgs defaults and every patch; idempotent."""
    check_sglang_version()
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.server_args import (
        ATTENTION_BACKEND_CHOICES,
        ServerArgs,
        add_attention_backend_choices,
    )

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if ATTENTION_BACKENDS.get(BACKEND_NAME) is not _create_backend:
        register_attention_backend(BACKEND_NAME)(_create_backend)
    for name, default in OPTION_DEFAULTS.items():
        if not hasattr(ServerArgs, name):
            setattr(ServerArgs, name, default)
    for patch in PATCHES:
        registered = HookRegistry._hooks.get(patch.target, ())
        if not any(hook is patch.hook for _, hook, _ in registered):
            HookRegistry.register(patch.target, patch.hook, patch.hook_type)
            logger.debug(
                "sglang-tq: registered patch %s on %s (%s).",
                patch.name,
                patch.target,
                patch.purpose,
            )

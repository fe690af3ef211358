"""Everything ``--kv-quant turboquant`` refuses, each as one sentence naming the flag and the way out.

The simulated prior-art modes (``--kv-quant hadamard`` / ``kivi``, :mod:`sglang_tq.serving.simulated`)
go through the same checks, with their own flag in the message, except where they differ:
they run SGLang's own attention backends (fa3, flashinfer, triton, or unset) on SGLang's
bf16 pool, Hadamard needs a power-of-two head_dim instead of the kernels' head dims, and
KIVI's token groups need ``--disable-radix-cache`` or a ``--page-size`` multiple of 32.

Three stages, from earliest to latest:

* :func:`check_server_args` runs at the end of ``ServerArgs.__post_init__`` in the
  launching process, on the resolved fields, so most refusals stop the launch
  before any subprocess starts;
* :func:`check_kv_context` and :func:`check_pool_build` run in the scheduler where
  SGLang sizes and builds the KV pool; they back up the launch checks with what the
  loaded model reveals (a sliding window, a KV dtype resolved to FP8, a draft
  worker), which for the supported architectures and flags the launcher has already
  refused (the checkpoint's FP8 KV config: :func:`checkpoint_kv_quant`);
* :func:`check_model_layers` runs when the attention backend is built and checks
  every ``RadixAttention`` layer against what the kernels implement.

A failure in the scheduler aborts start-up too (SGLang kills the launcher when a
scheduler raises), so no request ever meets an unsupported configuration and
nothing silently falls back to bf16. The two SGLang environment variables that
change the pool layout are read here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from ..config import TQConfig
from ..format.priorart import KIVI_GROUP_TOKENS
from ..format.rotation import is_power_of_two
from ..kernels._checks import SUPPORTED_HEAD_DIMS

KV_QUANT_CHOICES = ("none", "turboquant", "hadamard", "kivi")
SIMULATED_MODES = ("hadamard", "kivi")
# SGLang backends whose MHA path stores K/V through the pool's set_kv_buffer (None: SGLang picks).
SIMULATED_BACKENDS = (None, "fa3", "flashinfer", "triton")
# --attention-backend triton (or unset) maps onto ours: our backend is SGLang's
# Triton backend with the packed kernels swapped in.
BACKEND_NAME = "turboquant"
ACCEPTED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16")
# Decoder-only, full-attention GQA/MHA architectures whose SGLang model code
# writes K/V only through RadixAttention (fused set-KV is disabled by our hook).
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    # sliding-window layers on SGLang's plain pool (it turns hybrid SWA memory off for them)
    "Gemma3ForCausalLM",
    # hybrid linear attention: only the full-attention layers hold K/V (HybridLinearKVPool)
    "Qwen3NextForCausalLM",
    # alternating 128-token windows with learned sinks, in SGLang's hybrid SWA pool (SWAKVPool)
    "GptOssForCausalLM",
)
HYBRID_LINEAR_ARCHITECTURES = ("Qwen3NextForCausalLM",)
HYBRID_SWA_ARCHITECTURES = ("GptOssForCausalLM",)  # also the ones with attention sinks
# MLA models with the packed latent pool (sglang_tq/serving/mla_pool.py): admitted only with
# SGLANG_TQ_EXPERIMENTAL_MLA=1 until a GPU run validates them (env.py)
MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_ALT = "or start the server with --kv-quant none"


def mode_of(args: Any) -> str:
    """The ``--kv-quant`` mode of server args (or of a KV configurator holding them);
    objects without one are checked as turboquant."""
    sa = getattr(args, "server_args", args)
    return getattr(sa, "kv_quant", "turboquant") if sa is not None else "turboquant"


def check_server_args(sa: Any) -> None:
    """Raise ``ValueError`` (one sentence) for the first unsupported server setting."""
    mode = mode_of(sa)
    q = f"--kv-quant {mode}"
    simulated = mode in SIMULATED_MODES
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        value = getattr(sa, name, None)
        flag = "--" + name.replace("_", "-")
        if simulated and value not in SIMULATED_BACKENDS:
            raise ValueError(
                f"{q} is simulated through SGLang's bf16 pool and its set_kv_buffer, which the "
                f"fa3, flashinfer and triton backends call, so {flag} must be one of those or "
                f"unset (got {value!r}); drop {flag} {_ALT}."
            )
        if not simulated and value not in (None, BACKEND_NAME):
            raise ValueError(
                f"{q} decodes with its own attention backend, so {flag} must be "
                f"turboquant, triton or unset (got {value!r}); drop {flag} {_ALT}."
            )
    if str(sa.kv_cache_dtype) not in ACCEPTED_KV_CACHE_DTYPES:
        what = (
            "stores its round-tripped K/V in the bf16 pool"
            if simulated
            else "replaces the KV cache format"
        )
        raise ValueError(
            f"{q} {what}, so --kv-cache-dtype must be auto "
            f"or bf16 (got {sa.kv_cache_dtype!r}); drop --kv-cache-dtype {_ALT}."
        )
    if str(getattr(sa, "dtype", "auto")) in ("float32", "float"):
        raise ValueError(
            f"{q} runs bf16 or fp16 models (its kernels and SGLang's attention take those), "
            f"so --dtype {sa.dtype} cannot be served; use --dtype bfloat16 or auto {_ALT}."
        )
    if mode == "kivi" and not sa.disable_radix_cache and (sa.page_size or 1) % KIVI_GROUP_TOKENS:
        raise ValueError(
            f"{q} quantizes keys in groups of {KIVI_GROUP_TOKENS} positions, which a radix-cache "
            f"hit inside a group would split between requests, so add --disable-radix-cache or "
            f"--page-size {KIVI_GROUP_TOKENS} (got --page-size {sa.page_size})."
        )
    _check_flags(sa)
    _check_environment(q)
    if getattr(sa, "_declarations_materialized", False):
        check_model_config(sa.get_model_config(), sa)


# (predicate, flag as typed, what it is): a true predicate refuses the flag.
_FLAG_RULES = (
    (lambda sa: sa.disaggregation_mode != "null", "--disaggregation-mode", "PD disaggregation"),
    (
        lambda sa: sa.disaggregation_decode_enable_offload_kvcache,
        "--disaggregation-decode-enable-offload-kvcache",
        "KV offload on PD decode",
    ),
    (
        lambda sa: sa.enable_hierarchical_cache,
        "--enable-hierarchical-cache",
        "HiCache (host-memory KV tiers)",
    ),
    (
        lambda sa: sa.hicache_storage_backend is not None,
        "--hicache-storage-backend",
        "HiCache storage",
    ),
    (lambda sa: sa.enable_lmcache, "--enable-lmcache", "LMCache"),
    (lambda sa: sa.enable_flexkv, "--enable-flexkv", "FlexKV"),
    (lambda sa: sa.enable_hisparse, "--enable-hisparse", "HiSparse"),
    (
        lambda sa: sa.speculative_algorithm is not None,
        "--speculative-algorithm",
        "speculative decoding",
    ),
    (lambda sa: sa.dcp_size > 1, "--dcp-size", "decode context parallelism"),
    (lambda sa: sa.attn_cp_size > 1, "--attn-cp-size", "attention context parallelism"),
    (lambda sa: sa.enable_prefill_cp, "--enable-prefill-cp", "prefill context parallelism"),
    (lambda sa: sa.pp_size > 1, "--pp-size", "pipeline parallelism (untested so far)"),
    (
        lambda sa: sa.enable_dp_attention,
        "--enable-dp-attention",
        "data-parallel attention (untested so far)",
    ),
    (lambda sa: sa.enable_two_batch_overlap, "--enable-two-batch-overlap", "two-batch overlap"),
    (lambda sa: sa.enable_pdmux, "--enable-pdmux", "PD multiplexing"),
    (
        lambda sa: sa.enable_deterministic_inference,
        "--enable-deterministic-inference",
        "deterministic inference",
    ),
    (lambda sa: sa.enable_unified_memory, "--enable-unified-memory", "the unified memory pool"),
    (
        lambda sa: sa.enable_page_major_kv_layout,
        "--enable-page-major-kv-layout",
        "the page-major KV layout",
    ),
    (
        lambda sa: sa.prefill_only_disable_kv_cache,
        "--prefill-only-disable-kv-cache",
        "running without a KV cache",
    ),
    (lambda sa: sa.kv_canary != "none", "--kv-canary", "KV canaries"),
    (lambda sa: sa.device not in (None, "cuda"), "--device", "devices other than CUDA GPUs"),
)


# Combinations the packed pool and its backend have not been tested with: refused until a
# test covers them (the simulated formats run SGLang's own pool and backend instead).
_TQ_FLAG_RULES = (
    (
        lambda sa: (sa.page_size or 1) > 1,
        "--page-size",
        "pages of more than one token (untested so far)",
    ),
    (
        lambda sa: bool(sa.enable_lora or sa.lora_paths),
        "--enable-lora / --lora-paths",
        "LoRA adapters (untested so far)",
    ),
    (
        lambda sa: sa.enable_torch_compile,
        "--enable-torch-compile",
        "torch.compile of the model (untested so far)",
    ),
    (lambda sa: (sa.dp_size or 1) > 1, "--dp-size", "data-parallel replicas (untested so far)"),
)


def _check_flags(sa: Any) -> None:
    mode = mode_of(sa)
    q = f"--kv-quant {mode}"
    rules = _FLAG_RULES + (_TQ_FLAG_RULES if mode == "turboquant" else ())
    for refused, flag, what in rules:
        if refused(sa):
            raise ValueError(f"{q} does not support {what}; drop {flag} {_ALT}.")


def _check_environment(q: str) -> None:
    from sglang.srt.environ import envs

    for var, what in (
        ("SGLANG_USE_HND_KVCACHE", "the HND KV layout"),
        ("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "post-capture KV sizing"),
    ):
        if getattr(envs, var).get():
            raise ValueError(f"{q} does not support {what}; unset {var} {_ALT}.")


def check_model_config(mc: Any, sa: Any | None = None) -> None:
    """Model-level refusals; ``sa`` (server args) adds the TP and bf16-layer checks."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import (
        AttentionArch,
        is_deepseek_dsa,
        is_deepseek_v4,
        is_minimax_sparse,
    )

    mode = mode_of(sa)
    q = f"--kv-quant {mode}"
    hf = mc.hf_config
    arch = (getattr(hf, "architectures", None) or ["<unknown>"])[0]
    if mc.attention_arch == AttentionArch.MLA or is_deepseek_dsa(hf) or is_deepseek_v4(hf):
        _check_mla(mc, sa, q, arch, is_deepseek_dsa(hf) or is_deepseek_v4(hf))
        return
    hybrid_linear_ok = mode == "turboquant" and arch in HYBRID_LINEAR_ARCHITECTURES
    if (mambaish_config(mc) is not None and not hybrid_linear_ok) or is_minimax_sparse(hf):
        raise ValueError(
            f"{q} does not support hybrid linear-attention models such as "
            f"{arch} yet; use --kv-quant none for this model."
        )
    hybrid_swa_ok = mode == "turboquant" and arch in HYBRID_SWA_ARCHITECTURES
    if (getattr(mc, "is_hybrid_swa", False) and not hybrid_swa_ok) or getattr(
        mc, "is_hybrid_swa_compress", False
    ):
        raise ValueError(
            f"{q} does not support hybrid sliding-window models such as {arch} "
            f"yet; use --kv-quant none for this model."
        )
    if getattr(mc, "attention_chunk_size", None) is not None:
        raise ValueError(
            f"{q} does not support chunked local attention ({arch}) yet; "
            f"use --kv-quant none for this model."
        )
    if getattr(mc, "is_encoder_decoder", False):
        raise ValueError(
            f"{q} supports decoder-only models, not the encoder-decoder {arch}; "
            f"use --kv-quant none for this model."
        )
    if getattr(mc, "has_attention_sinks", False) and not hybrid_swa_ok:
        raise ValueError(
            f"{q} does not serve models with attention sinks such as {arch} yet (its kernels "
            f"take sinks, the model family is not validated); use --kv-quant none for this model."
        )
    if mode == "hadamard" and not all(is_power_of_two(d) for d in (mc.head_dim, mc.v_head_dim)):
        raise ValueError(
            f"{q} rotates each head vector by a Walsh-Hadamard matrix, which needs power-of-two "
            f"head dims, but {arch} has head_dim={mc.head_dim}, v_head_dim={mc.v_head_dim}; use "
            f"--kv-quant kivi or --kv-quant none for this model."
        )
    if mode not in SIMULATED_MODES and (
        mc.head_dim != mc.v_head_dim or mc.head_dim not in SUPPORTED_HEAD_DIMS
    ):
        raise ValueError(
            f"{q} kernels need equal K/V head dims in {SUPPORTED_HEAD_DIMS}, but "
            f"{arch} has head_dim={mc.head_dim}, v_head_dim={mc.v_head_dim}; use --kv-quant none "
            f"or --kv-cache-dtype fp8_e4m3 for this model."
        )
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{q} is validated for the full-attention architectures "
            f"{', '.join(ARCHITECTURES)}, not {arch} (which may use sliding windows or write the "
            f"KV cache itself); use --kv-quant none for this model."
        )
    if sa is None:
        return
    if getattr(sa, "enable_mixed_chunk", False) and "sliding_attention" in layer_types(mc):
        raise ValueError(
            f"{q} does not yet run {arch}'s sliding-window layers in mixed prefill/decode "
            f"batches; drop --enable-mixed-chunk {_ALT}."
        )
    if str(getattr(sa, "kv_cache_dtype", "auto")) == "auto" and checkpoint_kv_quant(mc) == "FP8":
        raise ValueError(
            f"{q} stores its own KV format, but {arch}'s checkpoint asks for an FP8 KV cache "
            f"(kv_cache_quant_algo FP8), which --kv-cache-dtype auto would follow; pass "
            f"--kv-cache-dtype bf16 to quantize the bf16 K/V instead {_ALT}."
        )
    total_kv = mc.get_total_num_kv_heads()
    if total_kv % sa.tp_size and sa.tp_size % total_kv:
        raise ValueError(
            f"{q} needs --tp-size to divide or be a multiple of the "
            f"{total_kv} KV heads (got --tp-size {sa.tp_size}); pick another --tp-size {_ALT}."
        )
    _check_bf16_layers(mc, sa, arch)


def _check_bf16_layers(mc: Any, sa: Any, arch: str) -> None:
    layers = mc.num_hidden_layers
    bad = [i for i in getattr(sa, "kv_quant_bf16_layers", ()) if i >= layers]
    if bad:
        raise ValueError(
            f"--kv-quant-bf16-layers names layers {bad} but {arch} has layers 0..{layers - 1}; "
            f"list existing layer ids only."
        )


def _check_mla(mc: Any, sa: Any | None, q: str, arch: str, sparse: bool) -> None:
    """MLA: the DeepSeek-V2/V3 latent (512) + RoPE (64) layout, one bit width, nothing that
    the latent pool would silently ignore; and, until validated on a GPU, the opt-in."""
    from ..env import experimental_mla

    if mode_of(sa) != "turboquant" or sparse or arch not in MLA_ARCHITECTURES:
        raise ValueError(
            f"{q} does not support the MLA model {arch}; use --kv-quant none or "
            f"--kv-cache-dtype fp8_e4m3."
        )
    if not experimental_mla():
        raise ValueError(
            f"{q} does not serve MLA models such as {arch} yet (the packed latent pool and its "
            f"kernels are built but not yet validated on a GPU); use --kv-quant none or "
            f"--kv-cache-dtype fp8_e4m3."
        )
    if (getattr(mc, "kv_lora_rank", None), getattr(mc, "qk_rope_head_dim", None)) != (512, 64):
        raise ValueError(
            f"{q} packs a 512-d MLA latent with a 64-d RoPE key, but {arch} has "
            f"{mc.kv_lora_rank} and {mc.qk_rope_head_dim}; use --kv-quant none."
        )
    if sa is None:
        return
    k_bits, v_bits = TQConfig.parse_bits(sa.kv_quant_bits)
    if k_bits != v_bits:
        raise ValueError(
            f"an MLA latent is both key and value, so --kv-quant-bits takes one "
            f"width for {arch}: use k{k_bits}v{k_bits}."
        )
    unsupported = [
        flag
        for flag, on in (
            ("--kv-quant-packed-prefill", getattr(sa, "kv_quant_packed_prefill", False)),
            (
                "--kv-quant-key-centers",
                getattr(sa, "kv_quant_key_centers", None) not in (None, "auto"),
            ),
        )
        if on
    ]
    if unsupported:
        raise ValueError(
            f"{q} does not support {' and '.join(unsupported)} for MLA models such "
            f"as {arch}; drop them {_ALT}."
        )
    _check_bf16_layers(mc, sa, arch)


def layer_types(mc: Any) -> tuple:
    """The text config's ``layer_types`` (``sliding_attention`` / ``full_attention`` ...), or ()."""
    text = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    return tuple(getattr(text, "layer_types", None) or ())


def checkpoint_kv_quant(mc: Any) -> str | None:
    """The KV-cache quantization a checkpoint's quantization config asks for ("FP8" or
    None), read as SGLang reads it when ``--kv-cache-dtype auto`` resolves (ModelOpt's
    ``kv_cache_quant_algo``, flat or under ``quantization``, or compressed-tensors'
    ``kv_cache_scheme`` of 8-bit floats), so the launcher refuses what the scheduler would."""
    parse = getattr(mc, "_parse_quant_hf_config", None)
    cfg = parse() if parse is not None else None
    if not isinstance(cfg, dict):
        return None
    scheme = cfg.get("kv_cache_scheme")
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    nested = cfg.get("quantization")
    algo = cfg.get("kv_cache_quant_algo") or (
        nested.get("kv_cache_quant_algo") if isinstance(nested, dict) else None
    )
    return algo.upper() if isinstance(algo, str) else None


def check_kv_context(kvc: Any) -> None:
    """Scheduler-side refusals from the loaded model, where SGLang sizes and builds the pool."""
    import torch

    q = f"--kv-quant {mode_of(kvc)}"
    if kvc.kv_cache_dtype == torch.float32:
        raise RuntimeError(
            f"{q} runs a bf16 or fp16 model, but the KV dtype resolved to float32 (the model "
            f"runs in float32, e.g. --dtype float32); use --dtype bfloat16 {_ALT}."
        )
    if kvc.kv_cache_dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"{q} stores its own format but the KV dtype resolved to "
            f"{kvc.kv_cache_dtype} (an FP8-KV checkpoint?); pass --kv-cache-dtype bf16 {_ALT}."
        )
    if kvc.sliding_window_size is not None and mode_of(kvc) != "turboquant":
        raise RuntimeError(
            f"{q} does not support sliding-window attention "
            f"(window {kvc.sliding_window_size}) yet; use --kv-quant none for this model."
        )
    if kvc.is_draft_worker:
        raise RuntimeError(
            f"{q} does not support speculative-decoding draft "
            f"models; drop --speculative-algorithm {_ALT}."
        )


def check_pool_build(kvc: Any, mha_pool_class: type, quant_method: Any) -> None:
    """Refusals for the pool SGLang was about to build in place of ours."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    q = f"--kv-quant {mode_of(kvc)}"
    if quant_method is not None or kvc.kv_cache_dtype_str == "mxfp8":
        raise RuntimeError(
            f"{q} cannot be combined with another KV-cache "
            f"quantization; drop --kv-cache-dtype {_ALT}."
        )
    if mha_pool_class is not MHATokenToKVPool:
        raise RuntimeError(
            f"{q} replaces the standard MHA KV pool, not "
            f"{mha_pool_class.__name__}; drop --enable-page-major-kv-layout {_ALT}."
        )


def check_model_layers(runner: Any, pool: Any) -> None:
    """Backend-side refusals: every RadixAttention layer must be one the kernels implement."""
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    if getattr(runner, "use_mla_backend", False) or runner.model_config.is_encoder_decoder:
        raise RuntimeError(
            "--kv-quant turboquant supports decoder-only MHA/GQA models only; "
            "use --kv-quant none for this model."
        )
    from .pool import resolve_layer

    for module in runner.model.modules():
        if not isinstance(module, RadixAttention):
            continue
        if hasattr(pool, "layers_mapping") or hasattr(pool, "full_attention_layer_id_mapping"):
            try:  # a hybrid pool: the inner pool that holds the layer
                inner, _ = resolve_layer(pool, module.layer_id)
            except RuntimeError:
                problem = "its layer has no packed KV pool"
            else:
                problem = _layer_problem(module, inner, AttentionType.DECODER)
        elif not pool.start_layer <= module.layer_id < pool.start_layer + pool.layer_num:
            problem = "its layer id lies outside the KV pool"
        else:
            problem = _layer_problem(module, pool, AttentionType.DECODER)
        if problem:
            raise RuntimeError(
                f"--kv-quant turboquant cannot run attention layer {module.layer_id}: {problem}; "
                f"use --kv-quant none for this model."
            )


def _layer_problem(layer: Any, pool: Any, decoder: Any) -> str | None:
    if layer.is_cross_attention or layer.attn_type != decoder:
        return "it is not causal decoder self-attention"
    if layer.logit_capping_method != "tanh":
        return f"logit capping method {layer.logit_capping_method!r} is not implemented"
    if getattr(getattr(pool, "cfg", None), "key_centers", None) and layer.logit_cap > 0:
        return (
            "its logit soft-cap does not ignore the score shift that key centering adds; "
            "use --kv-quant-key-centers none"
        )
    if getattr(layer, "xai_temperature_len", -1) != -1:
        return "xai temperature scaling is not implemented"
    if layer.qk_head_dim != pool.head_dim or layer.v_head_dim != pool.head_dim:
        return f"its head dims {layer.qk_head_dim}/{layer.v_head_dim} differ from the pool's {pool.head_dim}"
    if layer.tp_k_head_num != pool.head_num:
        return f"it has {layer.tp_k_head_num} KV heads but the pool holds {pool.head_num}"
    if layer.tp_q_head_num % layer.tp_k_head_num:
        return "its query heads are not a multiple of its KV heads"
    return None

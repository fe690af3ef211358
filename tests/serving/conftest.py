"""tests/serving: the plugin inside SGLang 0.5.17 (flags, refusals, pools, backends, patches).

Shared here: the dummy model configs, ServerArgs as a launch on a fake 80 GB GPU resolves
them, SGLang's own KVCacheConfigurator filled for a CPU test, the stock ServerArgs and
ModelConfig fields the refusals read, and the fixtures ``plugin``, ``fake_gpu``, ``parallel``.
"""

import dataclasses
import types

import pytest
import sglang.srt.server_args as sglang_server_args
import torch
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.runtime_context import get_parallel
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from sglang_tq.serving.plugin import register
from tests.conftest import HAS_CUDA, MODEL_CONFIGS

# where Triton compiles the kernels: the GPU, or the interpreter on the CPU
DEV = "cuda" if HAS_CUDA else "cpu"

LLAMA_8B = str(MODEL_CONFIGS / "llama-3.1-8b")
GPT_OSS = str(MODEL_CONFIGS / "gpt-oss-20b")
DEEPSEEK_V2_LITE = str(MODEL_CONFIGS / "deepseek-v2-lite")
BASE = ["--model-path", LLAMA_8B, "--load-format", "dummy", "--skip-tokenizer-init"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plugin():
    """The plugin registered and SGLang's hooks applied, once per module that asks."""
    register()
    HookRegistry.apply_hooks()


@pytest.fixture
def fake_gpu(monkeypatch):
    """ServerArgs resolution asks the accelerator for its kind and memory size."""
    monkeypatch.setattr(sglang_server_args, "get_device", lambda *a, **k: "cuda")
    monkeypatch.setattr(sglang_server_args, "get_device_memory_capacity", lambda *a, **k: 80 * 1024)


@pytest.fixture(scope="module")
def parallel():
    with get_parallel().override(attn_tp_size=1, attn_tp_rank=0, attn_cp_size=1):
        yield


# ----------------------------------------------------------------------------- ServerArgs
def parse_server_args(*extra):
    """``prepare_server_args`` of the dummy Llama-3.1-8B (with ``plugin`` and ``fake_gpu``)."""
    return sglang_server_args.prepare_server_args([*BASE, *extra])


def make_server_args(*extra, model=LLAMA_8B):
    """ServerArgs of a dummy-weights launch of ``model`` with the plugin registered, on a
    fake 80 GB CUDA device."""
    register()
    HookRegistry.apply_hooks()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sglang_server_args, "get_device", lambda *a, **k: "cuda")
        mp.setattr(sglang_server_args, "get_device_memory_capacity", lambda *a, **k: 80 * 1024)
        return sglang_server_args.prepare_server_args(
            ["--model-path", model, "--load-format", "dummy", "--skip-tokenizer-init", *extra]
        )


def one_sentence(msg: str) -> bool:
    return msg.endswith(".") and ". " not in msg[:-1].replace("e.g. ", "")


def stock_fields(**overrides):
    """The ServerArgs fields the refusals read, at their stock values (on CUDA)."""
    defaults = {
        "attention_backend": "turboquant",
        "prefill_attention_backend": None,
        "decode_attention_backend": None,
        "kv_cache_dtype": "auto",
        "disaggregation_mode": "null",
        "disaggregation_decode_enable_offload_kvcache": False,
        "enable_hierarchical_cache": False,
        "hicache_storage_backend": None,
        "enable_lmcache": False,
        "enable_flexkv": False,
        "enable_hisparse": False,
        "speculative_algorithm": None,
        "dcp_size": 1,
        "attn_cp_size": 1,
        "enable_prefill_cp": False,
        "pp_size": 1,
        "enable_dp_attention": False,
        "enable_two_batch_overlap": False,
        "enable_pdmux": False,
        "enable_deterministic_inference": False,
        "enable_unified_memory": False,
        "enable_page_major_kv_layout": False,
        "prefill_only_disable_kv_cache": False,
        "kv_canary": "none",
        "device": "cuda",
        "tp_size": 1,
        "kv_quant_bf16_layers": (),
        "page_size": 1,
        "enable_lora": False,
        "lora_paths": None,
        "enable_torch_compile": False,
        "dp_size": 1,
    }
    return types.SimpleNamespace(**{**defaults, **overrides})


def fake_model_config(**overrides):
    """The ModelConfig fields the refusals read: Llama-3.1-8B's, unless overridden."""
    from sglang.srt.configs.model_config import AttentionArch

    hf = types.SimpleNamespace(architectures=[overrides.pop("arch", "LlamaForCausalLM")])
    fields = dict(
        attention_arch=AttentionArch.MHA,
        hf_config=hf,
        hf_text_config=hf,
        head_dim=128,
        v_head_dim=128,
        is_hybrid_swa=False,
        attention_chunk_size=None,
        is_encoder_decoder=False,
        has_attention_sinks=False,
        num_hidden_layers=32,
        get_total_num_kv_heads=lambda: 8,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


# ----------------------------------------------------------------------------- pool configurator
def kvc_fields(sa, dtype=torch.bfloat16):
    """The fields of KVCacheConfigurator that pool sizing and building read."""
    mc = sa.get_model_config()
    layers = mc.num_hidden_layers
    return types.SimpleNamespace(
        server_args=sa,
        model_config=mc,
        kv_cache_dtype=dtype,
        kv_cache_dtype_str="auto",
        model_dtype=dtype,
        use_mla_backend=False,
        is_draft_worker=False,
        spec_algorithm=SpeculativeAlgorithm.NONE,
        sliding_window_size=None,
        device="cpu",
        pool_page_size=1,
        ps=types.SimpleNamespace(pp_size=1),
        model=torch.nn.Module(),  # no attention module with a k_proj bias: auto centers nothing
        layer_info=types.SimpleNamespace(
            start_layer=0, end_layer=layers, num_effective_layers=layers
        ),
    )


def real_configurator(sa):
    """SGLang's own KVCacheConfigurator, with the fields a CPU test can fill."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.runtime_context import get_context

    get_context().set_server_args(sa)
    fake = kvc_fields(sa)
    fields = {f.name: None for f in dataclasses.fields(KVCacheConfigurator) if f.init}
    fields.update(
        {
            k: getattr(fake, k)
            for k in (
                "device",
                "model_config",
                "server_args",
                "kv_cache_dtype",
                "model_dtype",
                "sliding_window_size",
                "spec_algorithm",
                "is_draft_worker",
                "use_mla_backend",
                "kv_cache_dtype_str",
                "layer_info",
                "model",
            )
        }
    )
    fields.update(
        gpu_id=0,
        page_size=1,
        post_capture_kv_active=False,
        is_hybrid_swa=False,
        is_hybrid_swa_compress=False,
    )
    return KVCacheConfigurator(**fields)

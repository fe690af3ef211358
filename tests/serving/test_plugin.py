"""The plugin as SGLang 0.5.17 sees it: entry point, --help, flag parsing, start-up
refusals, and --kv-quant none leaving ServerArgs exactly as stock."""

import argparse
import json
import pickle
import subprocess
import sys
import types

import pytest
import sglang.srt.server_args as sglang_server_args
import torch
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs

from sglang_tq.serving import integration, refusals
from sglang_tq.serving.plugin import register
from tests.conftest import MODEL_CONFIGS, ROOT
from tests.serving.conftest import (
    BASE,
    GPT_OSS,
    LLAMA_8B,
    fake_model_config,
    one_sentence,
    parse_server_args,
    stock_fields,
)

pytestmark = pytest.mark.usefixtures("plugin")


# ------------------------------------------------------------------ entry point and flags
def test_entry_point_is_installed_and_zero_arg():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "turboquant"]
    assert ep.value == "sglang_tq.serving.plugin:register"
    func = ep.load()
    assert func is register
    func()  # idempotent: nothing registered twice
    for patch in integration.PATCHES:
        assert sum(h is patch.hook for _, h, _ in HookRegistry._hooks[patch.target]) == 1
    assert sglang_server_args.ATTENTION_BACKEND_CHOICES.count("turboquant") == 1


def test_every_patch_is_applied_and_named():
    names = [p.name for p in integration.PATCHES]
    assert len(set(names)) == len(names)
    assert {p.target for p in integration.PATCHES} <= HookRegistry._patched
    integration.verify_patches_applied()


def test_a_patch_sglang_failed_to_apply_stops_turboquant(monkeypatch):
    monkeypatch.setattr(
        HookRegistry, "_patched", set(HookRegistry._patched) - {integration.PATCHES[4].target}
    )
    with pytest.raises(RuntimeError, match="cell-size") as exc:
        integration.verify_patches_applied()
    assert one_sentence(str(exc.value))


def test_wrong_sglang_version_is_refused(monkeypatch):
    monkeypatch.setattr(integration.importlib.metadata, "version", lambda name: "0.5.18")
    with pytest.raises(RuntimeError, match="install sglang==0.5.17"):
        integration.check_sglang_version()


def test_help_lists_the_flags_with_defaults():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag, default in (
        ("--kv-quant {none,turboquant,hadamard,kivi}", "Default: none"),
        ("--kv-quant-bits", "Default: k4v4"),
        ("--kv-quant-seed", "Default: 0"),
        ("--kv-quant-bf16-layers", "Default: none"),
        ("--kv-quant-packed-prefill", "Default: off"),
        ("--kv-quant-key-centers", "'auto' (default)"),
    ):
        assert flag in text
        assert default in " ".join(text.split())
    assert "turboquant" in parser._option_string_actions["--attention-backend"].choices
    args = parser.parse_args(["--model-path", "x"])
    assert (
        args.kv_quant,
        args.kv_quant_bits,
        args.kv_quant_seed,
        args.kv_quant_bf16_layers,
        args.kv_quant_packed_prefill,
    ) == ("none", "k4v4", 0, (), False)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--kv-quant-bits", "k5v4"], "k4v4, k4v3, k3v3 or k4v2"),
        (["--kv-quant-bf16-layers", "0,x"], "comma-separated non-negative layer ids"),
        (["--kv-quant", "fp4"], "invalid choice"),
        (["--kv-quant-key-centers", "/no/such/centers.safetensors"], "sglang_tq.tools.key_centers"),
        (["--kv-quant-seed", "-3"], "--kv-quant-seed must be a non-negative integer"),
        (["--kv-quant-seed", "x"], "--kv-quant-seed must be a non-negative integer"),
    ],
)
def test_bad_flag_values_fail_in_argparse(argv, needle, capsys):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "x", *argv])
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------ ServerArgs
def test_turboquant_flags_reach_server_args_and_survive_pickling(fake_gpu):
    sa = parse_server_args(
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "K4V3",
        "--kv-quant-seed",
        "9",
        "--kv-quant-bf16-layers",
        "31,0",
        "--kv-quant-packed-prefill",
    )
    assert sa.attention_backend == "turboquant"
    assert (
        sa.kv_quant,
        sa.kv_quant_bits,
        sa.kv_quant_seed,
        sa.kv_quant_bf16_layers,
        sa.kv_quant_packed_prefill,
    ) == ("turboquant", "k4v3", 9, (0, 31), True)
    # the scheduler receives ServerArgs pickled (spawn)
    back = pickle.loads(pickle.dumps(sa))
    assert (back.kv_quant, back.kv_quant_bits, back.kv_quant_bf16_layers) == (
        "turboquant",
        "k4v3",
        (0, 31),
    )
    cfg = integration.tq_config(back, 128)
    assert (cfg.k_bits, cfg.v_bits, cfg.seed, cfg.bf16_layers) == (4, 3, 9, (0, 31))


def test_key_centers_flag_reaches_the_config(fake_gpu, tmp_path):
    path = tmp_path / "centers.safetensors"
    path.write_bytes(b"x")  # existence is checked here, contents when the pool is built
    sa = parse_server_args("--kv-quant", "turboquant", "--kv-quant-key-centers", str(path))
    assert sa.kv_quant_key_centers == str(path.resolve())
    assert integration.tq_config(pickle.loads(pickle.dumps(sa)), 128).key_centers == str(
        path.resolve()
    )
    assert (
        parse_server_args("--kv-quant", "turboquant").kv_quant_key_centers == "auto"
    )  # the default
    assert (
        parse_server_args(
            "--kv-quant", "turboquant", "--kv-quant-key-centers", "none"
        ).kv_quant_key_centers
        is None
    )
    with pytest.raises(ValueError, match="need --kv-quant turboquant"):
        parse_server_args("--kv-quant-key-centers", str(path))


def test_triton_backend_maps_to_turboquant(fake_gpu):
    assert (
        parse_server_args(
            "--kv-quant", "turboquant", "--attention-backend", "triton"
        ).attention_backend
        == "turboquant"
    )
    assert (
        parse_server_args(
            "--kv-quant", "turboquant", "--attention-backend", "turboquant"
        ).attention_backend
        == "turboquant"
    )


def test_turboquant_backend_needs_kv_quant(fake_gpu):
    with pytest.raises(ValueError, match="needs --kv-quant turboquant") as exc:
        parse_server_args("--attention-backend", "turboquant")
    assert one_sentence(str(exc.value))


def test_engine_keyword_arguments(fake_gpu):
    sa = ServerArgs(
        model_path=LLAMA_8B,
        load_format="dummy",
        skip_tokenizer_init=True,
        kv_quant="turboquant",
        kv_quant_bits="k3v3",
        kv_quant_bf16_layers=[1],
    )
    assert (sa.attention_backend, sa.kv_quant_bits, sa.kv_quant_bf16_layers) == (
        "turboquant",
        "k3v3",
        (1,),
    )
    with pytest.raises(ValueError, match="--kv-quant must be one of"):
        ServerArgs(model_path=LLAMA_8B, kv_quant="int4")


def test_kv_quant_options_without_turboquant_are_refused(fake_gpu):
    with pytest.raises(ValueError, match="need --kv-quant turboquant") as exc:
        parse_server_args("--kv-quant-bits", "k3v3", "--kv-quant-packed-prefill")
    assert "--kv-quant-bits, --kv-quant-packed-prefill" in str(exc.value)
    assert one_sentence(str(exc.value))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--attention-backend", "flashinfer"],
            "--attention-backend must be turboquant, triton or unset",
        ),
        (["--decode-attention-backend", "fa3"], "--decode-attention-backend must be"),
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype must be auto or bf16"),
        (["--enable-hierarchical-cache"], "HiCache"),
        (["--kv-quant-bf16-layers", "40"], "has layers 0..31"),
        (["--kv-canary", "log"], "--kv-canary"),
    ],
)
def test_start_up_refusals_through_sglang(fake_gpu, argv, needle):
    with pytest.raises(ValueError, match=needle) as exc:
        parse_server_args("--kv-quant", "turboquant", *argv)
    msg = str(exc.value)
    assert one_sentence(msg) and "--kv-quant" in msg


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("disaggregation_mode", "prefill", "--disaggregation-mode"),
        (
            "disaggregation_decode_enable_offload_kvcache",
            True,
            "--disaggregation-decode-enable-offload-kvcache",
        ),
        ("enable_hierarchical_cache", True, "--enable-hierarchical-cache"),
        ("hicache_storage_backend", "file", "--hicache-storage-backend"),
        ("enable_lmcache", True, "--enable-lmcache"),
        ("speculative_algorithm", "EAGLE", "--speculative-algorithm"),
        ("dcp_size", 2, "--dcp-size"),
        ("pp_size", 2, "--pp-size"),
        ("enable_dp_attention", True, "--enable-dp-attention"),
        ("enable_two_batch_overlap", True, "--enable-two-batch-overlap"),
        ("enable_deterministic_inference", True, "--enable-deterministic-inference"),
        ("enable_unified_memory", True, "--enable-unified-memory"),
        ("device", "cpu", "--device"),
        ("attention_backend", "fa3", "--attention-backend"),
        ("prefill_attention_backend", "flashinfer", "--prefill-attention-backend"),
        ("kv_cache_dtype", "fp8_e5m2", "--kv-cache-dtype"),
        ("page_size", 16, "--page-size"),
        ("enable_lora", True, "--enable-lora"),
        ("lora_paths", ["a=/x"], "--lora-paths"),
        ("enable_torch_compile", True, "--enable-torch-compile"),
        ("dp_size", 2, "--dp-size"),
    ],
)
def test_each_flag_refusal_names_the_flag_and_the_alternative(field, value, flag):
    with pytest.raises(ValueError) as exc:
        refusals.check_server_args(stock_fields(**{field: value}))
    msg = str(exc.value)
    assert flag in msg and "--kv-quant none" in msg and one_sentence(msg), msg


@pytest.mark.parametrize("var", ["SGLANG_USE_HND_KVCACHE", "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING"])
def test_refusal_of_environment_layouts(var, monkeypatch):
    refusals.check_server_args(stock_fields())
    monkeypatch.setenv(var, "1")
    with pytest.raises(ValueError, match=f"unset {var}") as exc:
        refusals.check_server_args(stock_fields())
    assert one_sentence(str(exc.value))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(arch="DeepseekV3ForCausalLM", attention_arch="MLA"), "MLA models"),
        (dict(is_hybrid_swa=True, arch="Gemma3ForCausalLM"), "hybrid sliding-window"),
        (dict(attention_chunk_size=8192, arch="Llama4ForCausalLM"), "chunked local attention"),
        (dict(has_attention_sinks=True, arch="MiMoV2FlashForCausalLM"), "attention sinks"),
        (
            dict(is_hybrid_swa=True, is_hybrid_swa_compress=True, arch="GptOssForCausalLM"),
            "hybrid sliding-window",
        ),
        (dict(head_dim=96, v_head_dim=96), r"head dims in \(64, 128, 256\)"),
        (dict(v_head_dim=64), "v_head_dim=64"),
        (dict(arch="Gemma2ForCausalLM"), "not Gemma2ForCausalLM"),
        (dict(is_encoder_decoder=True, arch="LlamaForCausalLM"), "decoder-only"),
    ],
)
def test_model_refusals(overrides, needle, monkeypatch):
    from sglang.srt.configs import hybrid_arch
    from sglang.srt.configs.model_config import AttentionArch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    if overrides.get("attention_arch") == "MLA":
        overrides["attention_arch"] = AttentionArch.MLA
    with pytest.raises(ValueError, match=needle) as exc:
        refusals.check_model_config(fake_model_config(**overrides))
    msg = str(exc.value)
    assert "--kv-quant" in msg and one_sentence(msg), msg


@pytest.mark.parametrize(
    "quant, refused",
    [
        ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}, True),
        ({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "fp8"}}, True),
        (
            {
                "quant_method": "compressed-tensors",
                "kv_cache_scheme": {"type": "float", "num_bits": 8},
            },
            True,
        ),
        ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None}, False),
        (None, False),
    ],
)
def test_fp8_kv_checkpoint_is_refused_at_launch(monkeypatch, quant, refused):
    """--kv-cache-dtype auto follows a checkpoint's FP8 KV config in the scheduler; the
    launcher reads the same config and refuses first, unless --kv-cache-dtype bf16."""
    from sglang.srt.configs import hybrid_arch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    mc = fake_model_config(_parse_quant_hf_config=lambda: None if quant is None else dict(quant))
    assert refusals.checkpoint_kv_quant(mc) == ("FP8" if refused else None)
    refusals.check_model_config(mc, stock_fields(kv_cache_dtype="bf16"))
    if not refused:
        refusals.check_model_config(mc, stock_fields())
        return
    with pytest.raises(ValueError, match="pass --kv-cache-dtype bf16") as exc:
        refusals.check_model_config(mc, stock_fields())
    assert one_sentence(str(exc.value))


@pytest.mark.parametrize("mode", ["turboquant", "kivi"])
def test_token_ids_outside_the_vocabulary_are_refused(mode):
    """SGLang 0.5.17 never calls its own vocabulary check; the plugin's patch does, so an
    id past the embedding table is one sentence (HTTP 400), not an out-of-bounds lookup."""
    tm = types.SimpleNamespace(
        server_args=types.SimpleNamespace(kv_quant=mode),
        model_config=types.SimpleNamespace(vocab_size=1000),
    )
    assert integration._validate_one_request(None, tm, object(), [0, 5, 999]) is None
    for ids, bad in (([3, 1000, 7], 1000), ([-1, 2], -1)):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary") as exc:
            integration._validate_one_request(None, tm, object(), ids)
        assert one_sentence(str(exc.value))
    stock = types.SimpleNamespace(
        server_args=types.SimpleNamespace(kv_quant="none"), model_config=tm.model_config
    )
    assert integration._validate_one_request(None, stock, object(), [5000]) is None  # stock
    assert integration._validate_one_request(None, tm, object(), None) is None  # text input


def test_hybrid_linear_and_tensor_parallel_refusals(monkeypatch):
    from sglang.srt.configs import hybrid_arch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: object())
    refusals.check_model_config(
        fake_model_config(arch="Qwen3NextForCausalLM", head_dim=256, v_head_dim=256)
    )
    for arch, sa in (
        ("NemotronHForCausalLM", None),
        ("Qwen3NextForCausalLM", stock_fields(kv_quant="hadamard")),
    ):
        with pytest.raises(ValueError, match="hybrid linear-attention") as exc:
            refusals.check_model_config(fake_model_config(arch=arch), sa)
        assert one_sentence(str(exc.value))
    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    refusals.check_model_config(
        fake_model_config(), stock_fields(tp_size=16)
    )  # 8 KV heads replicated
    refusals.check_model_config(fake_model_config(), stock_fields(tp_size=4))
    with pytest.raises(ValueError, match="--tp-size 3"):
        refusals.check_model_config(fake_model_config(), stock_fields(tp_size=3))


GEMMA3_270M = str(MODEL_CONFIGS / "gemma-3-270m")
QWEN3_NEXT = str(MODEL_CONFIGS / "qwen3-next-small")


def test_sliding_window_and_hybrid_linear_models_start(fake_gpu, monkeypatch):
    """Gemma 3 (sliding-window layers on SGLang's plain pool: it turns hybrid SWA memory off)
    and Qwen3-Next (full-attention layers in SGLang's hybrid linear pool) resolve with
    --kv-quant turboquant; a window model with mixed chunks is refused at launch."""
    tail = ["--load-format", "dummy", "--skip-tokenizer-init", "--kv-quant", "turboquant"]
    sa = sglang_server_args.prepare_server_args(["--model-path", GEMMA3_270M, *tail])
    assert sa.attention_backend == "turboquant" and sa.disable_hybrid_swa_memory
    with pytest.raises(ValueError, match="drop --enable-mixed-chunk") as exc:
        sglang_server_args.prepare_server_args(
            ["--model-path", GEMMA3_270M, *tail, "--enable-mixed-chunk"]
        )
    assert one_sentence(str(exc.value)) and "Gemma3ForCausalLM" in str(exc.value)
    monkeypatch.setattr(sglang_server_args, "is_cuda", lambda: True)  # SGLang's FLA check for GDN
    sa = sglang_server_args.prepare_server_args(["--model-path", QWEN3_NEXT, *tail])
    assert sa.kv_quant == "turboquant"
    # gpt-oss: SGLang's own backend assert sees our backend as the Triton one it is
    sa = sglang_server_args.prepare_server_args(
        ["--model-path", GPT_OSS, *tail, "--kv-quant-packed-prefill"]
    )
    assert sa.attention_backend == "turboquant" and not sa.disable_hybrid_swa_memory
    with pytest.raises(ValueError, match="drop --enable-mixed-chunk") as exc:
        sglang_server_args.prepare_server_args(
            ["--model-path", GPT_OSS, *tail, "--enable-mixed-chunk"]
        )
    assert one_sentence(str(exc.value))
    with pytest.raises(
        AssertionError, match="GptOssForCausalLM requires one of"
    ):  # stock, unchanged
        sglang_server_args.prepare_server_args(
            ["--model-path", GPT_OSS, *tail[:3], "--attention-backend", "flashinfer"]
        )


def test_sliding_window_context_is_refused_only_for_the_simulated_formats():

    kvc = types.SimpleNamespace(
        kv_cache_dtype=torch.bfloat16,
        sliding_window_size=511,
        is_draft_worker=False,
        server_args=types.SimpleNamespace(kv_quant="turboquant"),
    )
    refusals.check_kv_context(kvc)
    kvc.server_args.kv_quant = "hadamard"
    with pytest.raises(RuntimeError, match="sliding-window attention") as exc:
        refusals.check_kv_context(kvc)
    assert one_sentence(str(exc.value))


def test_backend_refuses_layers_the_kernels_do_not_implement():
    from sglang.srt.layers.radix_attention import RadixAttention

    pool = types.SimpleNamespace(head_dim=128, head_num=8, start_layer=0, layer_num=32)
    ok = dict(num_heads=32, head_dim=128, scaling=0.1, num_kv_heads=8, layer_id=3)
    runner = types.SimpleNamespace(
        sliding_window_size=None,
        use_mla_backend=False,
        model_config=types.SimpleNamespace(is_encoder_decoder=False),
    )
    runner.model = types.SimpleNamespace(modules=lambda: [RadixAttention(**ok)])
    refusals.check_model_layers(runner, pool)
    # a sliding-window layer runs (the backend reads SGLang's window metadata), as Gemma 3's do
    runner.sliding_window_size = 511
    runner.model = types.SimpleNamespace(
        modules=lambda: [RadixAttention(**ok, sliding_window_size=511)]
    )
    refusals.check_model_layers(runner, pool)
    for bad, needle in (
        (dict(is_cross_attention=True), "not causal"),
        (dict(num_kv_heads=4), "4 KV heads"),
        (dict(layer_id=40), "outside the KV pool"),
    ):
        runner.model = types.SimpleNamespace(modules=lambda: [RadixAttention(**{**ok, **bad})])
        with pytest.raises(RuntimeError, match=needle) as exc:
            refusals.check_model_layers(runner, pool)
        assert one_sentence(str(exc.value)) and "--kv-quant none" in str(exc.value)
    # key centers shift every score of a query, which a logit soft-cap does not ignore
    capped = dict(ok, logit_cap=30.0)
    runner.model = types.SimpleNamespace(modules=lambda: [RadixAttention(**capped)])
    refusals.check_model_layers(runner, pool)
    centered = types.SimpleNamespace(
        **vars(pool), cfg=types.SimpleNamespace(key_centers="c.safetensors")
    )
    with pytest.raises(RuntimeError, match="use --kv-quant-key-centers none") as exc:
        refusals.check_model_layers(runner, centered)
    assert one_sentence(str(exc.value))


def test_server_info_reports_the_settings(fake_gpu):
    sa = parse_server_args("--kv-quant", "turboquant", "--kv-quant-bits", "k4v2")
    manager = types.SimpleNamespace(server_args=sa)
    info = {"model_path": LLAMA_8B}
    integration._resolved_config_dict(info, manager, {})
    assert info["kv_quant"] == "turboquant" and info["kv_quant_bits"] == "k4v2"
    stock = {"model_path": LLAMA_8B}
    integration._resolved_config_dict(
        stock, types.SimpleNamespace(server_args=parse_server_args()), {}
    )
    assert stock == {"model_path": LLAMA_8B}


# ------------------------------------------------------------ --kv-quant none is stock
_STOCK_CHECK = """
import json
import sglang.srt.server_args as S
S.get_device = lambda *a, **k: "cuda"
S.get_device_memory_capacity = lambda *a, **k: 80 * 1024
argv = json.loads({argv!r})

def snapshot(extra):
    sa = S.prepare_server_args(argv + extra)
    state = {{k: repr(v) for k, v in vars(sa).items() if k not in ("random_seed", "model_config")}}
    return state, type(sa.model_config).__name__

stock = snapshot([])
from sglang_tq.serving.plugin import register
from sglang.srt.plugins.hook_registry import HookRegistry
register()
HookRegistry.apply_hooks()
print(json.dumps({{"stock": stock, "none": snapshot(["--kv-quant", "none"]), "unset": snapshot([]),
                   "patched": sorted(HookRegistry._patched)}}))
"""


def test_kv_quant_none_leaves_server_args_exactly_stock():
    # A fresh interpreter, so that "stock" is SGLang before the plugin is registered.
    code = _STOCK_CHECK.format(argv=json.dumps(BASE))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["patched"]) == len(integration.PATCHES)
    assert result["none"] == result["stock"]
    assert result["unset"] == result["stock"]
    # SGLang resolved its own backend (triton on a CPU host, fa3 on a Hopper GPU), not ours
    assert result["stock"][0]["attention_backend"] not in ("None", "'turboquant'")


def test_engine_style_options_parse_strictly():
    """Engine(**kwargs) hands the user's values as they are: "false" must not turn a switch on."""
    norm = integration.normalize_options
    base = {"kv_quant": "turboquant"}
    assert norm({**base, "kv_quant_packed_prefill": "false"})["kv_quant_packed_prefill"] is False
    assert norm({**base, "kv_quant_packed_prefill": "True"})["kv_quant_packed_prefill"] is True
    assert norm({**base, "kv_quant_packed_prefill": 0})["kv_quant_packed_prefill"] is False
    with pytest.raises(ValueError, match="is a switch: give True or False"):
        norm({**base, "kv_quant_packed_prefill": "maybe"})
    assert norm({**base, "kv_quant_seed": "7"})["kv_quant_seed"] == 7
    for bad in (-1, "-1", 1.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            norm({**base, "kv_quant_seed": bad})


def test_float32_model_is_refused_at_launch(fake_gpu):
    with pytest.raises(ValueError, match="--dtype float32 cannot be served; use --dtype bfloat16"):
        parse_server_args("--kv-quant", "turboquant", "--dtype", "float32")

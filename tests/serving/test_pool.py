"""The packed KV pool: sizing arithmetic, SGLang's pool configurator through our hooks,
and writes through ``set_kv_buffer`` read back by the decode kernel (Triton
interpreter on CPU) against the torch reference."""

import contextlib
import inspect
import types

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

from sglang_tq.config import TQConfig
from sglang_tq.kernels.tq_decode import (
    DecodeWorkspace,
    attention_ref,
    tq_decode,
    tq_decode_ref,
)
from sglang_tq.serving import integration
from sglang_tq.serving.pool import TQTokenToKVPool, bytes_per_token
from tests.conftest import HAS_CUDA
from tests.serving.conftest import DEV, GPT_OSS, kvc_fields, make_server_args, real_configurator

GB = 1 << 30


# ------------------------------------------------------------------------ arithmetic
def test_llama_8b_bytes_per_token():
    cfg = TQConfig(head_dim=128)
    assert cfg.bytes_per_token_per_head == 132
    tq = bytes_per_token(cfg, range(32), num_kv_heads=8)
    assert tq == 33_792
    bf16 = 32 * 8 * 2 * 128 * 2
    assert bf16 == 131_072
    assert round(bf16 / tq, 2) == 3.88
    with_boundary = bytes_per_token(TQConfig(head_dim=128, bf16_layers=(0, 31)), range(32), 8)
    assert with_boundary == 30 * 8 * 132 + 2 * 8 * 512 == 39_872
    assert bytes_per_token(TQConfig(head_dim=128, k_bits=4, v_bits=2), range(32), 8) == 32 * 8 * (
        64 + 32 + 4
    )
    assert bytes_per_token(TQConfig(head_dim=128, k_bits=3, v_bits=3), range(32), 8) == 32 * 8 * (
        48 + 48 + 4
    )


@pytest.mark.parametrize("bits, bf16_layers", [("k4v4", ()), ("k3v3", ()), ("k4v2", (0, 3))])
def test_pool_allocates_exactly_the_cell_size(bits, bf16_layers):
    k_bits, v_bits = TQConfig.parse_bits(bits)
    cfg = TQConfig(head_dim=128, k_bits=k_bits, v_bits=v_bits, bf16_layers=bf16_layers)
    size, page, layers, heads = 29, 1, 4, 8
    pool = TQTokenToKVPool(size, page, heads, 128, layers, "cpu", False, cfg=cfg)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == bytes_per_token(cfg, range(layers), heads) * (size + page)
    assert pool.dtype == torch.uint8  # SGLang's fused set-KV test needs bf16: off by construction
    layer = pool.get_packed_layer(1)
    assert layer.k_codes.shape == (size + page, heads, 128 * k_bits // 8)
    assert layer.k_codes.dtype == torch.uint8 and layer.k_norms.dtype == torch.float16
    assert layer.v_norms.shape == (size + page, heads)


# --------------------------------------------------------- SGLang's configurator + hooks
def test_cell_size_hook_grants_3_88x_the_tokens_less_the_prefill_scratch(parallel):
    """Llama-3.1-8B: 3.88x the tokens per byte; the prefill scratch (context_len = 131072
    rows of dense K/V, 8 heads x 128 x 2 x bf16 = 512 MiB) comes out of the budget first."""
    stock = DefaultPoolConfigurator(kvc_fields(make_server_args()))
    tq = DefaultPoolConfigurator(kvc_fields(make_server_args("--kv-quant", "turboquant")))
    assert stock._cell_size == 131_072
    assert tq._cell_size == 33_792
    scratch = 131_072 * 2 * 8 * 128 * 2
    assert tq._tq_prefill_scratch_bytes == scratch == 512 * (1 << 20)
    budget = 40 * GB
    stock_tokens = stock.calculate_pool_sizes(budget, page_size=1).max_total_num_tokens
    tq_tokens = tq.calculate_pool_sizes(budget, page_size=1).max_total_num_tokens
    assert stock_tokens == budget // 131_072 and tq_tokens == (budget - scratch) // 33_792
    assert round(tq_tokens / stock_tokens, 2) == 3.83
    assert (
        tq.calculate_pool_sizes(budget, page_size=16).max_total_num_tokens == tq_tokens // 16 * 16
    )
    with pytest.raises(RuntimeError, match="sets aside 512 MiB for the prefill scratch"):
        tq.calculate_pool_sizes(scratch, page_size=1)
    mixed = DefaultPoolConfigurator(
        kvc_fields(make_server_args("--kv-quant", "turboquant", "--kv-quant-bf16-layers", "0,31"))
    )
    assert mixed._cell_size == 39_872
    every = ",".join(str(i) for i in range(32))  # no packed layer: no scratch either
    plain = DefaultPoolConfigurator(
        kvc_fields(make_server_args("--kv-quant", "turboquant", "--kv-quant-bf16-layers", every))
    )
    assert plain._tq_prefill_scratch_bytes == 0
    assert plain.calculate_pool_sizes(budget, 1).max_total_num_tokens == budget // plain._cell_size


def test_hybrid_swa_sizing_and_build_use_packed_pools(parallel, monkeypatch):
    """gpt-oss-20b (12 full + 12 window layers of 8 KV heads x 64): SGLang's hybrid-SWA
    sizing by packed bytes (k4v4: 8 x 68 B per layer and token, cell = 12 F + 0.8 x 12 S),
    the prefill scratch out of the budget, and SWAKVPool built with packed "Full" and "SWA"
    inner pools holding the right model layers."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.model_executor.pool_configurator import (
        HybridSWAPoolConfigurator,
        SWAChunkCapPoolConfigurator,
    )

    def kvc_of(*flags):
        kvc = kvc_fields(make_server_args(*flags, model=GPT_OSS))
        kvc.sliding_window_size, kvc.page_size = 127, 1
        kvc.ps = types.SimpleNamespace(pp_size=1, attn_dp_size=1)
        return kvc

    stock = HybridSWAPoolConfigurator(kvc_of())
    kvc = kvc_of("--kv-quant", "turboquant")
    mc = kvc.model_config
    assert (
        mc.is_hybrid_swa
        and len(mc.full_attention_layer_ids) == len(mc.swa_attention_layer_ids) == 12
    )
    tq = HybridSWAPoolConfigurator(kvc)
    assert stock._cell_size == pytest.approx(2048 * 12 + 0.8 * 2048 * 12)
    assert tq._full_per_token == tq._swa_per_token == 8 * 68
    assert tq._cell_size == pytest.approx(544 * 12 + 0.8 * 544 * 12)  # 11,750.4 B: 3.76x the tokens
    scratch = mc.context_len * 2 * 8 * 64 * 2
    assert tq._tq_prefill_scratch_bytes == scratch
    budget = 8 * GB
    sizes = tq.calculate_pool_sizes(budget, page_size=1)
    assert sizes.full_max_total_num_tokens == int((budget - scratch) // tq._cell_size)
    assert sizes.swa_max_total_num_tokens == int(sizes.full_max_total_num_tokens * 0.8)
    # the chunk-capped variant (radix cache off, explicit max requests) runs the same hooks
    capped = SWAChunkCapPoolConfigurator(
        kvc_of("--kv-quant", "turboquant", "--disable-radix-cache", "--max-running-requests", "8")
    )
    assert capped._swa_per_token == 544 and capped._tq_prefill_scratch_bytes == scratch
    assert capped.calculate_pool_sizes(budget, 1).max_total_num_tokens == pytest.approx(
        (
            budget
            - scratch
            - capped.calculate_pool_sizes(budget, 1).swa_max_total_num_tokens * 544 * 12
        )
        // (544 * 12),
        abs=1,
    )

    builder = types.SimpleNamespace(
        server_args=kvc.server_args,
        model_config=mc,
        kv_cache_dtype=torch.bfloat16,
        kv_cache_dtype_str="auto",
        pool_page_size=1,
        post_capture_kv_active=False,
        is_hybrid_swa_compress=False,
        is_inkling_mtp_draft=False,
        draft_swa_full_capacity=False,
        device="cpu",
        model=torch.nn.Module(),
        is_draft_worker=False,
        sliding_window_size=127,
    )
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    from sglang.srt.mem_cache import kv_cache_configurator  # its runtime context, unpublished here

    monkeypatch.setattr(
        kv_cache_configurator, "get_spec", lambda: types.SimpleNamespace(speculative_algorithm=None)
    )
    pool = KVCacheConfigurator._build_hybrid_swa_kv_pool(
        builder,
        full_max_total_num_tokens=64,
        swa_max_total_num_tokens=48,
        mha_pool_class=MHATokenToKVPool,
    )
    assert isinstance(pool, SWAKVPool) and pool._tq_packed
    assert isinstance(pool.full_kv_pool, TQTokenToKVPool) and isinstance(
        pool.swa_kv_pool, TQTokenToKVPool
    )
    assert pool.full_kv_pool.size == 64 and pool.swa_kv_pool.size == 48
    idx, is_swa = pool.layers_mapping[0]
    assert is_swa and pool.swa_kv_pool.get_packed_layer(
        idx
    ).codec.seed == pool.full_kv_pool.cfg.layer_seed(0)
    integration._after_build_token_to_kv_pool(
        pool, types.SimpleNamespace(server_args=kvc.server_args)
    )
    # stock SGLang without --kv-quant: the hook passes through
    stock_builder = types.SimpleNamespace(**{**vars(builder), "server_args": kvc_of().server_args})
    plain = KVCacheConfigurator._build_hybrid_swa_kv_pool(
        stock_builder,
        full_max_total_num_tokens=64,
        swa_max_total_num_tokens=48,
        mha_pool_class=MHATokenToKVPool,
    )
    assert type(plain.full_kv_pool) is MHATokenToKVPool


def test_cell_size_of_a_hybrid_linear_model_counts_its_attention_layers(parallel, monkeypatch):
    """SGLang sizes a hybrid linear-attention model's KV by its full-attention layers only
    (DefaultPoolConfigurator with mambaish layer ids); the cell-size hook counts the same
    layers, by model id, instead of refusing the layer count."""
    import sglang.srt.model_executor.pool_configurator as configurator
    from sglang.srt.configs import hybrid_arch

    sa = make_server_args(
        "--kv-quant", "turboquant", "--kv-quant-bf16-layers", "7"
    )  # launch: Llama
    hybrid = types.SimpleNamespace(full_attention_layer_ids=[3, 7, 11, 15, 19, 23, 27, 31])
    for mod in (hybrid_arch, configurator):
        monkeypatch.setattr(mod, "mambaish_config", lambda mc: hybrid, raising=False)
    cell = DefaultPoolConfigurator(kvc_fields(sa))._cell_size
    assert cell == bytes_per_token(
        TQConfig(head_dim=128, bf16_layers=(7,)), hybrid.full_attention_layer_ids, 8
    )
    assert cell == 7 * 8 * 132 + 8 * 512


def test_hybrid_linear_pool_is_built_with_packed_full_attention_pools(parallel, monkeypatch):
    """The build hook hands SGLang's own _build_hybrid_linear_kv_pool the packed inner-pool
    factory: full-attention model layers 3 and 7 become one packed pool (rotation seeds by
    model id), the recurrent state pool stays SGLang's, and the pool guard accepts it;
    --kv-quant none builds SGLang's stock pool."""
    from sglang.srt.configs import hybrid_arch
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool
    from sglang.srt.runtime_context import get_context

    from sglang_tq.format.codec import LayerCodec

    built = {}
    for kv_quant in ("turboquant", "none"):
        sa = make_server_args("--kv-quant", kv_quant)
        get_context().set_server_args(sa)
        kvc = kvc_fields(sa)
        hybrid = types.SimpleNamespace(full_attention_layer_ids=[3, 7])
        kvc.mambaish_config, kvc.post_capture_kv_active = hybrid, False
        kvc._build_fp4_quant_method = lambda num_layers: None
        monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: hybrid)
        monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
        built[kv_quant] = KVCacheConfigurator._build_hybrid_linear_kv_pool(
            kvc,
            max_total_num_tokens=16,
            req_to_token_pool=types.SimpleNamespace(mamba_pool=None),
            mha_pool_class=MHATokenToKVPool,
        )
        monkeypatch.undo()
        assert integration._after_build_token_to_kv_pool(built[kv_quant], kvc) is None
    tq, stock = built["turboquant"], built["none"]
    assert isinstance(tq, HybridLinearKVPool) and isinstance(tq.full_kv_pool, TQTokenToKVPool)
    assert tq.full_kv_pool.global_layer_ids == (3, 7)
    assert torch.equal(
        tq.full_kv_pool.get_packed_layer(1).codec.pi,
        LayerCodec.create(128, 4, 4, seed=TQConfig(head_dim=128).layer_seed(7)).pi,
    )
    assert type(stock.full_kv_pool) is MHATokenToKVPool


@pytest.mark.parametrize(
    "kv_quant, pool_class", [("none", MHATokenToKVPool), ("turboquant", TQTokenToKVPool)]
)
def test_sglang_configurator_builds_the_pool_it_sized(parallel, kv_quant, pool_class):
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator

    kvc = real_configurator(make_server_args("--kv-quant", kv_quant))
    cell = create_memory_pool_configurator(kvc)._cell_size
    assert cell == {"none": 131_072, "turboquant": 33_792}[kv_quant]
    pool = kvc._build_token_to_kv_pool(
        sizes=types.SimpleNamespace(max_total_num_tokens=64),
        is_dsa_model=False,
        is_dsv4_model=False,
        req_to_token_pool=None,
    )
    assert type(pool) is pool_class
    assert sum(pool.get_kv_size_bytes()) == cell * (64 + 1)


def test_build_pool_hook_builds_what_the_cell_size_promised(parallel, monkeypatch):
    sa = make_server_args(
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k4v3",
        "--kv-quant-bf16-layers",
        "31",
        "--kv-quant-seed",
        "5",
    )
    kvc = kvc_fields(sa)
    kvc.pool_page_size = 1
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)

    def stock_builder(*a, **kw):
        raise AssertionError("the stock MHA pool must not be built with --kv-quant turboquant")

    pool = integration._build_mha_kv_pool(
        stock_builder,
        kvc,
        max_total_num_tokens=17,
        mha_pool_class=MHATokenToKVPool,
        quant_method=None,
    )
    assert isinstance(pool, TQTokenToKVPool)
    assert (pool.cfg.k_bits, pool.cfg.v_bits, pool.cfg.seed, pool.cfg.bf16_layers) == (
        4,
        3,
        5,
        (31,),
    )
    assert (pool.head_num, pool.head_dim, pool.layer_num) == (8, 128, 32)
    cell = DefaultPoolConfigurator(kvc)._cell_size
    assert sum(pool.get_kv_size_bytes()) == cell * (17 + 1)
    assert integration._after_build_token_to_kv_pool(pool, kvc) is None


def test_pool_hooks_refuse_what_they_cannot_build(parallel, monkeypatch):
    kvc = kvc_fields(make_server_args("--kv-quant", "turboquant"))
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    kvc.kv_cache_dtype = torch.float8_e4m3fn
    with pytest.raises(RuntimeError, match="--kv-cache-dtype bf16"):
        DefaultPoolConfigurator(kvc)
    kvc.kv_cache_dtype = torch.float32  # a float32 model is not told "(an FP8-KV checkpoint?)"
    with pytest.raises(RuntimeError, match=r"resolved to float32 .* use --dtype bfloat16"):
        DefaultPoolConfigurator(kvc)
    kvc.kv_cache_dtype = torch.bfloat16
    kvc.sliding_window_size = 511  # window layers on the plain pool (Gemma 3) build as usual
    assert isinstance(
        integration._build_mha_kv_pool(
            None, kvc, max_total_num_tokens=8, mha_pool_class=MHATokenToKVPool, quant_method=None
        ),
        TQTokenToKVPool,
    )
    kvc.sliding_window_size = None
    with pytest.raises(RuntimeError, match="--enable-page-major-kv-layout"):
        integration._build_mha_kv_pool(
            None, kvc, max_total_num_tokens=8, mha_pool_class=object, quant_method=None
        )
    with pytest.raises(RuntimeError, match="could not install its packed pool"):
        integration._after_build_token_to_kv_pool(object(), kvc)


def test_pool_hooks_pass_through_without_turboquant(parallel):
    kvc = kvc_fields(make_server_args())
    sentinel = object()
    seen = {}

    def stock_builder(self, **kw):
        seen.update(kw, self=self)
        return sentinel

    kwargs = dict(max_total_num_tokens=8, mha_pool_class=MHATokenToKVPool, quant_method=None)
    assert integration._build_mha_kv_pool(stock_builder, kvc, **kwargs) is sentinel
    assert seen == {**kwargs, "self": kvc}
    assert integration._after_build_token_to_kv_pool(sentinel, kvc) is None


def test_fused_set_kv_is_off_only_for_the_packed_pool(monkeypatch):
    from sglang.srt.model_executor import forward_context

    cfg = TQConfig(head_dim=64)
    pool = TQTokenToKVPool(8, 1, 1, 64, 1, "cpu", False, cfg=cfg)
    monkeypatch.setattr(integration, "_packed_pool_class", None)  # stock process: never looks
    assert integration._enable_fused_set_kv_buffer(lambda fb: "stock", None) == "stock"
    monkeypatch.setattr(integration, "_packed_pool_class", TQTokenToKVPool)
    monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: pool)
    assert integration._enable_fused_set_kv_buffer(lambda fb: True, None) is False
    monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: object())
    assert integration._enable_fused_set_kv_buffer(lambda fb: "stock", None) == "stock"


# ------------------------------------------------------- SGLANG_DEBUG_MEMORY_POOL checks
@pytest.mark.parametrize(
    "env, fwht, env_rows, rows", [(None, True, None, 8), ("1", True, "3", 3), ("0", False, "0", 0)]
)
def test_fwht_switch_reaches_the_store(monkeypatch, env, fwht, env_rows, rows):
    """SGLANG_TQ_FWHT (read once per pool; unset = 1): the store rotates by the fast
    Walsh-Hadamard transform, or with 0 by the dense product; SGLANG_TQ_STORE_ROW_TOKENS
    (unset = 8) reaches it as ``row_tokens``; the store never launches with PDL (its next
    kernel, the decode's stage 1, would wait on SMs); it writes the reference's codes either
    way; a bad value of either is one sentence."""
    from sglang_tq.format.codec import LayerCodec
    from sglang_tq.format.packing import unpack
    from sglang_tq.kernels import tq_store

    seen = []
    real = tq_store.tq_store_kv
    monkeypatch.setattr(
        "sglang_tq.serving.pool._store_kv", lambda *a, **kw: seen.append(kw) or real(*a, **kw)
    )
    if env is None:
        monkeypatch.delenv("SGLANG_TQ_FWHT", raising=False)
    else:
        monkeypatch.setenv("SGLANG_TQ_FWHT", env)
    if env_rows is None:
        monkeypatch.delenv("SGLANG_TQ_STORE_ROW_TOKENS", raising=False)
    else:
        monkeypatch.setenv("SGLANG_TQ_STORE_ROW_TOKENS", env_rows)
    cfg = TQConfig(head_dim=64, k_bits=3, v_bits=4)
    pool = TQTokenToKVPool(12, 1, 2, 64, 1, DEV, False, cfg=cfg)
    k = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    loc = torch.arange(5) + 3
    pool.set_kv_buffer(types.SimpleNamespace(layer_id=0), loc.to(DEV), k.to(DEV), k.to(DEV))
    assert pool.fwht == fwht and seen == [{"fwht": fwht, "row_tokens": rows}]
    # ... and without PDL: the launcher's default, which the pool does not override
    assert inspect.signature(tq_store.tq_store_kv).parameters["pdl"].default is False
    packed = pool.get_packed_layer(0)
    codec = LayerCodec.create(64, 3, 4, seed=packed.codec.seed)
    want = codec.alloc_buffers(packed.k_codes.shape[0], 2)
    tq_store.tq_store_kv_ref(k, k, loc, *want, codec)
    diff = (unpack(packed.k_codes.cpu(), 3, 64).int() - unpack(want[0], 3, 64).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2
    monkeypatch.setenv("SGLANG_TQ_FWHT", "yes")
    with pytest.raises(ValueError, match="SGLANG_TQ_FWHT must be 0 or 1"):
        TQTokenToKVPool(12, 1, 2, 64, 1, "cpu", False, cfg=cfg)
    monkeypatch.setenv("SGLANG_TQ_FWHT", "1")
    monkeypatch.setenv("SGLANG_TQ_STORE_ROW_TOKENS", "-1")
    with pytest.raises(ValueError, match="SGLANG_TQ_STORE_ROW_TOKENS must be a token count"):
        TQTokenToKVPool(12, 1, 2, 64, 1, "cpu", False, cfg=cfg)


@pytest.mark.parametrize("debug", ["0", "1"])
def test_debug_pool_checks_slots_and_norm_overflow(monkeypatch, debug):
    monkeypatch.setenv("SGLANG_DEBUG_MEMORY_POOL", debug)
    cfg = TQConfig(head_dim=64, bf16_layers=(0,))
    pool = TQTokenToKVPool(7, 1, 2, 64, 2, DEV, False, cfg=cfg)  # 8 slots
    layer = types.SimpleNamespace(layer_id=1)
    k = torch.randn(3, 2, 64, device=DEV, dtype=torch.bfloat16)
    pool.set_kv_buffer(layer, torch.tensor([1, 5, 7], device=DEV), k, k)  # in range: fine
    if debug == "0":
        return  # no checks, no synchronization by default
    with pytest.raises(IndexError, match=r"slots 1\.\.8 of a pool of 8"):
        pool.set_kv_buffer(layer, torch.tensor([1, 5, 8], device=DEV), k, k)
    big = k.clone()
    big[1, 0] = 3e4  # ‖v‖ = 2.4e5 > fp16 max
    with pytest.raises(ValueError, match=r"layer 1: a value vector's norm exceeds the fp16 range"):
        pool.set_kv_buffer(layer, torch.tensor([2, 3, 4], device=DEV), k, big)


# ------------------------------------------------------- SGLang's hybrid pools
def test_inner_pools_of_sglangs_hybrid_pools_use_model_layer_ids():
    """SGLang's SWAKVPool and HybridLinearKVPool build inner pools addressed 0..n-1; built
    through ``inner_pool_factory`` each takes its rotation seed, bf16 layers and key centers
    from the model's layer ids, and SWAKVPool's writes land in the SWA pool's slots."""
    from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool, KVWriteLoc
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from sglang_tq.format.codec import LayerCodec
    from sglang_tq.serving.pool import inner_pool_factory, packed_pools, resolve_layer

    d, heads = 64, 2
    cfg = TQConfig(head_dim=d, seed=3, bf16_layers=(2,))
    centers = torch.randn(8, heads, d, generator=torch.Generator().manual_seed(0)).to(DEV)
    common = dict(page_size=1, dtype=torch.bfloat16, head_num=heads, head_dim=d, device=DEV)
    swa = SWAKVPool(
        size=20,
        size_swa=10,
        swa_attention_layer_ids=[0, 2],
        full_attention_layer_ids=[1, 3],
        token_to_kv_pool_class=inner_pool_factory(cfg, {"Full": (1, 3), "SWA": (0, 2)}, centers),
        **common,
    )
    linear = HybridLinearKVPool(
        size=20,
        full_attention_layer_ids=[3, 7],
        mamba_pool=None,
        full_kv_pool_class=inner_pool_factory(cfg, {None: (3, 7)}, centers),
        **common,
    )
    for inner, ids in (
        (swa.full_kv_pool, (1, 3)),
        (swa.swa_kv_pool, (0, 2)),
        (linear.full_kv_pool, (3, 7)),
    ):
        assert isinstance(inner, TQTokenToKVPool) and inner.global_layer_ids == ids
        for local, g in enumerate(ids):
            if g == 2:  # --kv-quant-bf16-layers names model layer 2: the SWA pool's second
                assert not inner.is_packed_layer(local)
                continue
            codec = inner.get_packed_layer(local).codec
            assert torch.equal(
                codec.pi, LayerCodec.create(d, 4, 4, seed=cfg.layer_seed(g)).pi.to(DEV)
            )
            assert torch.equal(codec.k_center, centers[g])
    # the backend's way in: model layer id -> (packed pool, its id there)
    assert resolve_layer(swa, 2) == (swa.swa_kv_pool, 1) and resolve_layer(swa, 3) == (
        swa.full_kv_pool,
        1,
    )
    assert resolve_layer(linear, 7) == (linear.full_kv_pool, 1)
    assert packed_pools(swa) == [swa.full_kv_pool, swa.swa_kv_pool]
    assert packed_pools(linear) == [linear.full_kv_pool] and packed_pools(object()) == []
    with pytest.raises(RuntimeError, match="layer 4 has no KV cache in the HybridLinearKVPool"):
        resolve_layer(linear, 4)
    k = torch.randn(3, heads, d).bfloat16().to(DEV)
    loc, swa_loc = torch.tensor([4, 5, 6], device=DEV), torch.tensor([1, 2, 3], device=DEV)
    swa.set_kv_buffer(types.SimpleNamespace(layer_id=0), KVWriteLoc(loc, swa_loc), k, k)
    assert (swa.swa_kv_pool.get_packed_layer(0).k_norms[swa_loc] > 0).all()
    assert (swa.swa_kv_pool.get_packed_layer(0).k_norms[loc] == 0).all()
    with pytest.raises(RuntimeError, match="cannot build SGLang's inner KV pool with"):
        inner_pool_factory(cfg, {None: (0,)})(size=4, layer_num=1, swa_head_num=8, **common)
    with pytest.raises(RuntimeError, match="no layer ids for SGLang's 'SWA' KV pool"):
        inner_pool_factory(cfg, {None: (0,)})(size=4, layer_num=1, allocation_label="SWA", **common)
    with pytest.raises(ValueError, match="global_layer_ids must name 2 layers"):
        inner_pool_factory(cfg, {None: (0,)})(size=4, layer_num=2, **common)


# ------------------------------------------------------- --enable-memory-saver
class _RecordingSaver:
    """Stands in for torch_memory_saver: remembers the tensors made inside a region (what
    release discards), so a test can fill them with garbage the way resume hands them back."""

    def __init__(self):
        self.inside, self.made = False, []

    @contextlib.contextmanager
    def region(self, tag, enable_cpu_backup=False):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def enabled(self):
        return True


def test_memory_saver_release_and_resume_keeps_the_codecs(monkeypatch):
    """Only codes, norms and bf16 K/V live in the KV region; after a release/resume (their
    bytes undefined) a fresh store and decode still match the reference, because the
    rotations, codebooks and key centers were never in the region."""
    import sglang.srt.mem_cache.memory_pool as sglang_pool

    from sglang_tq.format.codec import LayerCodec

    saver = _RecordingSaver()
    monkeypatch.setattr(sglang_pool.TorchMemorySaverAdapter, "create", lambda enable: saver)
    real_create, real_alloc = LayerCodec.create, LayerCodec.alloc_buffers

    def create(*a, **kw):
        assert not saver.inside, "a layer codec was made inside the KV memory-saver region"
        return real_create(*a, **kw)

    def alloc(self, *a, **kw):
        bufs = real_alloc(self, *a, **kw)
        saver.made.extend(bufs if saver.inside else ())
        return bufs

    monkeypatch.setattr(LayerCodec, "create", staticmethod(create))
    monkeypatch.setattr(LayerCodec, "alloc_buffers", alloc)
    hq, hkv, d = 4, 2, 64
    centers = torch.randn(2, hkv, d, generator=torch.Generator().manual_seed(3)).to(DEV)
    pool = TQTokenToKVPool(
        15, 1, hkv, d, 2, DEV, True, cfg=TQConfig(head_dim=d, seed=2), key_centers=centers
    )
    assert len(saver.made) == 2 * 4  # two packed layers' codes and norms, nothing else
    for t in saver.made:  # release, then resume: the region's bytes are undefined
        t.copy_(
            torch.randint(0, 255, t.shape).to(t.dtype)
            if t.dtype == torch.uint8
            else torch.full_like(t, float("nan"))
        )
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(9, hkv, d, generator=g).bfloat16().to(DEV) for _ in range(2))
    loc = torch.arange(1, 10, device=DEV)
    pool.set_kv_buffer(types.SimpleNamespace(layer_id=1), loc, k, v)
    packed = pool.get_packed_layer(1)
    assert torch.equal(packed.codec.k_center, centers[1])
    q = torch.randn(1, hq, d, generator=g).bfloat16().to(DEV)
    indptr = torch.tensor([0, 9], dtype=torch.int32, device=DEV)
    ws = DecodeWorkspace.create(1, hq, d, max_kv_splits=2, device=DEV)
    got = tq_decode(
        q,
        *packed[:4],
        indptr,
        loc,
        packed.codec,
        d**-0.5,
        num_kv_splits=torch.tensor([2], dtype=torch.int32, device=DEV),
        max_kv_splits=2,
        workspace=ws,
    )
    fresh = TQTokenToKVPool(
        15, 1, hkv, d, 2, DEV, False, cfg=TQConfig(head_dim=d, seed=2), key_centers=centers
    )
    fresh.set_kv_buffer(types.SimpleNamespace(layer_id=1), loc, k, v)
    want = tq_decode_ref(
        q, *fresh.get_packed_layer(1)[:4], indptr, loc, fresh.get_packed_layer(1).codec, d**-0.5
    )
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


# ------------------------------------------------------------------ write and read back
def test_set_kv_buffer_then_decode_kernel_matches_reference():
    hq, hkv, d, slots = 8, 2, 64, 40
    cfg = TQConfig(head_dim=d, k_bits=4, v_bits=3, seed=11)
    pool = TQTokenToKVPool(slots - 1, 1, hkv, d, 2, DEV, False, cfg=cfg)
    layer = types.SimpleNamespace(layer_id=1)
    g = torch.Generator().manual_seed(0)
    lens = (9, 21)
    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, generator=g).bfloat16().to(DEV)
    k, v = qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]  # strided, like RadixAttention's views
    loc = (torch.randperm(slots - 1, generator=g)[: sum(lens)] + 1).to(DEV)  # 0: padding slot
    pool.set_kv_buffer(layer, loc, k, v)
    packed = pool.get_packed_layer(1)
    assert (packed.k_norms[0] == 0).all() and (pool.get_packed_layer(0).k_norms == 0).all()

    q = torch.randn(len(lens), hq, d, generator=g).bfloat16().to(DEV)
    indptr = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=DEV)
    ws = DecodeWorkspace.create(4, hq, d, max_kv_splits=4, device=DEV)
    splits = torch.tensor([1, 3], dtype=torch.int32, device=DEV)
    got = tq_decode(
        q,
        *packed[:4],
        indptr,
        loc,
        packed.codec,
        d**-0.5,
        num_kv_splits=splits,
        max_kv_splits=4,
        workspace=ws,
    )
    want = tq_decode_ref(q, *packed[:4], indptr, loc, packed.codec, d**-0.5)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 2e-2
    # and the packed cache stays near attention over the original K/V (k4v3 at
    # head_dim 64 on Gaussian data: about 0.2 relative error; garbage would be ~1)
    exact = torch.cat(
        [
            attention_ref(q[b : b + 1].double(), k[s:e].double(), v[s:e].double(), d**-0.5)
            for b, (s, e) in enumerate(((0, lens[0]), (lens[0], sum(lens))))
        ]
    )
    assert ((got.double() - exact).norm() / exact.norm()).item() < 0.3


def test_build_pool_hook_loads_key_centers(parallel, monkeypatch, tmp_path):
    from sglang_tq.format.centers import save_key_centers

    path = tmp_path / "centers.safetensors"
    centers = torch.randn(32, 8, 128)
    save_key_centers(path, centers, {"model": "test"})
    sa = make_server_args(
        "--kv-quant",
        "turboquant",
        "--kv-quant-bf16-layers",
        "0",
        "--kv-quant-key-centers",
        str(path),
    )
    kvc = kvc_fields(sa)
    kvc.pool_page_size = 1
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    pool = integration._build_mha_kv_pool(
        None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
    )
    assert not pool.is_packed_layer(0)
    assert torch.equal(pool.get_packed_layer(7).codec.k_center.cpu(), centers[7])
    # a file made for another model is refused with the shape it needed
    save_key_centers(path, torch.randn(30, 8, 128), {})
    with pytest.raises(ValueError, match=r"\[32, 8, 128\].*sglang_tq.tools.key_centers"):
        integration._build_mha_kv_pool(
            None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
        )


def test_key_centers_follow_the_tensor_parallel_kv_heads():
    centers = torch.arange(2 * 8 * 1, dtype=torch.float32).view(2, 8, 1)
    assert integration.rank_key_centers(centers, 1, 4)[0, :, 0].tolist() == [2, 3]  # heads 2, 3
    assert integration.rank_key_centers(centers, 0, 1).shape == (2, 8, 1)
    # 16 ranks over 8 heads: each head on two ranks, rank 5 holds head 2
    assert integration.rank_key_centers(centers, 5, 16)[0, :, 0].tolist() == [2]


def test_centered_pool_round_trip_is_closer():
    """Keys with a large common part: the centered pool reads them back far closer."""
    from sglang_tq.kernels.tq_dequant import tq_dequant

    hkv, d, n = 2, 64, 30
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(2, hkv, d, generator=g) * 4
    k = (mu[1][None] + torch.randn(n, hkv, d, generator=g)).bfloat16().to(DEV)
    v = torch.randn(n, hkv, d, generator=g).bfloat16().to(DEV)
    loc = torch.arange(1, n + 1, device=DEV)
    errs = []
    for centers in (mu, None):
        cfg = TQConfig(head_dim=d, k_bits=4, v_bits=4, seed=3)
        pool = TQTokenToKVPool(n + 1, 1, hkv, d, 2, DEV, False, cfg=cfg, key_centers=centers)
        pool.set_kv_buffer(types.SimpleNamespace(layer_id=1), loc, k, v)
        packed = pool.get_packed_layer(1)
        k_back, _ = tq_dequant(*packed[:4], loc, packed.codec, dtype=torch.float32)
        errs.append(((k_back - k.float()).norm() / k.float().norm()).item())
    assert errs[0] < 0.5 * errs[1], errs


def test_layers_draw_their_own_rotation_and_ranks_agree():
    cfg = TQConfig(head_dim=64, seed=3)
    a = TQTokenToKVPool(4, 1, 2, 64, 3, "cpu", False, cfg=cfg)
    b = TQTokenToKVPool(4, 1, 1, 64, 2, "cpu", False, cfg=cfg, start_layer=1)  # another PP/TP shape
    pis = [a.get_packed_layer(i).codec.pi for i in range(3)]
    assert not torch.equal(pis[0], pis[1]) and not torch.equal(pis[1], pis[2])
    assert torch.equal(b.get_packed_layer(1).codec.pi, pis[1])
    assert torch.equal(b.get_packed_layer(2).codec.pi, pis[2])
    assert cfg.layer_seed(1) != TQConfig(head_dim=64, seed=4).layer_seed(1)


def test_getters_never_hand_out_bf16_views_of_packed_bytes():
    cfg = TQConfig(head_dim=64, bf16_layers=(1,))
    pool = TQTokenToKVPool(6, 1, 2, 64, 2, "cpu", False, cfg=cfg)
    for getter in (pool.get_key_buffer, pool.get_value_buffer, pool.get_kv_buffer):
        with pytest.raises(RuntimeError, match="get_packed_layer.*--kv-quant none"):
            getter(0)
    k, v = pool.get_kv_buffer(1)
    assert k.dtype == torch.bfloat16 and k.shape == (7, 2, 64) and v is pool.get_value_buffer(1)
    with pytest.raises(RuntimeError, match="kept in bf16"):
        pool.get_packed_layer(1)
    layer = types.SimpleNamespace(layer_id=1)
    x = torch.randn(2, 2, 64).bfloat16()
    pool.set_kv_buffer(layer, torch.tensor([3, 5]), x, -x)
    assert torch.equal(pool.get_key_buffer(1)[5], x[1]) and torch.equal(
        pool.get_value_buffer(1)[3], -x[0]
    )
    for refused in (
        lambda: pool.move_kv_cache(None, None),
        lambda: pool.get_cpu_copy(None),
        lambda: pool.load_cpu_copy(None, None),
        pool.get_contiguous_buf_infos,
        pool.set_kv_buffer_prefix_valid,
    ):
        with pytest.raises(RuntimeError, match="--kv-quant none"):
            refused()
    with pytest.raises(RuntimeError, match="--dcp-size"):
        pool.set_kv_buffer(layer, torch.tensor([1]), x[:1], x[:1], dcp_kv_mask=torch.ones(1))


# ------------------------------------------------ key centers auto: from the k_proj bias
class _Attention(torch.nn.Module):
    """The fields of an SGLang MHA attention module (Qwen2Attention) that the bias centers
    read, with SGLang's own rotary embedding."""

    def __init__(self, layer_id, hq, hkv, d, bias=True, max_position=4096):
        from sglang.srt.layers.rotary_embedding import get_rope

        super().__init__()
        self.q_size, self.kv_size = hq * d, hkv * d
        self.qkv_proj = torch.nn.Linear(8, (hq + 2 * hkv) * d, bias=bias)
        if bias:
            torch.nn.init.normal_(self.qkv_proj.bias, std=5.0)
        self.rotary_emb = get_rope(d, d, max_position, 1_000_000, True, dtype=torch.float32)
        self.attn = types.SimpleNamespace(layer_id=layer_id)


def _attn_model(layers, hq, hkv, d, bias=True, max_position=4096):
    torch.manual_seed(1)
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList(
        _Attention(i, hq, hkv, d, bias, max_position) for i in range(layers)
    )
    return m


def _k_bias(m):
    return m.qkv_proj.bias.detach()[m.q_size : m.q_size + m.kv_size].double()


@pytest.fixture
def rope_context(monkeypatch):
    """SGLang's rotary embedding on this machine: the runtime context it reads, and its
    CPU platform flag (without one it looks for a vLLM kernel on a machine without CUDA)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.runtime_context import get_context

    get_context().set_server_args(make_server_args())
    if not HAS_CUDA:
        monkeypatch.setattr(rope_base, "_is_cpu", True)


def test_sglang_bias_key_centers_match_the_twin(rope_context):
    from sglang_tq.format.centers import sglang_bias_key_centers

    layers, hq, hkv, d, horizon = 3, 4, 2, 32, 512
    model = _attn_model(layers, hq, hkv, d)
    got = sglang_bias_key_centers(model, layers, hkv, d, horizon)
    inv = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(horizon, dtype=torch.float64)[:, None] * inv  # [P, D/2]
    c, s = ang.cos().mean(0), ang.sin().mean(0)  # mean rotation
    for i, m in enumerate(model.layers):
        b = _k_bias(m).view(hkv, d)
        lo, hi = b[:, : d // 2], b[:, d // 2 :]
        want = torch.cat([lo * c - hi * s, hi * c + lo * s], -1)  # rotate-half RoPE
        # SGLang's float32 cos/sin cache: ~1e-6 relative per term, |b| ~ 15
        torch.testing.assert_close(got[i].double(), want, atol=1e-4 * b.abs().max().item(), rtol=0)
    # a horizon past the RoPE cache is clipped to the positions the model can have
    short = _attn_model(layers, hq, hkv, d, max_position=100)
    torch.testing.assert_close(
        sglang_bias_key_centers(short, layers, hkv, d, 10_000),
        sglang_bias_key_centers(short, layers, hkv, d, 100),
    )
    assert (
        sglang_bias_key_centers(_attn_model(layers, hq, hkv, d, bias=False), layers, hkv, d, 64)
        is None
    )
    with pytest.raises(ValueError, match="kv_size"):
        sglang_bias_key_centers(model, layers, 4, d, 64)


def test_build_pool_hook_auto_centers_come_from_the_bias(parallel, rope_context, monkeypatch):
    from sglang_tq.format import centers

    sa = make_server_args("--kv-quant", "turboquant")
    assert sa.kv_quant_key_centers == "auto"  # the default
    kvc = kvc_fields(sa)
    kvc.model = _attn_model(32, 4, 8, 128)
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    pool = integration._build_mha_kv_pool(
        None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
    )
    want = centers.sglang_bias_key_centers(kvc.model, 32, 8, 128, centers.BIAS_HORIZON)
    assert pool.cfg.key_centers == "auto"
    assert torch.equal(pool.get_packed_layer(5).codec.k_center.cpu(), want[5])
    assert want[5].norm() > 10  # a real, large center
    # a model without a k_proj bias: nothing centered, and the config says so
    kvc.model = _attn_model(32, 4, 8, 128, bias=False)
    pool = integration._build_mha_kv_pool(
        None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
    )
    assert pool.cfg.key_centers is None and pool.get_packed_layer(5).codec.k_center is None
    # none: off even with a bias
    kvc = kvc_fields(make_server_args("--kv-quant", "turboquant", "--kv-quant-key-centers", "none"))
    kvc.model = _attn_model(32, 4, 8, 128)
    pool = integration._build_mha_kv_pool(
        None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
    )
    assert pool.get_packed_layer(5).codec.k_center is None


def test_bias_centers_by_name_for_turboquant_and_the_hadamard_baseline(
    parallel, rope_context, monkeypatch
):
    """``bias`` is auto asked for by name: the same centers, but refused for a model without a
    k_proj bias; it is also how the QuaRot-style baseline gets TurboQuant's centering."""
    from sglang_tq.format import centers
    from sglang_tq.serving.simulated import SimulatedKVPool

    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    model = _attn_model(32, 4, 8, 128)
    want = centers.sglang_bias_key_centers(model, 32, 8, 128, centers.BIAS_HORIZON)
    kvc = kvc_fields(make_server_args("--kv-quant", "turboquant", "--kv-quant-key-centers", "bias"))
    kvc.model = model
    pool = integration._build_mha_kv_pool(
        None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
    )
    assert pool.cfg.key_centers == "bias"
    assert torch.equal(pool.get_packed_layer(5).codec.k_center.cpu(), want[5])
    kvc.model = _attn_model(32, 4, 8, 128, bias=False)
    with pytest.raises(ValueError, match="needs a model with a k_proj bias") as exc:
        integration._build_mha_kv_pool(
            None, kvc, max_total_num_tokens=5, mha_pool_class=MHATokenToKVPool, quant_method=None
        )
    assert str(exc.value).count(". ") == 0 and str(exc.value).endswith(".")

    def stock_build(kvc, **kw):  # SGLang's MHA build, reduced to the class it was handed
        return kw["mha_pool_class"](5, 1, torch.bfloat16, 8, 128, 32, "cpu", False)

    for flags, centered in (((), False), (("--kv-quant-key-centers", "bias"), True)):
        kvc = kvc_fields(make_server_args("--kv-quant", "hadamard", *flags))
        assert kvc.server_args.kv_quant_key_centers == ("bias" if centered else None)
        kvc.model = model
        pool = integration._build_mha_kv_pool(
            stock_build,
            kvc,
            max_total_num_tokens=5,
            mha_pool_class=MHATokenToKVPool,
            quant_method=None,
        )
        assert (
            isinstance(pool, SimulatedKVPool) and ("keys centered" in pool.describe()) == centered
        )
        if centered:
            assert torch.equal(pool._mu[5], want[5].float())

"""The packed MLA pool (sglang_tq/serving/mla_pool.py): sizes against SGLang's MLATokenToKVPool,
both write paths against the reference quantizer, bf16 layers as SGLang lays them out, one
sentence for what it cannot do, and the pool's buffers through the MLA decode kernel."""

import types

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

from sglang_tq.config import TQConfig
from sglang_tq.format.codec import LayerCodec
from sglang_tq.format.packing import unpack
from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode, tq_decode_ref
from sglang_tq.kernels.tq_store import tq_store_kv_ref
from sglang_tq.serving.mla_pool import TQMLATokenToKVPool, mla_bytes_per_token
from tests.conftest import HAS_CUDA
from tests.serving.conftest import DEEPSEEK_V2_LITE, DEV, make_server_args, real_configurator

LAT, ROPE = 512, 64


def _pool(size=40, layers=3, bits=4, bf16_layers=(), start=0):
    cfg = TQConfig(head_dim=LAT, k_bits=bits, v_bits=bits, seed=7, bf16_layers=bf16_layers)
    return TQMLATokenToKVPool(
        size,
        1,
        LAT,
        ROPE,
        layers,
        DEV,
        False,
        cfg=cfg,
        start_layer=start,
        end_layer=start + layers - 1,
    )


def test_bytes_per_token_and_pool_size_against_sglang():
    """DeepSeek-V2-Lite: 27 layers of (256 + 2 + 128) B at k4 = 10,422 B/token, 2.98x fewer
    than SGLang's bf16 row of 576 values; a bf16 layer costs SGLang's row."""
    k4 = TQConfig(head_dim=LAT, k_bits=4, v_bits=4)
    assert mla_bytes_per_token(k4, range(27), ROPE) == 27 * 386 == 10_422
    assert (
        mla_bytes_per_token(TQConfig(head_dim=LAT, k_bits=3, v_bits=3), range(27), ROPE) == 27 * 322
    )
    with_bf16 = TQConfig(head_dim=LAT, bf16_layers=(0,))
    assert mla_bytes_per_token(with_bf16, range(27), ROPE) == 1152 + 26 * 386
    pool = _pool(size=100, layers=3)
    stock = MLATokenToKVPool(100, 1, torch.bfloat16, LAT, ROPE, 3, "cpu", False, 0, 2)
    assert pool.get_kv_size_bytes() == 101 * 3 * 386
    assert stock.get_kv_size_bytes() == 101 * 3 * 1152


def test_both_write_paths_store_the_reference_codes_and_rope():
    """set_kv_buffer (backend, [T, 1, 576]) and set_mla_kv_buffer (model, latent and RoPE
    apart, strided views) write the same bytes: the reference's latent codes and norms, the
    RoPE keys in the model dtype, nothing outside their slots."""
    g = torch.Generator().manual_seed(3)
    n = 11
    kv_a = torch.randn(n, 1, LAT + ROPE + 8, generator=g).bfloat16()  # wider row: strided views
    k576 = kv_a[..., : LAT + ROPE]
    loc = torch.randperm(39, generator=g)[:n] + 1
    a, b = _pool(), _pool()
    layer = types.SimpleNamespace(layer_id=1)
    a.set_kv_buffer(layer, loc.to(DEV), k576.to(DEV), k576[..., :LAT].to(DEV))
    b.set_mla_kv_buffer(
        layer, loc.to(DEV), kv_a[..., :LAT].to(DEV), kv_a[..., LAT : LAT + ROPE].to(DEV)
    )
    codec = LayerCodec.create(LAT, 4, 4, seed=TQConfig(head_dim=LAT, seed=7).layer_seed(1))
    want_codes = torch.zeros(41, 1, LAT // 2, dtype=torch.uint8)
    want_norms = torch.zeros(41, 1, dtype=torch.float16)
    tq_store_kv_ref(k576[..., :LAT], None, loc, want_codes, want_norms, None, None, codec)
    for pool in (a, b):
        p = pool.get_packed_layer(1)
        diff = (unpack(p.latent_codes.cpu(), 4, LAT).int() - unpack(want_codes, 4, LAT).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        assert torch.allclose(p.latent_norms.cpu().float(), want_norms.float(), rtol=2**-10, atol=0)
        assert torch.equal(p.k_pe.cpu()[loc], k576[:, 0, LAT:])
        untouched = torch.ones(41, dtype=torch.bool)
        untouched[loc] = False
        assert (p.latent_codes.cpu()[untouched] == 0).all() and (p.k_pe.cpu()[untouched] == 0).all()
    assert torch.equal(a.get_packed_layer(1).latent_codes, b.get_packed_layer(1).latent_codes)


def test_bf16_layer_keeps_sglangs_row_and_packed_layers_have_no_bf16_view():
    pool = _pool(bf16_layers=(4,), start=3)  # layers 3, 4, 5: layer 4 in bf16
    k576 = torch.randn(5, 1, LAT + ROPE).bfloat16()
    loc = torch.arange(5) + 2
    pool.set_kv_buffer(types.SimpleNamespace(layer_id=4), loc.to(DEV), k576.to(DEV), None)
    assert torch.equal(pool.get_key_buffer(4).cpu()[loc], k576)
    assert torch.equal(pool.get_value_buffer(4).cpu()[loc], k576[..., :LAT])
    assert not pool.is_packed_layer(4) and pool.is_packed_layer(3)
    with pytest.raises(RuntimeError, match="no bf16 view"):
        pool.get_key_buffer(3)
    with pytest.raises(RuntimeError, match="kept in bf16"):
        pool.get_packed_layer(4)
    with pytest.raises(IndexError, match="outside this KV pool's layers"):
        pool.get_packed_layer(2)
    with pytest.raises(RuntimeError, match="--kv-quant none"):
        pool.get_mla_kv_buffer(types.SimpleNamespace(layer_id=3), loc)
    assert pool.get_v_head_dim() == LAT


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(bits=(4, 3)), "one bit width"),
        (dict(rank=256), "latent with a"),
        (dict(variant="prod"), "one bit width"),
    ],
)
def test_unsupported_mla_shapes_are_one_sentence(kw, msg):
    kb, vb = kw.get("bits", (4, 4))
    rank = kw.get("rank", LAT)
    cfg = TQConfig(head_dim=rank, k_bits=kb, v_bits=vb, key_variant=kw.get("variant", "mse"))
    with pytest.raises(ValueError, match=msg):
        TQMLATokenToKVPool(8, 1, rank, ROPE, 1, DEV, False, cfg=cfg)


def test_pool_buffers_decode_through_the_mla_kernel():
    """What the backend will do: the model's absorbed query [B, 16, 576] against the pool's
    latent codes (K and V) and RoPE keys, split 512 | 64, against the twin."""
    pool = _pool(size=64, layers=1)
    g = torch.Generator().manual_seed(5)
    k576 = torch.randn(60, 1, LAT + ROPE, generator=g).bfloat16().to(DEV)
    pool.set_kv_buffer(
        types.SimpleNamespace(layer_id=0), torch.arange(60, device=DEV) + 1, k576, None
    )
    p = pool.get_packed_layer(0)
    lens = (1, 23, 36)
    indptr = torch.tensor((0,) + lens).cumsum(0).int().to(DEV)
    indices = (torch.randperm(60, generator=g)[: sum(lens)] + 1).to(DEV)
    q = torch.randn(len(lens), 16, LAT + ROPE, generator=g).bfloat16().to(DEV)
    ws = DecodeWorkspace.create(len(lens), 16, LAT, 2, DEV)
    splits = torch.tensor([1, 2, 2], dtype=torch.int32, device=DEV)
    kw = {} if HAS_CUDA else dict(block_n=16)
    out = tq_decode(
        q[..., :LAT],
        p.latent_codes,
        p.latent_norms,
        None,
        None,
        indptr,
        indices,
        p.codec,
        0.07,
        num_kv_splits=splits,
        max_kv_splits=2,
        workspace=ws,
        q_pe=q[..., LAT:],
        k_pe=p.k_pe,
        **kw,
    )
    args = (
        q[..., :LAT],
        p.latent_codes,
        p.latent_norms,
        None,
        None,
        indptr,
        indices,
        p.codec,
        0.07,
    )
    ref = tq_decode_ref(*args, q_pe=q[..., LAT:], k_pe=p.k_pe)
    torch_err = (
        (
            tq_decode_ref(*args, q_pe=q[..., LAT:], k_pe=p.k_pe, dtype=torch.bfloat16).double()
            - ref
        ).norm()
        / ref.norm()
    ).item()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 2 * torch_err


# ------------------------------------------------ sizing and building through SGLang's configurator
def test_sglang_configurator_sizes_and_builds_the_mla_pool(monkeypatch):
    """DeepSeek-V2-Lite (dummy config): SGLang's own configurator, with the cell-size and
    build-mla-pool patches, sizes 10,422 B/token at k4 (stock: 31,104) and builds the packed
    latent pool of exactly that size; with --kv-quant none it builds SGLang's pool. (MLA is
    still refused at launch until the backend's MLA path lands: the test lifts that one
    refusal to reach the sizing and the build.)"""
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator
    from sglang.srt.runtime_context import get_parallel

    from sglang_tq.serving import integration, refusals

    model = DEEPSEEK_V2_LITE
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    monkeypatch.setattr(refusals, "check_model_config", lambda *a, **k: None)
    with get_parallel().override(attn_tp_size=1, attn_tp_rank=0, attn_cp_size=1):
        for kv_quant, cell, pool_class in (
            ("none", 31_104, MLATokenToKVPool),
            ("turboquant", 10_422, TQMLATokenToKVPool),
        ):
            sa = make_server_args("--kv-quant", kv_quant, model=model)
            kvc = real_configurator(sa)
            kvc.use_mla_backend = True
            conf = create_memory_pool_configurator(kvc)
            assert conf._cell_size == cell
            pool = kvc._build_token_to_kv_pool(
                sizes=types.SimpleNamespace(max_total_num_tokens=32),
                is_dsa_model=False,
                is_dsv4_model=False,
                req_to_token_pool=None,
            )
            assert type(pool) is pool_class
            assert pool.get_kv_size_bytes() == cell * 33
        # the prefill scratch (one layer's dense [context_len, 576] rows) leaves the budget
        assert conf._tq_prefill_scratch_bytes == sa.get_model_config().context_len * 576 * 2


# ------------------------------------------------------------------------ admission at launch
def _launch(*flags):
    return make_server_args(*flags, model=DEEPSEEK_V2_LITE)


def test_mla_is_refused_at_launch_without_the_opt_in(monkeypatch):
    monkeypatch.delenv("SGLANG_TQ_EXPERIMENTAL_MLA", raising=False)
    with pytest.raises(ValueError, match="not yet validated on a GPU.*--kv-quant none"):
        _launch("--kv-quant", "turboquant")
    _launch("--kv-quant", "none")  # stock SGLang's MLA serving is untouched


@pytest.mark.parametrize(
    "flags, msg",
    [
        (("--kv-quant-bits", "k4v3"), "one width.*k4v4"),
        (("--kv-quant-packed-prefill",), "--kv-quant-packed-prefill for MLA"),
        (("--kv-quant-key-centers", "none"), None),
        (("--kv-quant-bf16-layers", "27"), "layers 0..26"),
        ((), None),
    ],
)
def test_mla_admission_rules_with_the_opt_in(monkeypatch, flags, msg):
    """With SGLANG_TQ_EXPERIMENTAL_MLA=1 a DeepSeek-V2 model starts with --kv-quant
    turboquant, and what the latent pool would ignore is one sentence at launch."""
    monkeypatch.setenv("SGLANG_TQ_EXPERIMENTAL_MLA", "1")
    if msg is None:
        assert _launch("--kv-quant", "turboquant", *flags).kv_quant == "turboquant"
    else:
        with pytest.raises(ValueError, match=msg):
            _launch("--kv-quant", "turboquant", *flags)
    monkeypatch.setenv("SGLANG_TQ_EXPERIMENTAL_MLA", "yes")
    with pytest.raises(ValueError, match="SGLANG_TQ_EXPERIMENTAL_MLA must be 0 or 1"):
        _launch("--kv-quant", "turboquant")

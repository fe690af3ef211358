"""The MLA backend (sglang_tq/serving/mla_backend.py) over the packed latent pool, on SGLang's real
Triton backend metadata and a dummy DeepSeek-V2-Lite config: prefill with a radix prefix
(absorbed form, attn_mqa), prefill without one (attn_mha, the model's own cache write) and
decode, each against plain attention over the reference's dequantized latent. The
tolerance is the tests' usual one: at most 2x (4x under the interpreter, whose bf16 casts
truncate) PyTorch's own bf16 error against the float64 reference."""

import types

import pytest
import torch
from sglang.srt.managers.schedule_batch import ForwardMode
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.runtime_context import get_context, get_parallel

from sglang_tq.config import TQConfig
from sglang_tq.kernels.tq_decode import attention_ref
from sglang_tq.kernels.tq_dequant import tq_dequant_ref
from sglang_tq.serving import refusals
from sglang_tq.serving.mla_pool import TQMLATokenToKVPool
from tests.conftest import HAS_CUDA
from tests.serving.conftest import DEEPSEEK_V2_LITE, DEV, make_server_args

MODEL = DEEPSEEK_V2_LITE
H, LAT, ROPE, NOPE, VD = 16, 512, 64, 128, 128
SCALE = (NOPE + ROPE) ** -0.5
PREFIX = torch.arange(10, 15)  # request 1's cached radix prefix
CHUNK1, CHUNK2 = torch.arange(20, 27), torch.arange(30, 33)
BOUND = 2 if HAS_CUDA else 4
# the interpreter has no bf16 arithmetic: there SGLang's extend kernel runs in fp32 (as in
# sglang_tq/kernels/tq_extend.py), so the prefill inputs are fp32 on the CPU
WORK = torch.bfloat16 if HAS_CUDA else torch.float32


@pytest.fixture(scope="module")
def server_args():
    with pytest.MonkeyPatch.context() as mp:
        # MLA is refused at launch until the backend path is validated on a GPU: lifted here
        mp.setattr(refusals, "check_model_config", lambda *a, **k: None)
        sa = make_server_args(
            "--kv-quant", "turboquant", "--attention-backend", "triton", model=MODEL
        )
    get_context().set_server_args(sa)
    with get_parallel().override(attn_tp_size=1, attn_dcp_size=1, attn_dcp_rank=0):
        yield sa


def _runner(sa):
    pool = TQMLATokenToKVPool(63, 1, LAT, ROPE, 1, DEV, False, cfg=TQConfig(head_dim=LAT, seed=3))
    req_to_token = ReqToTokenPool(size=4, max_context_len=64, device=DEV, enable_memory_saver=False)
    return types.SimpleNamespace(
        req_to_token_pool=req_to_token,
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=None,
        sliding_window_size=None,
        model_config=sa.get_model_config(),
        device=DEV,
        gpu_id=0,
        server_args=sa,
        is_draft_worker=False,
        dtype=torch.bfloat16,
        page_size=1,
    )


def _backend(sa):
    from sglang_tq.serving.mla_backend import TQMLAAttnBackend

    runner = _runner(sa)
    return TQMLAAttnBackend(runner), runner.token_to_kv_pool, runner.req_to_token_pool


def _layer(qk, v, kv_heads):
    return types.SimpleNamespace(
        layer_id=0,
        tp_q_head_num=H,
        tp_k_head_num=kv_heads,
        tp_v_head_num=kv_heads,
        qk_head_dim=qk,
        v_head_dim=v,
        head_dim=qk,
        scaling=SCALE,
        logit_cap=0.0,
        logit_capping_method="tanh",
        sliding_window_size=-1,
        is_cross_attention=False,
        attn_type=None,
        k_scale=None,
        v_scale=None,
        xai_temperature_len=-1,
    )


MQA, MHA = _layer(LAT + ROPE, LAT, 1), _layer(NOPE + ROPE, VD, H)


def _t(values):
    return torch.tensor(values, dtype=torch.int64, device=DEV)


def _extend(req_to_token, prefix_lens, ext_lens):
    req_to_token.req_to_token[1, :12] = torch.cat([PREFIX, CHUNK1]).int()
    req_to_token.req_to_token[2, :3] = CHUNK2.int()
    seq = [p + e for p, e in zip(prefix_lens, ext_lens)]
    locs = torch.cat([CHUNK1[-ext_lens[0] :], CHUNK2]).to(DEV)
    return types.SimpleNamespace(
        batch_size=2,
        forward_mode=ForwardMode.EXTEND,
        spec_info=None,
        req_pool_indices=_t([1, 2]),
        seq_lens=_t(seq),
        seq_lens_sum=sum(seq),
        seq_lens_cpu=torch.tensor(seq),
        extend_prefix_lens=_t(prefix_lens),
        extend_prefix_lens_cpu=prefix_lens,
        extend_seq_lens=_t(ext_lens),
        extend_seq_lens_cpu=ext_lens,
        out_cache_loc=locs,
        encoder_lens=None,
    )


def _rows(n, seed, width):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).bfloat16().to(DEV)


def _latent_keys(pool, slots):
    """float64 [n, 1, 576] keys as the pool holds them: dequantized latent | RoPE key."""
    p = pool.get_packed_layer(0)
    lat, _ = tq_dequant_ref(p.latent_codes, p.latent_norms, None, None, slots.to(DEV), p.codec)
    return torch.cat([lat, p.k_pe[slots.to(DEV)].double()[:, None]], dim=-1)


def _check(out, ref, ref_bf16):
    err = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(out) <= BOUND * err(ref_bf16)


def test_mla_backend_undoes_sglangs_split_ceiling(server_args):
    backend, _, _ = _backend(server_args)
    assert backend.max_kv_splits == server_args.triton_attention_num_kv_splits
    assert backend.v_head_dim == LAT and backend.num_kv_head == 1


def test_mla_prefill_with_a_prefix_then_decode_match_reference(server_args):
    backend, pool, req_to_token = _backend(server_args)
    pool.set_kv_buffer(MQA, PREFIX.to(DEV), _rows(5, 1, LAT + ROPE)[:, None], None)
    # prefill: request 1 extends its 5-token prefix by 7, request 2 prefills 3 (absorbed form)
    fb = _extend(req_to_token, [5, 0], [7, 3])
    backend.init_forward_metadata(fb)
    # shaped as RadixAttention passes them: k [T, 1, 576], v [T, 1, 512]
    q, k = _rows(10, 2, H * (LAT + ROPE)).to(WORK), _rows(10, 3, LAT + ROPE).to(WORK)
    o = backend.forward_extend(q, k[:, None], k[:, None, :LAT], MQA, fb)
    q3 = q.view(10, H, LAT + ROPE).double()
    for (r0, r1), prefix in (((0, 7), PREFIX), ((7, 10), PREFIX[:0])):
        keys = torch.cat([_latent_keys(pool, prefix), k[r0:r1, None].double()])
        ref = attention_ref(q3[r0:r1], keys, keys[..., :LAT], SCALE, causal_offset=len(prefix))
        ref16 = attention_ref(
            q3[r0:r1].bfloat16(),
            keys.bfloat16(),
            keys[..., :LAT].bfloat16(),
            SCALE,
            causal_offset=len(prefix),
        )
        _check(o.view(10, H, LAT)[r0:r1], ref, ref16)
    # decode: one new token each, over the packed latents of everything before it
    req_to_token.req_to_token[1, 12], req_to_token.req_to_token[2, 3] = 40, 41
    fb = types.SimpleNamespace(
        batch_size=2,
        forward_mode=ForwardMode.DECODE,
        spec_info=None,
        req_pool_indices=_t([1, 2]),
        seq_lens=_t([13, 4]),
        seq_lens_sum=17,
        seq_lens_cpu=torch.tensor([13, 4]),
        out_cache_loc=_t([40, 41]),
        encoder_lens=None,
    )
    backend.init_forward_metadata(fb)
    q, k = _rows(2, 4, H * (LAT + ROPE)), _rows(2, 5, LAT + ROPE)
    o = backend.forward_decode(q, k[:, None], k[:, None, :LAT], MQA, fb)
    q3 = q.view(2, H, LAT + ROPE).double()
    for b, slots in (
        (0, torch.cat([PREFIX, CHUNK1, _t([40]).cpu()])),
        (1, torch.cat([CHUNK2, _t([41]).cpu()])),
    ):
        keys = _latent_keys(pool, slots)
        ref = attention_ref(q3[b : b + 1], keys, keys[..., :LAT], SCALE)
        ref16 = attention_ref(
            q3[b : b + 1].bfloat16(), keys.bfloat16(), keys[..., :LAT].bfloat16(), SCALE
        )
        _check(o.view(2, H, LAT)[b : b + 1], ref, ref16)


def test_mla_prefill_without_a_prefix_runs_the_chunk_as_is(server_args):
    """attn_mha: the model wrote the latent itself (set_mla_kv_buffer); the backend attends
    over the chunk's decompressed K/V in bf16 and never touches the pool."""
    backend, pool, req_to_token = _backend(server_args)
    fb = _extend(req_to_token, [0, 0], [7, 3])
    fb.out_cache_loc = torch.cat([CHUNK1, CHUNK2]).to(DEV)
    backend.init_forward_metadata(fb)
    q, k, v = (_rows(10, s, w).to(WORK) for s, w in ((6, H * 192), (7, H * 192), (8, H * VD)))
    before = pool.get_packed_layer(0).latent_codes.clone()
    o = backend.forward_extend(
        q, k.view(10, H, -1), v.view(10, H, -1), MHA, fb, save_kv_cache=False
    )
    assert torch.equal(pool.get_packed_layer(0).latent_codes, before)
    q3, k3, v3 = (x.view(10, H, -1).double() for x in (q, k, v))
    for r0, r1 in ((0, 7), (7, 10)):
        ref = attention_ref(q3[r0:r1], k3[r0:r1], v3[r0:r1], SCALE, causal_offset=0)
        ref16 = attention_ref(
            q3[r0:r1].bfloat16(), k3[r0:r1].bfloat16(), v3[r0:r1].bfloat16(), SCALE, causal_offset=0
        )
        _check(o.view(10, H, VD)[r0:r1], ref, ref16)
    with pytest.raises(RuntimeError, match="cache write to the model"):
        backend.forward_extend(q, k.view(10, H, -1), v.view(10, H, -1), MHA, fb, save_kv_cache=True)


def test_backend_factory_picks_the_mla_backend_for_the_latent_pool(server_args):
    from sglang_tq.serving.backend import create_tq_backend
    from sglang_tq.serving.mla_backend import TQMLAAttnBackend

    assert isinstance(create_tq_backend(_runner(server_args)), TQMLAAttnBackend)


def test_mla_prefill_splits_requests_to_bound_the_prefix_scratch(server_args):
    """Two requests with their own 5- and 3-token prefixes: a 6-row scratch budget runs them
    as two groups (rows never above the budget), the same output as one group, written into
    the batch's preset output if the model gave one."""
    outs = []
    for budget in (64, 6):
        backend, pool, req_to_token = _backend(server_args)
        backend.prefill_scratch_rows = budget
        other = torch.arange(50, 53)
        for slots, seed in ((PREFIX, 1), (other, 9)):
            pool.set_kv_buffer(
                MQA, slots.to(DEV), _rows(len(slots), seed, LAT + ROPE)[:, None], None
            )
        fb = _extend(req_to_token, [5, 3], [7, 3])
        req_to_token.req_to_token[2, :6] = torch.cat([other, CHUNK2]).int()
        backend.init_forward_metadata(fb)
        seen = []
        real = backend._dense_prefix
        backend._dense_prefix = lambda *a: seen.append(real(*a)[0].shape[0]) or real(*a)
        q, k = _rows(10, 2, H * (LAT + ROPE)).to(WORK), _rows(10, 3, LAT + ROPE).to(WORK)
        fb._attn_output = torch.full((10, H * LAT), float("nan"), dtype=WORK, device=DEV)
        o = backend.forward_extend(q, k[:, None], k[:, None, :LAT], MQA, fb)
        assert o is fb._attn_output and not o.isnan().any()
        assert seen == ([8] if budget == 64 else [5, 3])
        outs.append(o)
    assert torch.equal(outs[0], outs[1])


def test_mla_decode_splits_fill_the_gpu_at_small_batches(server_args):
    """One latent head per sequence: the split rule gives a long sequence many splits (the
    parent's would give 8), within the ceiling the workspace was sized for."""
    backend, _, _ = _backend(server_args)
    splits = torch.zeros(1, dtype=torch.int32, device=DEV)
    backend.get_num_kv_splits(splits, torch.tensor([32768], device=DEV))
    assert 8 < int(splits[0]) <= backend.max_splits(1)
    many = torch.zeros(64, dtype=torch.int32, device=DEV)
    backend.get_num_kv_splits(many, torch.full((64,), 4096, device=DEV))
    assert int(many.max()) <= backend.max_splits(64) == backend.max_kv_splits

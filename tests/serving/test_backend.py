"""The turboquant attention backend on CPU: SGLang's real Triton metadata code plus our
kernels under the Triton interpreter, against the kernels' torch twins.

A tiny Llama-shaped model (4 query heads, 2 KV heads, head_dim 64, layer 1 in bf16)
runs a chunked prefill with a radix-cache prefix, then a decode step, eagerly and
through the CUDA-graph metadata path (preallocated buffers, padded batch).
"""

import json
import types

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.runtime_context import get_context, get_parallel

from sglang_tq.config import TQConfig
from sglang_tq.kernels.tq_decode import tq_decode_ref
from sglang_tq.kernels.tq_extend import tq_extend_ref
from sglang_tq.serving.pool import TQTokenToKVPool
from tests.conftest import rel
from tests.serving.conftest import DEV, make_server_args

HQ, HKV, D, LAYERS = 4, 2, 64, 2
BF16_LAYER = 1
SLOTS = 64
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "head_dim": D,
    "hidden_size": HQ * D,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
    "num_attention_heads": HQ,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": HKV,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 1000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def server_args(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    sa = make_server_args(
        "--kv-quant", "turboquant", "--kv-quant-bf16-layers", str(BF16_LAYER), model=str(model)
    )
    get_context().set_server_args(sa)
    with get_parallel().override(attn_tp_size=1, attn_dcp_size=1, attn_dcp_rank=0):
        yield sa


def _runner(sa, pool, sliding_window=None):
    """The ModelRunner fields the backend reads, over ``pool``, with a fresh request table."""
    req_to_token = ReqToTokenPool(size=4, max_context_len=64, device=DEV, enable_memory_saver=False)
    runner = types.SimpleNamespace(
        req_to_token_pool=req_to_token,
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=None,
        sliding_window_size=sliding_window,
        model_config=sa.get_model_config(),
        device=DEV,
        gpu_id=0,
        server_args=sa,
        is_draft_worker=False,
        dtype=torch.bfloat16,
        page_size=1,
    )
    return runner, req_to_token


def _make_backend(sa, packed_prefill=False, bf16_layers=(BF16_LAYER,), sliding_window=None):
    from sglang_tq.serving.backend import TQAttnBackend

    cfg = TQConfig(head_dim=D, seed=7, bf16_layers=bf16_layers)
    pool = TQTokenToKVPool(SLOTS, 1, HKV, D, LAYERS, DEV, False, cfg=cfg)
    runner, req_to_token = _runner(
        types.SimpleNamespace(
            **{
                **vars(sa),
                "kv_quant_packed_prefill": packed_prefill,
                "get_model_config": sa.get_model_config,
            }
        ),
        pool,
        sliding_window,
    )
    return TQAttnBackend(runner), pool, req_to_token


def _layer(layer_id):
    return types.SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=HQ,
        tp_k_head_num=HKV,
        tp_v_head_num=HKV,
        qk_head_dim=D,
        v_head_dim=D,
        head_dim=D,
        scaling=D**-0.5,
        logit_cap=0.0,
        logit_capping_method="tanh",
        sliding_window_size=-1,
        is_cross_attention=False,
        attn_type=None,
        k_scale=None,
        v_scale=None,
        xai_temperature_len=-1,
    )


def _qkv(n, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, HQ + 2 * HKV, D, generator=g).bfloat16().to(DEV)
    # k and v are strided views into one fused projection, as RadixAttention passes them
    return qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]


# Two requests: request 1 (pool row 1) has a 5-token radix prefix in slots 10..14 and
# extends by 7 tokens; request 2 (row 2) is cold and prefills 3 tokens.
PREFIX = torch.arange(10, 15, device=DEV)
CHUNKS = (torch.arange(20, 27, device=DEV), torch.arange(30, 33, device=DEV))


def _t(values):
    return torch.tensor(values, device=DEV)


def _batch_with_prefix(req_to_token, mode, row2, prefix_lens, ext_lens, out_cache_loc):
    """Request 1 (pool row 1) extends its 5-token radix prefix (slots 10..14) by 7 tokens;
    request 2 (row 2) holds the slots ``row2``."""
    req_to_token.req_to_token[1, :12] = torch.cat([PREFIX, CHUNKS[0]]).int()
    req_to_token.req_to_token[2, : len(row2)] = row2.int()
    seq_lens = [p + e for p, e in zip(prefix_lens, ext_lens)]
    return types.SimpleNamespace(
        batch_size=2,
        forward_mode=mode,
        spec_info=None,
        req_pool_indices=_t([1, 2]),
        seq_lens=_t(seq_lens),
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens),
        extend_prefix_lens=_t(prefix_lens),
        extend_prefix_lens_cpu=prefix_lens,
        extend_seq_lens=_t(ext_lens),
        extend_seq_lens_cpu=ext_lens,
        out_cache_loc=out_cache_loc,
        encoder_lens=None,
    )


def _extend_batch(req_to_token):
    """Request 2 is cold and prefills 3 tokens (slots 30..32)."""
    return _batch_with_prefix(
        req_to_token, ForwardMode.EXTEND, CHUNKS[1], [5, 0], [7, 3], torch.cat(CHUNKS)
    )


def _decode_batch(req_to_token, padded_to=None):
    req_to_token.req_to_token[1, 12] = 40
    req_to_token.req_to_token[2, 3] = 41
    rows, lens, locs = [1, 2], [13, 4], [40, 41]
    pad = (padded_to or 2) - 2
    # CUDA-graph padding: request row 0, length 1 (the fill value), write slot 0
    rows, lens, locs = rows + [0] * pad, lens + [1] * pad, locs + [0] * pad
    return types.SimpleNamespace(
        batch_size=len(rows),
        forward_mode=ForwardMode.DECODE,
        spec_info=None,
        req_pool_indices=_t(rows),
        seq_lens=_t(lens),
        seq_lens_sum=sum(lens),
        seq_lens_cpu=torch.tensor(lens),
        out_cache_loc=_t(locs),
        encoder_lens=None,
        num_padding=pad,
    )


def _fill_prefix(pool, layer_id):
    _, k, v = _qkv(len(PREFIX), seed=100 + layer_id)
    pool.set_kv_buffer(_layer(layer_id), PREFIX, k, v)
    return k, v


def _packed_ref(pool, layer_id):
    packed = pool.get_packed_layer(layer_id)
    return packed[:4], packed.codec


def test_backend_init_reuses_triton_metadata_without_reading_the_pool(server_args):
    backend, pool, _ = _make_backend(server_args)
    assert backend.token_to_kv_pool is pool
    assert (backend.v_head_dim, backend.num_head, backend.num_kv_head) == (D, HQ, HKV)
    # Attributes of SGLang 0.5.17's TritonAttnBackend.__init__ the backend relies on.
    for name in (
        "kv_indptr",
        "qo_indptr",
        "max_kv_splits",
        "req_to_token",
        "device_core_count",
        "max_context_len",
        "forward_metadata",
        "page_size",
    ):
        assert hasattr(backend, name), name


@pytest.mark.parametrize("packed_prefill", [False, True])
def test_backend_init_compiles_the_prefix_dequant_without_writing_the_pool(
    server_args, monkeypatch, packed_prefill
):
    """Every packed layer's prefix dequant runs once at start-up (the device-count variant
    tq_extend uses for a radix hit, plus the plain one with packed prefill), on slot 0,
    and the pool stays as allocated."""
    import sglang_tq.serving.backend as backend_mod

    calls = []
    real = backend_mod.tq_dequant

    def spy(k_codes, k_norms, v_codes, v_norms, slots, codec, **kw):
        calls.append(
            (
                k_codes.data_ptr(),
                slots.tolist(),
                None if kw["count"] is None else kw["count"].tolist(),
                kw["dtype"],
            )
        )
        return real(k_codes, k_norms, v_codes, v_norms, slots, codec, **kw)

    monkeypatch.setattr(backend_mod, "tq_dequant", spy)
    _, pool, _ = _make_backend(server_args, packed_prefill=packed_prefill)
    packed = [pool.get_packed_layer(i) for i in range(LAYERS) if pool.is_packed_layer(i)]
    counts = [[1], None] if packed_prefill else [[1]]
    assert calls == [(p.k_codes.data_ptr(), [0], c, torch.bfloat16) for p in packed for c in counts]
    for p in packed:
        for buf in p[:4]:
            assert not buf.any()


@pytest.mark.parametrize("bf16_layers, fwht", [((BF16_LAYER,), "0"), ((), "0"), ((), "1")])
def test_extend_then_decode_match_reference(server_args, bf16_layers, fwht, monkeypatch):
    """With no bf16 layer the decode batch of 2 may use up to SPLIT_CAP splits (the split
    ceiling grows as the batch shrinks); with one, SGLang's max_kv_splits bounds it.
    SGLANG_TQ_FWHT=1: the store and decode rotations as fast Walsh-Hadamard transforms."""
    from sglang_tq.kernels.tq_decode import SPLIT_CAP

    monkeypatch.setenv("SGLANG_TQ_FWHT", fwht)
    backend, pool, req_to_token = _make_backend(server_args, bf16_layers=bf16_layers)
    assert backend.fwht == pool.fwht == (fwht == "1")
    assert backend.max_splits(2) == (backend.max_kv_splits if bf16_layers else SPLIT_CAP)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    # the prefix dedup is built once with the batch's metadata, for all its layers
    (g,) = backend._prefill
    assert g.dedup.index.numel() == g.dedup.rows == sum(fb.extend_prefix_lens_cpu)
    q, k, v = _qkv(10, seed=1)
    out = backend.forward_extend(q, k, v, layer, fb)
    assert out.shape == (10, HQ * D) and out.dtype == torch.bfloat16
    codes, codec = _packed_ref(pool, 0)
    md = backend.forward_metadata
    want = tq_extend_ref(
        q, k, v, *codes, md.qo_indptr, md.kv_indptr, md.kv_indices, codec, layer.scaling
    )
    assert rel(out.view(10, HQ, D), want) < 2e-2
    # the chunk was quantized into its slots on the way
    assert (pool.k_norms[0][CHUNKS[0]] > 0).all() and (pool.k_norms[0][CHUNKS[1]] > 0).all()

    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    assert backend._prefill is None
    q, k, v = _qkv(2, seed=2)
    out = backend.forward_decode(q, k, v, layer, fb)
    indptr = _t([0, 13, 17])
    indices = torch.cat([req_to_token.req_to_token[1, :13], req_to_token.req_to_token[2, :4]])
    want = tq_decode_ref(q, *codes, indptr, indices, codec, layer.scaling)
    assert rel(out.view(2, HQ, D), want) < 2e-2


# Three requests, pool rows 1..3, over 5-token prefixes: rows 1 and 3 share slots 10..14
# (a radix hit), row 2 has its own in slots 15..19 unless told to share too.
SHARED_CHUNKS = (
    torch.arange(20, 23, device=DEV),
    torch.arange(30, 32, device=DEV),
    torch.arange(40, 44, device=DEV),
)


def _three_request_batch(pool, req_to_token, row2_prefix):
    _fill_prefix(pool, 0)
    _, k, v = _qkv(5, seed=120)
    pool.set_kv_buffer(_layer(0), _t(list(range(15, 20))), k, v)
    for row, (pre, chunk) in enumerate(zip((PREFIX, row2_prefix, PREFIX), SHARED_CHUNKS), 1):
        req_to_token.req_to_token[row, : 5 + len(chunk)] = torch.cat([pre, chunk]).int()
    ext = [len(c) for c in SHARED_CHUNKS]
    seq_lens = [5 + e for e in ext]
    return types.SimpleNamespace(
        batch_size=3,
        forward_mode=ForwardMode.EXTEND,
        spec_info=None,
        req_pool_indices=_t([1, 2, 3]),
        seq_lens=_t(seq_lens),
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens),
        extend_prefix_lens=_t([5, 5, 5]),
        extend_prefix_lens_cpu=[5, 5, 5],
        extend_seq_lens=_t(ext),
        extend_seq_lens_cpu=ext,
        out_cache_loc=torch.cat(SHARED_CHUNKS),
        encoder_lens=None,
    )


@pytest.mark.parametrize(
    "row2_prefix, budget, groups, rows",
    [
        (PREFIX, 8, [(0, 3)], [5]),  # 15 prefix tokens, 5 distinct: one group of 5 rows
        (torch.arange(15, 20, device=DEV), 10, [(0, 3)], [10]),  # 10 distinct fit 10 rows
        (torch.arange(15, 20, device=DEV), 9, [(0, 1), (1, 2), (2, 3)], [5, 5, 5]),
        (torch.arange(15, 20, device=DEV), 15, [(0, 3)], [15]),  # fits without reading the count
    ],
)
def test_prefill_scratch_is_bounded_by_distinct_tokens_and_the_budget(
    server_args, monkeypatch, row2_prefix, budget, groups, rows
):
    """The dense prefix scratch of an extend batch never holds more rows than its distinct
    prefix slots or the budget (context_len): requests split into groups when the
    distinct slots do not fit, and the output is the same."""
    import sglang_tq.kernels.tq_extend as ext_mod

    backend, pool, req_to_token = _make_backend(server_args)
    backend.prefill_scratch_rows = budget
    fb = _three_request_batch(pool, req_to_token, row2_prefix)
    backend.init_forward_metadata(fb)
    assert [(g.b0, g.b1) for g in backend._prefill] == groups
    seen = []
    real = ext_mod.tq_dequant
    monkeypatch.setattr(
        ext_mod,
        "tq_dequant",
        lambda *a, **kw: (
            seen.append(a[4].numel()) if kw.get("count") is not None else None,
            real(*a, **kw),
        )[1],
    )
    layer = _layer(0)
    q, k, v = _qkv(9, seed=5)
    out = backend.forward_extend(q, k, v, layer, fb)
    assert seen == rows and max(seen) <= budget
    codes, codec = _packed_ref(pool, 0)
    md = backend.forward_metadata
    want = tq_extend_ref(
        q, k, v, *codes, md.qo_indptr, md.kv_indptr, md.kv_indices, codec, layer.scaling
    )
    assert rel(out.view(9, HQ, D), want) < 2e-2


def test_prefill_plan_groups_and_page_tables():
    from sglang_tq.kernels.tq_extend import extend_kv_table
    from sglang_tq.serving.backend import plan_prefill

    pre, ext = [4, 0, 3, 2], [2, 3, 1, 2]
    qo = torch.tensor([0, 2, 5, 6, 8])
    kv = torch.tensor([0, 4, 4, 7, 9])
    slots = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])  # all distinct
    (whole,) = plan_prefill(qo, kv, slots, pre, ext, budget=9, fa3=True)
    assert (whole.q0, whole.q1, whole.prefix_tokens, whole.max_extend_len) == (0, 8, 9, 3)
    groups = plan_prefill(qo, kv, slots, pre, ext, budget=5, fa3=True)
    assert [(g.b0, g.b1, g.q0, g.q1, g.prefix_tokens) for g in groups] == [
        (0, 2, 0, 5, 4),
        (2, 4, 5, 8, 5),
    ]
    g = groups[1]
    assert g.qo_indptr.tolist() == [0, 1, 3] and g.kv_indptr.tolist() == [0, 3, 5]
    assert g.kv_indices.tolist() == [5, 6, 7, 8, 9] and g.dedup.rows == 5
    assert torch.equal(
        g.dedup.kv_table[0], extend_kv_table(g.qo_indptr, g.kv_indptr, g.dedup.index, 4, 5)[0]
    )
    assert plan_prefill(qo, kv, slots, [], [], budget=5, fa3=False) == []
    (cold,) = plan_prefill(qo[:2], kv[:1].repeat(2), slots[:0], [0], [2], budget=1, fa3=False)
    assert cold.dedup is None
    with pytest.raises(RuntimeError, match="exceeds the prefill scratch of 3 rows"):
        plan_prefill(qo, kv, slots, pre, ext, budget=3, fa3=False)


def test_attention_sinks_reach_both_kernels(server_args):
    """A layer's sink logits (gpt-oss style) go to the extend and the decode kernel."""
    backend, pool, req_to_token = _make_backend(server_args)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    sinks = torch.linspace(-1.0, 3.0, HQ, device=DEV)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(10, seed=1)
    out = backend.forward_extend(q, k, v, layer, fb, sinks=sinks).view(10, HQ, D)
    codes, codec = _packed_ref(pool, 0)
    md = backend.forward_metadata
    want = tq_extend_ref(
        q,
        k,
        v,
        *codes,
        md.qo_indptr,
        md.kv_indptr,
        md.kv_indices,
        codec,
        layer.scaling,
        sinks=sinks,
    )
    assert rel(out, want) < 2e-2
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(2, seed=2)
    out = backend.forward_decode(q, k, v, layer, fb, sinks=sinks).view(2, HQ, D)
    indptr = _t([0, 13, 17])
    indices = torch.cat([req_to_token.req_to_token[1, :13], req_to_token.req_to_token[2, :4]])
    want = tq_decode_ref(q, *codes, indptr, indices, codec, layer.scaling, sinks=sinks)
    assert rel(out, want) < 2e-2
    assert rel(out, tq_decode_ref(q, *codes, indptr, indices, codec, layer.scaling)) > 5e-2
    with pytest.raises(RuntimeError, match="score_mod"):
        backend.forward_decode(q, k, v, layer, fb, score_mod=lambda *a: None)


@pytest.mark.parametrize("packed_prefill", [False, True])
def test_sliding_window_layer_reads_only_its_window(server_args, packed_prefill):
    """A window layer on the plain pool (how SGLang 0.5.17 serves Gemma 3): extend attends
    the last W prefix tokens plus the chunk under a window of W + 1 keys, decode the last W
    slots (SGLang's window metadata, its semantics), each against the torch twin; a
    full-attention layer of the same batch still sees everything."""
    sws = 4
    backend, pool, req_to_token = _make_backend(
        server_args, packed_prefill=packed_prefill, bf16_layers=(), sliding_window=sws
    )
    window, full = _layer(0), _layer(1)
    window.sliding_window_size = sws
    for layer in (window, full):
        _fill_prefix(pool, layer.layer_id)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(10, seed=1)
    md = backend.forward_metadata
    chunk = torch.cat(CHUNKS) if packed_prefill else None
    for layer, w in ((window, sws + 1), (full, 0)):
        out = backend.forward_extend(q, k, v, layer, fb).view(10, HQ, D)
        codes, codec = (
            pool.get_packed_layer(layer.layer_id)[:4],
            pool.get_packed_layer(layer.layer_id).codec,
        )
        want = tq_extend_ref(
            q,
            k,
            v,
            *codes,
            md.qo_indptr,
            md.kv_indptr,
            md.kv_indices,
            codec,
            layer.scaling,
            sliding_window=w,
            chunk_slots=chunk,
        )
        assert rel(out, want) < 2e-2, layer.layer_id
        if w:  # the window changes the result: the test would notice full attention
            assert (
                rel(
                    out,
                    tq_extend_ref(
                        q,
                        k,
                        v,
                        *codes,
                        md.qo_indptr,
                        md.kv_indptr,
                        md.kv_indices,
                        codec,
                        layer.scaling,
                        chunk_slots=chunk,
                    ),
                )
                > 5e-2
            )
    (g,) = backend._prefill_window
    assert g.prefix_tokens == sws and g.kv_indices.tolist() == PREFIX[-sws:].tolist()
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(2, seed=2)
    indptr = _t([0, 13, 17])
    indices = torch.cat([req_to_token.req_to_token[1, :13], req_to_token.req_to_token[2, :4]])
    for layer, w in ((window, sws), (full, 0)):
        out = backend.forward_decode(q, k, v, layer, fb).view(2, HQ, D)
        packed = pool.get_packed_layer(layer.layer_id)
        want = tq_decode_ref(
            q, *packed[:4], indptr, indices, packed.codec, layer.scaling, sliding_window=w
        )
        assert rel(out, want) < 2e-2, layer.layer_id
        if w:
            assert (
                rel(
                    out, tq_decode_ref(q, *packed[:4], indptr, indices, packed.codec, layer.scaling)
                )
                > 5e-2
            )
    assert (
        rel(
            out,
            tq_decode_ref(
                q, *packed[:4], indptr, indices, packed.codec, layer.scaling, sliding_window=sws
            ),
        )
        > 5e-2
    )  # the full layer is not windowed


def test_sliding_window_layer_in_a_mixed_batch_is_refused(server_args):
    backend, pool, req_to_token = _make_backend(server_args, bf16_layers=(), sliding_window=4)
    layer = _layer(0)
    layer.sliding_window_size = 4
    _fill_prefix(pool, 0)
    fb = _mixed_batch(req_to_token)
    backend.init_forward_metadata(fb)
    with pytest.raises(RuntimeError, match="drop --enable-mixed-chunk"):
        backend.forward_extend(*_qkv(8, seed=3), layer, fb)


def test_backend_over_sglangs_hybrid_linear_pool(server_args):
    """SGLang's HybridLinearKVPool around packed inner pools (full-attention model layers 1
    and 3, addressed 0 and 1 inside): the backend writes through the wrapper and reads the
    inner pool of each layer, extend and decode against the torch twin."""
    from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool

    from sglang_tq.serving.backend import TQAttnBackend
    from sglang_tq.serving.pool import inner_pool_factory

    cfg = TQConfig(head_dim=D, seed=7)
    pool = HybridLinearKVPool(
        size=SLOTS - 1,
        dtype=torch.bfloat16,
        page_size=1,
        head_num=HKV,
        head_dim=D,
        full_attention_layer_ids=[1, 3],
        device=DEV,
        mamba_pool=None,
        full_kv_pool_class=inner_pool_factory(cfg, {None: (1, 3)}),
    )
    runner, req_to_token = _runner(server_args, pool)
    backend = TQAttnBackend(runner)
    assert backend.token_to_kv_pool is pool and backend._packed_pools == [pool.full_kv_pool]
    # the launch-side layer checks resolve each model layer through the wrapper
    from sglang.srt.layers.radix_attention import RadixAttention

    from sglang_tq.serving import refusals

    attn = dict(num_heads=HQ, head_dim=D, scaling=D**-0.5, num_kv_heads=HKV)
    runner.use_mla_backend = False
    runner.model = types.SimpleNamespace(
        modules=lambda: [RadixAttention(layer_id=i, **attn) for i in (1, 3)]
    )
    refusals.check_model_layers(runner, pool)
    runner.model = types.SimpleNamespace(modules=lambda: [RadixAttention(layer_id=2, **attn)])
    with pytest.raises(RuntimeError, match="attention layer 2: its layer has no packed KV pool"):
        refusals.check_model_layers(runner, pool)
    layer = _layer(3)
    _, pk, pv = _qkv(len(PREFIX), seed=103)
    pool.set_kv_buffer(layer, PREFIX, pk, pv)
    inner = pool.full_kv_pool.get_packed_layer(1)
    assert (inner.k_norms[PREFIX] > 0).all() and not pool.full_kv_pool.get_packed_layer(
        0
    ).k_norms.any()
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(10, seed=1)
    out = backend.forward_extend(q, k, v, layer, fb).view(10, HQ, D)
    md = backend.forward_metadata
    want = tq_extend_ref(
        q, k, v, *inner[:4], md.qo_indptr, md.kv_indptr, md.kv_indices, inner.codec, layer.scaling
    )
    assert rel(out, want) < 2e-2
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(2, seed=2)
    out = backend.forward_decode(q, k, v, layer, fb).view(2, HQ, D)
    indptr = _t([0, 13, 17])
    indices = torch.cat([req_to_token.req_to_token[1, :13], req_to_token.req_to_token[2, :4]])
    assert (
        rel(out, tq_decode_ref(q, *inner[:4], indptr, indices, inner.codec, layer.scaling)) < 2e-2
    )


@pytest.mark.parametrize("packed_prefill", [False, True])
def test_backend_over_sglangs_hybrid_swa_pool(server_args, packed_prefill):
    """gpt-oss's layout: SGLang's SWAKVPool with packed inner pools (model layer 0 a window
    layer in the "SWA" pool, layer 1 full), full slot s stored at SWA slot s + 3. The window
    layer must read and write SWA slots (the parent's translated window lists, the
    KVWriteLoc's SWA half; with --kv-quant-packed-prefill the chunk read back from its SWA
    slots) with sinks, the full layer full slots; each against the twin over the slots it
    should read."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from sglang_tq.serving.backend import TQAttnBackend
    from sglang_tq.serving.pool import inner_pool_factory

    sws, shift = 4, 3
    cfg = TQConfig(head_dim=D, seed=7)
    pool = SWAKVPool(
        size=SLOTS - 1,
        size_swa=SLOTS + shift,
        page_size=1,
        dtype=torch.bfloat16,
        head_num=HKV,
        head_dim=D,
        swa_attention_layer_ids=[0],
        full_attention_layer_ids=[1],
        device=DEV,
        enable_kv_cache_copy=False,
        post_capture_active=False,
        token_to_kv_pool_class=inner_pool_factory(cfg, {"Full": (1,), "SWA": (0,)}),
    )
    mapping = torch.arange(SLOTS + 1, device=DEV) + shift
    mapping[-1] = -1
    pool.register_mapping(mapping)
    runner, req_to_token = _runner(server_args, pool, sliding_window=sws)
    runner.server_args = types.SimpleNamespace(
        **{**vars(server_args), "kv_quant_packed_prefill": packed_prefill}
    )
    backend = TQAttnBackend(runner)
    assert backend.use_sliding_window_kv_pool and backend.packed_prefill == packed_prefill
    window, full = _layer(0), _layer(1)
    window.sliding_window_size = sws
    sinks = (torch.rand(HQ, generator=torch.Generator().manual_seed(4)) * 4 - 1).to(DEV)
    for layer in (window, full):
        _, pk, pv = _qkv(len(PREFIX), seed=100 + layer.layer_id)
        pool.set_kv_buffer(layer, KVWriteLoc(PREFIX, PREFIX + shift), pk, pv)
    swa_inner, full_inner = (
        pool.swa_kv_pool.get_packed_layer(0),
        pool.full_kv_pool.get_packed_layer(0),
    )
    assert (swa_inner.k_norms[PREFIX + shift] > 0).all() and not swa_inner.k_norms[
        PREFIX[:shift]
    ].any()
    assert (full_inner.k_norms[PREFIX] > 0).all()
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(10, seed=1)
    md = backend.forward_metadata
    assert torch.equal(md.swa_out_cache_loc, fb.out_cache_loc + shift)
    for layer, inner, sl, w in ((window, swa_inner, shift, sws + 1), (full, full_inner, 0, 0)):
        out = backend.forward_extend(q, k, v, layer, fb, sinks=sinks if w else None).view(10, HQ, D)
        want = tq_extend_ref(
            q,
            k,
            v,
            *inner[:4],
            md.qo_indptr,
            md.kv_indptr,
            md.kv_indices + sl,
            inner.codec,
            layer.scaling,
            sliding_window=w,
            sinks=sinks if w else None,
            chunk_slots=fb.out_cache_loc + sl if packed_prefill else None,
        )
        assert rel(out, want) < 2e-2, layer.layer_id
    # the chunk went to the SWA slots of the window layer and the full slots of the full layer
    assert (swa_inner.k_norms[fb.out_cache_loc + shift] > 0).all()
    assert (full_inner.k_norms[fb.out_cache_loc] > 0).all()
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(2, seed=2)
    indptr = _t([0, 13, 17])
    indices = torch.cat(
        [req_to_token.req_to_token[1, :13], req_to_token.req_to_token[2, :4]]
    ).long()
    outs = {}
    for layer, inner, sl, w in ((window, swa_inner, shift, sws), (full, full_inner, 0, 0)):
        outs[w] = backend.forward_decode(q, k, v, layer, fb, sinks=sinks if w else None).view(
            2, HQ, D
        )
        want = tq_decode_ref(
            q,
            *inner[:4],
            indptr,
            indices + sl,
            inner.codec,
            layer.scaling,
            sliding_window=w,
            sinks=sinks if w else None,
        )
        assert rel(outs[w], want) < 2e-2, layer.layer_id
    # reading the window layer's full slot ids (no translation) would give another answer
    assert (
        rel(
            outs[sws],
            tq_decode_ref(
                q,
                *swa_inner[:4],
                indptr,
                indices,
                swa_inner.codec,
                window.scaling,
                sliding_window=sws,
                sinks=sinks,
            ),
        )
        > 5e-2
    )


def _mixed_batch(req_to_token):
    """Request 2 is a running request (3 tokens in slots 30..32) decoding one token into
    slot 33, appended the way ``ScheduleBatch.mix_with_running`` appends it."""
    return _batch_with_prefix(
        req_to_token,
        ForwardMode.MIXED,
        _t([30, 31, 32, 33]),
        [5, 3],
        [7, 1],
        torch.cat([CHUNKS[0], _t([33])]),
    )


def test_mixed_batch_decodes_its_running_requests(server_args):
    """A mixed batch (--enable-mixed-chunk): the running request's token goes through
    tq_decode over its packed context plus its new slot, the chunk through tq_extend."""
    backend, pool, req_to_token = _make_backend(server_args)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    _, k_run, v_run = _qkv(3, seed=50)
    pool.set_kv_buffer(layer, _t([30, 31, 32]), k_run, v_run)
    fb = _mixed_batch(req_to_token)
    backend.init_forward_metadata(fb)
    mx = backend._mixed
    assert (mx.num_extend, mx.extend_tokens) == (1, 7)
    assert mx.kv_indices.tolist() == [30, 31, 32, 33] and mx.kv_indptr.tolist() == [0, 4]
    (g,) = backend._prefill
    assert (g.b0, g.b1, g.q0, g.q1, g.prefix_tokens, g.dedup.index.numel()) == (0, 1, 0, 7, 5, 5)
    q, k, v = _qkv(8, seed=3)
    out = backend.forward_extend(q, k, v, layer, fb).view(8, HQ, D)
    codes, codec = _packed_ref(pool, 0)
    want_ext = tq_extend_ref(
        q[:7], k[:7], v[:7], *codes, _t([0, 7]), _t([0, 5]), PREFIX, codec, layer.scaling
    )
    want_dec = tq_decode_ref(q[7:], *codes, _t([0, 4]), _t([30, 31, 32, 33]), codec, layer.scaling)
    assert rel(out[:7], want_ext) < 2e-2
    assert rel(out[7:], want_dec) < 2e-2


def test_mixed_batch_edges(server_args):
    """A mixed batch whose requests all decode one token runs tq_decode alone; one whose
    last request extends by more than one token is an ordinary extend."""
    backend, pool, req_to_token = _make_backend(server_args)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    fb = _mixed_batch(req_to_token)
    fb.extend_seq_lens_cpu = [1, 1]
    fb.extend_seq_lens = _t([1, 1])
    fb.extend_prefix_lens_cpu = [11, 3]
    fb.extend_prefix_lens = _t([11, 3])
    fb.out_cache_loc = _t([26, 33])
    fb.seq_lens_sum = 16
    req_to_token.req_to_token[1, :12] = torch.cat([PREFIX, CHUNKS[0]]).int()
    backend.init_forward_metadata(fb)
    mx = backend._mixed
    assert (mx.num_extend, mx.extend_tokens) == (0, 0) and backend._prefill == []
    q, k, v = _qkv(2, seed=4)
    out = backend.forward_extend(q, k, v, layer, fb).view(2, HQ, D)
    codes, codec = _packed_ref(pool, 0)
    indices = torch.cat([req_to_token.req_to_token[1, :12], _t([30, 31, 32, 33])])
    want = tq_decode_ref(q, *codes, _t([0, 12, 16]), indices, codec, layer.scaling)
    assert mx.kv_indices.tolist() == indices.tolist()
    assert rel(out, want) < 2e-2

    fb = _mixed_batch(req_to_token)
    fb.extend_seq_lens_cpu, fb.extend_seq_lens = [1, 7], _t([1, 7])
    fb.extend_prefix_lens_cpu, fb.extend_prefix_lens = [11, 5], _t([11, 5])
    backend.init_forward_metadata(fb)
    assert backend._mixed is None


def test_packed_prefill_reads_the_chunk_back_from_the_cache(server_args):
    backend, pool, req_to_token = _make_backend(server_args, packed_prefill=True)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    q, k, v = _qkv(10, seed=1)
    out = backend.forward_extend(q, k, v, layer, fb)
    codes, codec = _packed_ref(pool, 0)
    qo = _t([0, 7, 10])
    want = tq_extend_ref(
        q,
        k,
        v,
        *codes,
        qo,
        _t([0, 5, 5]),
        PREFIX,
        codec,
        layer.scaling,
        chunk_slots=torch.cat(CHUNKS),
    )
    assert rel(out.view(10, HQ, D), want) < 2e-2
    bf16_chunk = tq_extend_ref(q, k, v, *codes, qo, _t([0, 5, 5]), PREFIX, codec, layer.scaling)
    assert rel(out.view(10, HQ, D), bf16_chunk) > rel(out.view(10, HQ, D), want)


def _after_prefill(server_args, bf16_layers=(BF16_LAYER,)):
    """A backend whose packed layer 0 holds the prefix and the extend batch's chunks, and a
    snapshot of that layer's codes and norms (decode tests restore it between runs)."""
    backend, pool, req_to_token = _make_backend(server_args, bf16_layers=bf16_layers)
    layer = _layer(0)
    _fill_prefix(pool, 0)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    backend.forward_extend(*_qkv(10, seed=1), layer, fb)
    return backend, pool, req_to_token, layer, [t.clone() for t in pool.get_packed_layer(0)[:4]]


def test_cuda_graph_path_uses_preallocated_buffers_and_matches_eager(server_args):
    backend, pool, req_to_token, layer, snapshot = _after_prefill(server_args)

    q, k, v = _qkv(2, seed=2)
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    eager = backend.forward_decode(q, k, v, layer, fb)

    for t, s in zip(pool.get_packed_layer(0)[:4], snapshot):
        t.copy_(s)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    ws = backend._graph_ws
    fb = _decode_batch(req_to_token, padded_to=4)
    backend.init_forward_metadata_out_graph(fb, in_capture=True)
    assert backend._decode_ws is ws
    qp, kp, vp = (
        torch.cat([x, torch.zeros(2, *x.shape[1:], dtype=x.dtype, device=DEV)]) for x in (q, k, v)
    )
    graph = backend.forward_decode(qp, kp, vp, layer, fb)
    assert torch.isfinite(graph.float()).all()
    assert torch.equal(graph[:2], eager)
    # replay: same buffers refilled in place, the metadata object is kept
    md = backend.forward_metadata
    backend.init_forward_metadata_out_graph(fb)
    assert backend.forward_metadata is md and backend._decode_ws is ws


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_match_eager(server_args):
    """A real torch.cuda.CUDAGraph: capture forward_decode (store + decode) once, replay it
    with new q/k/v copied into the static inputs, and compare with eager decode on the same
    pool state, bit for bit (the same kernels on the same data)."""
    backend, pool, req_to_token, layer, snapshot = _after_prefill(server_args)

    def restore():
        for t, saved in zip(pool.get_packed_layer(0)[:4], snapshot):
            t.copy_(saved)

    inputs = {seed: _qkv(2, seed=seed) for seed in (2, 3)}
    eager = {}
    for seed, (q, k, v) in inputs.items():
        restore()
        fb = _decode_batch(req_to_token)
        backend.init_forward_metadata(fb)
        eager[seed] = backend.forward_decode(q, k, v, layer, fb).clone()

    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    fb = _decode_batch(req_to_token, padded_to=4)
    static = [torch.zeros(4, h, D, dtype=torch.bfloat16, device=DEV) for h in (HQ, HKV, HKV)]
    backend.init_forward_metadata_out_graph(fb, in_capture=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compilation, autotuning)
        backend.forward_decode(*static, layer, fb)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward_decode(*static, layer, fb)
    for seed, (q, k, v) in inputs.items():
        restore()
        for buf, x in zip(static, (q, k, v)):
            buf.zero_()
            buf[:2].copy_(x)
        backend.init_forward_metadata_out_graph(fb)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:2], eager[seed]), f"replay with inputs {seed} differs from eager"
        # the replay's store wrote the new tokens' codes like an eager store would
        assert torch.equal(
            pool.get_packed_layer(0).k_norms[_t([40, 41])],
            _store_norms_of(k, pool.get_packed_layer(0)),
        )


def _store_norms_of(k, packed):
    from sglang_tq.kernels.tq_store import tq_store_kv

    kc, kn, vc, vn = (torch.zeros_like(t[:2]) for t in packed[:4])
    tq_store_kv(
        k.contiguous(), k.contiguous(), torch.arange(2, device=DEV), kc, kn, vc, vn, packed.codec
    )
    return kn


def test_decode_scratch_is_not_doubled(server_args):
    """No bf16 layer: SGLang's split-KV logits hold no bytes (eager and graph state), eager
    batches that fit share the graph workspace, and a larger eager batch's workspace is
    sized to it and given up when the batches shrink again."""
    backend, pool, req_to_token, layer, _ = _after_prefill(server_args, bf16_layers=())
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    assert backend.forward_metadata.attn_logits.numel() == 0
    assert backend.forward_metadata.attn_logits.shape[:3] == (2, HQ, backend.max_kv_splits)
    eager = backend.forward_decode(*_qkv(2, seed=2), layer, fb)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    assert backend.cuda_graph_attn_logits.numel() == 0 and backend._eager_ws is None
    assert backend.v_head_dim == D  # restored after the parent's allocations
    graph_ws = backend._graph_ws
    backend.init_forward_metadata(fb)
    assert backend._decode_ws is graph_ws  # 2 sequences fit the graph workspace
    for bs, rows in ((65, 128), (100, 128), (200, 256), (90, 128)):
        backend._use_eager_workspace(bs)
        assert backend._decode_ws is backend._eager_ws and backend._eager_ws.q_rot.shape[0] == rows
    backend._use_eager_workspace(30)
    assert backend._decode_ws is graph_ws and backend._eager_ws is None
    with_bf16, _, _ = _make_backend(server_args)  # a bf16 layer runs SGLang's decode: kept
    with_bf16.init_forward_metadata(_decode_batch(req_to_token))
    assert with_bf16.forward_metadata.attn_logits.shape == (2, HQ, with_bf16.max_kv_splits, D)
    assert torch.isfinite(eager.float()).all()


def _bf16_layer_steps(backend, pool, req_to_token):
    """An extend then a decode step on the bf16 layer; returns both outputs and the inputs."""
    layer = _layer(BF16_LAYER)
    pk, pv = _fill_prefix(pool, BF16_LAYER)
    assert torch.equal(pool.get_key_buffer(BF16_LAYER)[PREFIX], pk)
    fb = _extend_batch(req_to_token)
    backend.init_forward_metadata(fb)
    ext = _qkv(10, seed=1)
    out_e = backend.forward_extend(*ext, layer, fb)
    assert torch.equal(pool.get_value_buffer(BF16_LAYER)[CHUNKS[0]], ext[2][:7])
    fb = _decode_batch(req_to_token)
    backend.init_forward_metadata(fb)
    dec = _qkv(2, seed=2)
    out_d = backend.forward_decode(*dec, layer, fb)
    assert torch.equal(pool.get_key_buffer(BF16_LAYER)[_t([40, 41])], dec[1])
    return out_e, out_d, ext, dec, (pk, pv)


def test_bf16_layer_goes_to_sglang_triton_kernels(server_args):
    """On the CPU SGLang's own Triton kernels do not run under the interpreter, so this
    records what the parent backend hands them: the bf16 buffers of the layer."""
    backend, pool, req_to_token = _make_backend(server_args)
    calls = []
    backend.extend_attention_fwd = lambda *a, **kw: calls.append(("extend", a))
    backend.decode_attention_fwd = lambda *a, **kw: calls.append(("decode", a))
    _bf16_layer_steps(backend, pool, req_to_token)
    (kind_e, args_e), (kind_d, args_d) = calls
    assert (kind_e, kind_d) == ("extend", "decode")
    assert args_e[4] is pool.get_key_buffer(BF16_LAYER) and args_e[5] is pool.get_value_buffer(
        BF16_LAYER
    )
    assert args_d[1] is pool.get_key_buffer(BF16_LAYER) and args_d[2] is pool.get_value_buffer(
        BF16_LAYER
    )
    with pytest.raises(RuntimeError, match="get_packed_layer"):
        pool.get_key_buffer(0)


@pytest.mark.gpu
def test_bf16_layer_runs_sglang_kernels_and_matches_attention(server_args):
    """On CUDA the bf16 layer runs SGLang's real Triton kernels, compared with plain
    attention over the bf16 K/V (bf16 inputs: 2e-2 relative, as for the packed layers)."""
    from sglang_tq.kernels.tq_decode import attention_ref

    backend, pool, req_to_token = _make_backend(server_args)
    out_e, out_d, (q, k, v), (qd, kd, vd), (pk, pv) = _bf16_layer_steps(backend, pool, req_to_token)
    scale = _layer(BF16_LAYER).scaling
    f = torch.float64
    want_e = torch.cat(
        [
            attention_ref(
                q[:7].to(f),
                torch.cat([pk, k[:7]]).to(f),
                torch.cat([pv, v[:7]]).to(f),
                scale,
                causal_offset=5,
            ),
            attention_ref(q[7:].to(f), k[7:].to(f), v[7:].to(f), scale, causal_offset=0),
        ]
    )
    assert rel(out_e.view(10, HQ, D), want_e) < 2e-2
    kb, vb = pool.get_key_buffer(BF16_LAYER), pool.get_value_buffer(BF16_LAYER)
    rows = [req_to_token.req_to_token[1, :13].long(), req_to_token.req_to_token[2, :4].long()]
    want_d = torch.cat(
        [
            attention_ref(qd[i : i + 1].to(f), kb[r].to(f), vb[r].to(f), scale)
            for i, r in enumerate(rows)
        ]
    )
    assert rel(out_d.view(2, HQ, D), want_d) < 2e-2


def test_factory_refuses_a_stock_pool(server_args):
    from sglang_tq.serving.backend import create_tq_backend

    runner = types.SimpleNamespace(token_to_kv_pool=object())
    with pytest.raises(RuntimeError, match="--kv-quant turboquant"):
        create_tq_backend(runner)


def test_split_ceiling_shares_the_workspace_of_a_large_batch(server_args):
    backend, _, _ = _make_backend(server_args, bf16_layers=())
    base = backend.max_kv_splits
    assert backend.max_splits(64) == backend.max_splits(300) == base
    assert backend.max_splits(1) == 128 and backend.max_splits(8) == 64
    assert backend.max_splits(16) == 32 and backend.max_splits(32) == 2 * base
    assert backend.max_splits(33) == base  # rounded down to a power of two
    for grown in (1, 5, 64, 100):
        ws = backend._workspace(grown)
        assert all(ws.fits(bs, backend.max_splits(bs)) for bs in range(1, grown + 1))
    capped, _, _ = _make_backend(server_args)  # a bf16 layer: SGLang's kernel shares the counts
    assert capped.max_splits(1) == base


def test_mma_decode_opt_in_refuses_an_unsupported_model_at_start_up(server_args, monkeypatch):
    """SGLANG_TQ_DECODE_IMPL=mma on a model the CUDA kernel cannot serve (here head_dim 64)
    stops the backend's construction with one sentence, not a failure at the first decode."""
    monkeypatch.setenv("SGLANG_TQ_DECODE_IMPL", "mma")
    with pytest.raises(ValueError, match="SGLANG_TQ_DECODE_IMPL=mma: .*head_dim 128"):
        _make_backend(server_args)
    monkeypatch.setenv("SGLANG_TQ_DECODE_IMPL", "cuda")
    with pytest.raises(ValueError, match="must be one of triton, mma"):
        _make_backend(server_args)

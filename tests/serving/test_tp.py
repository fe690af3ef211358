"""Tensor parallelism, rank by rank on one device (issue 18's CPU part): each attention-TP
rank of SGLang's configurator sizes and builds a packed pool of its own KV heads with the same
per-layer codecs as TP = 1, and a rank's decode of its heads equals the matching slice of the
TP = 1 decode bit for bit (heads are independent: same codes, same rotation, same splits).
With more ranks than KV heads, SGLang replicates heads and each rank holds one. The run on
several GPUs (NCCL, the model's sharded projections) is not covered here."""

import types

import pytest
import torch
from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator
from sglang.srt.runtime_context import get_parallel

from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode
from sglang_tq.serving import integration
from tests.conftest import HAS_CUDA
from tests.serving.conftest import DEV, make_server_args, real_configurator

KV_HEADS, GQA, D = 8, 4, 128  # Llama-3.1-8B


def _rank_pool(tp, rank, monkeypatch, size=64):
    monkeypatch.setattr(integration, "_memory_saver_enabled", lambda: False)
    with get_parallel().override(attn_tp_size=tp, attn_tp_rank=rank, attn_cp_size=1):
        kvc = real_configurator(make_server_args("--kv-quant", "turboquant", "--tp-size", str(tp)))
        kvc.device = DEV
        cell = create_memory_pool_configurator(kvc)._cell_size
        pool = kvc._build_token_to_kv_pool(
            sizes=types.SimpleNamespace(max_total_num_tokens=size),
            is_dsa_model=False,
            is_dsv4_model=False,
            req_to_token_pool=None,
        )
    return cell, pool


@pytest.mark.parametrize("tp, heads", [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)])
def test_each_rank_sizes_and_builds_its_heads_with_the_same_codecs(tp, heads, monkeypatch):
    _, ref = _rank_pool(1, 0, monkeypatch)
    for rank in sorted({0, tp - 1}):
        cell, pool = _rank_pool(tp, rank, monkeypatch)
        assert pool.head_num == heads
        assert cell == 32 * heads * 132  # 32 layers, k4v4, d 128
        assert sum(pool.get_kv_size_bytes()) == cell * 65
        for layer in (0, 17, 31):  # every rank draws the same Π
            a, b = pool.get_packed_layer(layer).codec, ref.get_packed_layer(layer).codec
            assert torch.equal(a.pi.cpu(), b.pi.cpu()) and a.seed == b.seed


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_decode_equals_the_tp1_slice_of_its_heads(tp, monkeypatch):
    """K/V of 8 KV heads written through each rank's pool (its heads only) and through the
    TP = 1 pool; each rank's decode output is exactly the TP = 1 output of its query heads."""
    g = torch.Generator().manual_seed(tp)
    lens, slots = (1, 29, 70), 100
    k = torch.randn(slots, KV_HEADS, D, generator=g).bfloat16().to(DEV)
    v = torch.randn(slots, KV_HEADS, D, generator=g).bfloat16().to(DEV)
    q = torch.randn(len(lens), KV_HEADS * GQA, D, generator=g).bfloat16().to(DEV)
    loc = torch.arange(slots, device=DEV)
    indices = torch.randperm(slots, generator=g)[: sum(lens)].to(DEV)
    indptr = torch.tensor((0,) + lens).cumsum(0).int().to(DEV)
    splits = torch.tensor([1, 2, 3], dtype=torch.int32, device=DEV)
    kw = {} if HAS_CUDA else dict(block_n=16)

    def decode(pool, heads_kv, q_heads):
        layer = types.SimpleNamespace(layer_id=5)
        pool.set_kv_buffer(layer, loc, k[:, heads_kv], v[:, heads_kv])
        p = pool.get_packed_layer(5)
        qh = q[:, q_heads].contiguous()
        ws = DecodeWorkspace.create(len(lens), qh.shape[1], D, 4, DEV)
        return tq_decode(
            qh,
            p.k_codes,
            p.k_norms,
            p.v_codes,
            p.v_norms,
            indptr,
            indices,
            p.codec,
            D**-0.5,
            num_kv_splits=splits,
            max_kv_splits=4,
            workspace=ws,
            **kw,
        ).clone()

    _, full = _rank_pool(1, 0, monkeypatch, size=slots)
    want = decode(full, slice(None), slice(None))
    per = KV_HEADS // tp
    for rank in range(tp):
        _, pool = _rank_pool(tp, rank, monkeypatch, size=slots)
        got = decode(
            pool,
            slice(rank * per, (rank + 1) * per),
            slice(rank * per * GQA, (rank + 1) * per * GQA),
        )
        assert torch.equal(got, want[:, rank * per * GQA : (rank + 1) * per * GQA])

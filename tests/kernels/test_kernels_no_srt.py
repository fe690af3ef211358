"""tests/kernels runs without SGLang: in an interpreter where ``sglang.srt`` cannot be imported,
every module of ``sglang_tq.kernels`` (and ``sglang_tq.format``, which they build on) imports,
and a tiny store + decode matches the torch twins (tests/conftest.py, ``check_without_sglang_srt``;
Triton under TRITON_INTERPRET=1 without CUDA). The SGLang extend kernel that
``tq_extend`` imports lazily (``sglang.kernels``) is not run here."""

from tests.conftest import check_without_sglang_srt

SMOKE = """
import torch

from sglang_tq.format.codec import LayerCodec
from sglang_tq.format.packing import unpack
from sglang_tq.kernels.tq_decode import DecodeWorkspace, tq_decode, tq_decode_ref
from sglang_tq.kernels.tq_store import tq_store_kv, tq_store_kv_ref

dev = "cuda" if torch.cuda.is_available() else "cpu"
blocks = {} if dev == "cuda" else dict(block_n=16)
codec = LayerCodec.create(64, 4, 4, seed=3, device=dev)
g = torch.Generator().manual_seed(0)
n, hkv, gqa = 20, 2, 2
k = torch.randn(n, hkv, 64, generator=g).bfloat16().to(dev)
v = torch.randn(n, hkv, 64, generator=g).bfloat16().to(dev)
loc = torch.arange(n, device=dev)
got, want = codec.alloc_buffers(n, hkv, dev), codec.alloc_buffers(n, hkv, dev)
tq_store_kv(k, v, loc, *got, codec)
tq_store_kv_ref(k, v, loc, *want, codec)
for gc, wc in ((got[0], want[0]), (got[2], want[2])):
    assert (unpack(gc, 4, 64).int() - unpack(wc, 4, 64).int()).abs().max() <= 1

lens = (3, 17)
indptr = torch.tensor((0,) + lens).cumsum(0).int().to(dev)
indices = torch.randperm(n, generator=g)[: sum(lens)].to(dev)
q = torch.randn(len(lens), hkv * gqa, 64, generator=g).bfloat16().to(dev)
ws = DecodeWorkspace.create(len(lens), hkv * gqa, 64, 2, dev)
splits = torch.tensor([1, 2], dtype=torch.int32, device=dev)
out = tq_decode(q, *got, indptr, indices, codec, 64**-0.5, num_kv_splits=splits, max_kv_splits=2,
                workspace=ws, **blocks)
ref = tq_decode_ref(q, *got, indptr, indices, codec, 64**-0.5)
err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
assert err < 0.05, err
"""


def test_kernels_import_and_run_without_sglang_srt():
    out = check_without_sglang_srt(["sglang_tq.format", "sglang_tq.kernels"], SMOKE)
    for module in (
        "sglang_tq.kernels.tq_store",
        "sglang_tq.kernels.tq_decode",
        "sglang_tq.kernels.tq_extend",
        "sglang_tq.kernels.tq_dequant",
    ):
        assert module in out.split(), out

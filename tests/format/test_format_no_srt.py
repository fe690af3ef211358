"""tests/format runs without SGLang: in an interpreter where ``sglang.srt`` cannot be imported,
every module of ``sglang_tq.format`` imports, and the quantizer, the bit packing and the layer
codec run (tests/conftest.py, ``check_without_sglang_srt``)."""

from tests.conftest import check_without_sglang_srt

SMOKE = """
import torch

from sglang_tq import TurboQuantizer
from sglang_tq.format import packing
from sglang_tq.format.codec import LayerCodec

g = torch.Generator().manual_seed(0)
x = torch.randn(64, 128, generator=g)
q = TurboQuantizer(128, 4, seed=7)
codes, norms = q.quantize(x)
err = ((q.dequantize(codes, norms) - x).norm() / x.norm()).item()
assert err < 0.15, err  # 4 bits: relative MSE near 0.0093
idx = torch.randint(0, 8, (5, 64), generator=g).to(torch.uint8)
assert torch.equal(packing.unpack(packing.pack(idx, 3), 3, 64), idx)
codec = LayerCodec.create(64, 4, 3, seed=1)
assert [tuple(b.shape) for b in codec.alloc_buffers(8, 2)][::2] == [(8, 2, 32), (8, 2, 24)]
"""


def test_format_imports_and_runs_without_sglang_srt():
    out = check_without_sglang_srt(["sglang_tq.format"], SMOKE)
    for module in (
        "sglang_tq.format.quantizer",
        "sglang_tq.format.codec",
        "sglang_tq.format.priorart",
    ):
        assert module in out.split(), out

"""Kernel timing shared by the package's kernel benchmarks (decode, decode-mla, ab-decode):
a step captured once in a CUDA graph, as SGLang runs decode, and its replay timed by
``triton.testing.do_bench`` (median; L2 cleared before every call, outside the timed
range), several passes, the median of their medians."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def capture(step: Callable) -> tuple[Callable, str | None]:
    """(graph replay, None) for ``step`` captured in a CUDA graph after two warm-up calls on
    a side stream; (step, note) where the capture fails, to be timed eagerly."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay, None
    except Exception as exc:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return (
            step,
            f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); timed eager",
        )


def time_replay(
    step: Callable, warmup: float, rep: float, repeat: int, cuda_graph: bool = True
) -> dict:
    """ms (median of ``repeat`` do_bench medians), the passes, their spread in %, whether a
    graph replay was timed, and the capture's note where it failed."""
    import triton.testing

    run, note = capture(step) if cuda_graph else (step, None)
    runs = [
        triton.testing.do_bench(run, warmup=warmup, rep=rep, return_mode="median")
        for _ in range(repeat)
    ]
    spread = (max(runs) - min(runs)) / min(runs) * 100 if len(runs) > 1 and min(runs) > 0 else 0.0
    return {
        "ms": statistics.median(runs),
        "ms_runs": runs,
        "spread_pct": round(spread, 2),
        "cuda_graph": cuda_graph and note is None,
        "timing_note": note,
    }

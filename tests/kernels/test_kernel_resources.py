"""The decode kernel compiles for Hopper (sm_90a) at the built-in launch of every head_dim
(what a GPU missing from the launch table runs) without register spills, and its loop uses the prmt lookup: checked offline with Triton's own
ptxas and cuobjdump (``python -m sglang_tq.tools.kernel_resources``), so it runs on CPU-only CI. Spills or a
lost asm path would make the kernel several times slower without failing any numeric
test (notes/perf.md, v0 → v1). Entries of the measured table are timed, not checked here:
a winner may carry a few spilled bytes (d = 256 k4v2 on the H200: 16)."""

import json
import os
import subprocess
import sys

import pytest

from sglang_tq.kernels.tq_decode import builtin_launch
from tests.conftest import ROOT

TOOL = [sys.executable, "-m", "sglang_tq.tools.kernel_resources"]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_builtin_launch_compiles_without_spills(head_dim, tmp_path):
    launch = builtin_launch(head_dim)
    out = tmp_path / "resources.json"
    # a fresh interpreter without TRITON_INTERPRET: the interpreter cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [
            *TOOL,
            "--head-dim",
            str(head_dim),
            "--kv",
            "k4v4,k3v3,k2v2",
            "--block-n",
            str(launch.block_n),
            "--num-warps",
            str(launch.num_warps),
            "--num-stages",
            str(launch.num_stages),
            "--prefetch",
            str(int(launch.prefetch)),
            "--out",
            str(out),
        ],
        env=env,
        cwd=ROOT,  # the checkout's sglang_tq, not another install's
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = json.loads(out.read_text())
    assert [r["kv"] for r in rows] == ["k4v4", "k3v3", "k2v2"]
    for r in rows:
        assert r["regs"] is not None and r["regs"] <= 255
        assert r["spill_bytes"] == 0, f"{r['kv']} d={head_dim}: {r['spill_bytes']} bytes of spills"
        assert r["loop_mix"].get("PRMT", 0) > 0 and r["loop_mix"].get("HMMA", 0) > 0


def _resources(tmp_path, *args):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [*TOOL, *args, "--out", str(out)],
        env=env,
        cwd=ROOT,  # the checkout's sglang_tq, not another install's
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "args",
    [
        ["--kernel", "store", "--kv", "k4v4,k3v3", "--num-warps", "4", "--fwht", "0,1"],
        ["--kernel", "merge", "--fwht", "0,1"],
        [
            "--kernel",
            "stage1",
            "--kv",
            "k4v4,k3v3",
            "--block-n",
            "32",
            "--num-warps",
            "1",
            "--num-stages",
            "2",
            "--heads-n",
            "1",
            "--fuse-rot",
            "1,2",
        ],
    ],
    ids=["store", "merge", "stage1-fused"],
)
def test_walsh_hadamard_rotations_read_no_rotation_matrix(args, tmp_path):
    """The fast Walsh-Hadamard variants (notes/perf.md, session 15) exist to drop each program's
    read of Π: they must compile for sm_90a without spills and issue fewer global loads than
    the dense product of the same configuration."""
    rows = _resources(tmp_path, *args)
    key = "fuse_rot" if "--fuse-rot" in args else "fwht"
    dense = [r for r in rows if r[key] == (1 if key == "fuse_rot" else 0)]
    fast = [r for r in rows if r[key] == (2 if key == "fuse_rot" else 1)]
    assert len(dense) == len(fast) >= 1
    for d, f in zip(dense, fast):
        assert f["spill_bytes"] == 0, f
        assert f["LDG"] < d["LDG"], (d["LDG"], f["LDG"])


def test_one_token_store_rotates_in_registers(tmp_path):
    """The store's one-token programs (``row_tokens``) exist to skip the 16-row tensor-core tile
    one real row pads: no spills, no MMA, a shorter program than the tile's."""
    rows = _resources(
        tmp_path,
        "--kernel",
        "store",
        "--kv",
        "k4v4,k3v3",
        "--num-warps",
        "1",
        "--fwht",
        "1",
        "--block-n",
        "1",
    )
    tiles = _resources(
        tmp_path,
        "--kernel",
        "store",
        "--kv",
        "k4v4,k3v3",
        "--num-warps",
        "4",
        "--fwht",
        "1",
        "--block-n",
        "16",
    )
    for r, t in zip(rows, tiles):
        assert r["spill_bytes"] == 0 and r["HMMA"] == 0 and r["HGMMA"] == 0, r
        assert r["sass_lines"] < t["sass_lines"], (r["sass_lines"], t["sass_lines"])


def test_mla_latent_kernels_compile_without_spills(tmp_path):
    """MLA's 512-d latent (issue 16): stage 1 with values = the key codes and RoPE scores at
    the built-in launch, and the keys-only store's dense rotation (the fast Walsh-Hadamard one
    is not used at 512), compile for sm_90a without spills."""
    launch = builtin_launch(512)
    rows = _resources(
        tmp_path,
        "--mla",
        "--head-dim",
        "512",
        "--gqa",
        "16",
        "--kv",
        "k4v4,k3v3,k2v2",
        "--block-n",
        str(launch.block_n),
        "--num-warps",
        str(launch.num_warps),
        "--num-stages",
        str(launch.num_stages),
        "--prefetch",
        "0",
    )
    assert [r["kv"] for r in rows] == ["k4v4", "k3v3", "k2v2"]
    for r in rows:
        assert r["spill_bytes"] == 0 and r["regs"] <= 255, r
        assert r["loop_mix"].get("HMMA", 0) > 0 and r["loop_mix"].get("PRMT", 0) > 0
    store = _resources(
        tmp_path,
        "--kernel",
        "store",
        "--head-dim",
        "512",
        "--kv",
        "k4v4,k3v3",
        "--num-warps",
        "4",
        "--fwht",
        "0",
    )
    assert all(r["spill_bytes"] == 0 for r in store), store

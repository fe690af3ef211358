"""The decode launch table: lookup by GPU name, head_dim and bit pair, the built-in
fallback, the environment override, refusal of a corrupt table, and the tuner's choice
and merge (``python -m sglang_tq.tools.tune``) that write it."""

import json

import pytest

import sglang_tq.tools.tune as tune
from sglang_tq.kernels import tq_decode as dec


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    path = tmp_path / "launch.json"
    path.write_text(
        json.dumps(
            {
                "_doc": "test table",
                "GPU X": {
                    "128": {
                        "k4v4": {
                            "block_n": 128,
                            "num_warps": 4,
                            "programs_per_sm": 3,
                            "geomean_ms": 0.5,
                            "commit": "abc",
                        }
                    },
                    "64": {
                        "k3v2": {
                            "block_n": 32,
                            "num_warps": 1,
                            "programs_per_sm": 8,
                            "prefetch": False,
                            "num_stages": 3,
                        }
                    },
                },
            }
        )
    )
    monkeypatch.setenv("SGLANG_TQ_DECODE_LAUNCH", str(path))
    dec.load_launch_table.cache_clear()
    yield path
    dec.load_launch_table.cache_clear()


def test_packaged_table_is_readable():
    table = dec.load_launch_table(str(dec.LAUNCH_TABLE))
    for dims in table.values():
        for per_kv in dims.values():
            assert all(isinstance(v, dec.DecodeLaunch) for v in per_kv.values())


def test_lookup_by_gpu_head_dim_and_bits(table_file):
    assert dec.default_launch(128, 4, 4, device_name="GPU X") == dec.DecodeLaunch(128, 4, 3)
    assert dec.default_launch(64, 3, 2, device_name="GPU X") == dec.DecodeLaunch(32, 1, 8, False, 3)
    assert dec.default_launch(128, 4, 4, device_name="GPU X").prefetch  # absent: the default
    # a bit pair the table lacks at this GPU and head_dim takes the nearest pair it has
    assert dec.default_launch(128, 3, 3, device_name="GPU X") == dec.DecodeLaunch(128, 4, 3)
    assert dec.default_launch(64, 4, 4, device_name="GPU X") == dec.DecodeLaunch(32, 1, 8, False, 3)
    # another head_dim or GPU falls back to the built-in launch
    assert dec.default_launch(256, 4, 4, device_name="GPU X") == dec.builtin_launch(256)
    assert dec.default_launch(128, 4, 4, device_name="GPU Y") == dec.builtin_launch(128)


def test_same_sm_gpu_takes_the_tuned_gpus_entries(table_file, monkeypatch):
    """A GPU the table lacks but ``SAME_SM`` maps to a tuned one (the H100 to the H200)
    gets that GPU's launch; a GPU the table names keeps its own entries."""
    packaged = dec.load_launch_table(str(dec.LAUNCH_TABLE))
    assert all(tuned in packaged for tuned in dec.SAME_SM.values())
    monkeypatch.setattr(dec, "SAME_SM", {"GPU Z": "GPU X", "GPU X": "GPU Y"})
    assert dec.default_launch(128, 4, 4, device_name="GPU Z") == dec.DecodeLaunch(128, 4, 3)
    assert dec.default_launch(128, 4, 4, device_name="GPU X") == dec.DecodeLaunch(128, 4, 3)
    assert dec.default_launch(128, 4, 4, device_name="GPU W") == dec.builtin_launch(128)


def test_missing_pair_takes_the_nearest_tuned_pair(table_file):
    """Fewest bits changed, then the most even change, then the same key bits, then
    the pair's name."""
    import json

    entry = lambda n: {"block_n": 32, "num_warps": 1, "programs_per_sm": n}  # noqa: E731
    table_file.write_text(
        json.dumps({"GPU X": {"128": {"k4v4": entry(1), "k4v2": entry(2), "k3v3": entry(3)}}})
    )
    dec.load_launch_table.cache_clear()
    pps = lambda kb, vb: dec.default_launch(128, kb, vb, device_name="GPU X").programs_per_sm  # noqa: E731
    assert pps(4, 3) == 2  # k4v2 and k4v4 both one value bit away: name order picks k4v2
    assert pps(2, 2) == 3  # k3v3 (1 + 1 bits) over k4v2 (2 + 0)
    assert pps(3, 4) == 3  # k3v3 (value bit) over k4v4 (key bit): the same key bits
    assert pps(3, 2) == 3  # k3v3 and k4v2 one bit away: the same key bits again


def test_split_policy_follows_the_table(table_file, monkeypatch):
    import torch

    monkeypatch.setattr(dec, "_device_name", lambda: "GPU X")
    lens = torch.full((16,), 8192)
    via_table = dec.default_num_kv_splits(lens, 8, 32, head_dim=128, k_bits=4, v_bits=4)
    explicit = dec.default_num_kv_splits(lens, 8, 32, launch=dec.DecodeLaunch(128, 4, 3))
    assert via_table.tolist() == explicit.tolist()


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "unreadable"),
        (json.dumps({"GPU X": {"128": {"k4v4": {"block_n": 64}}}}), "unreadable"),
        (
            json.dumps(
                {"GPU X": {"128": {"k4v4": {"block_n": 48, "num_warps": 2, "programs_per_sm": 2}}}}
            ),
            "block_n must be",
        ),
        (
            json.dumps(
                {"GPU X": {"128": {"k4v9": {"block_n": 32, "num_warps": 1, "programs_per_sm": 2}}}}
            ),
            "must look like k4v4",
        ),
    ],
)
def test_corrupt_table_is_refused_with_a_sentence(table_file, text, why):
    table_file.write_text(text)
    with pytest.raises(ValueError, match="sglang_tq.tools.tune --write-table") as err:
        dec.default_launch(128, 4, 4, device_name="GPU X")
    assert why in str(err.value)


def test_invalid_launch_is_refused():
    with pytest.raises(ValueError, match="num_warps"):
        dec.DecodeLaunch(64, 3, 2)


def _row(shape, bn, nw, pps, ms, prefetch=True, stages=2, heads_n=False):
    return {
        "shape": shape,
        "block_n": bn,
        "num_warps": nw,
        "programs_per_sm": pps,
        "prefetch": prefetch,
        "num_stages": stages,
        "heads_n": heads_n,
        "ms": ms,
    }


def test_tuner_grid_varies_pipelining_only_without_prefetch():
    grid = tune.launch_grid(tune.parse_tiles("64x2,32x1"), [4, 8], [1, 0], [2, 3], [0, 1])
    assert len(grid) == 2 * 2 * (1 + 2) * 2
    assert {g["heads_n"] for g in grid} == {False, True}
    assert {(g["block_n"], g["num_warps"]) for g in grid} == {(64, 2), (32, 1)}
    assert {g["num_stages"] for g in grid if g["prefetch"]} == {2}
    assert {g["num_stages"] for g in grid if not g["prefetch"]} == {2, 3}
    assert all(dec.DecodeLaunch(**g) for g in grid)
    assert {g["maxnreg"] for g in grid} == {0}
    capped = tune.launch_grid([(32, 1)], [12], [0], [3], [1], [0, 168])
    assert [g["maxnreg"] for g in capped] == [0, 168]
    assert dec.DecodeLaunch(**capped[1]).maxnreg == 168
    with pytest.raises(ValueError, match="maxnreg"):
        dec.DecodeLaunch(32, 1, 12, maxnreg=16)
    with pytest.raises(SystemExit, match="BLOCKxWARPS"):
        tune.parse_tiles("64,2")


def test_tuner_picks_the_smallest_geometric_mean_over_complete_configs():
    shapes = ["a", "b"]
    rows = [
        _row("a", 64, 2, 2, 1.0),
        _row("b", 64, 2, 2, 4.0),  # geomean 2.0
        _row("a", 128, 4, 2, 3.0, False, 3),
        _row("b", 128, 4, 2, 1.0, False, 3),  # 1.73
        _row("a", 128, 4, 2, 0.5),
        _row("b", 128, 4, 2, 9.0),  # same shape, prefetch: 2.12
        _row("a", 128, 4, 2, 3.0, False, 3, True),
        _row("b", 128, 4, 2, 2.0, False, 3, True),
        _row("a", 64, 4, 8, 0.1),  # missing b: not eligible
        {**_row("b", 64, 4, 8, 0.0), "error": "does not compile"},
    ]
    del rows[-1]["ms"]
    win = tune.choose(rows, shapes)
    assert (
        win["block_n"],
        win["num_warps"],
        win["programs_per_sm"],
        win["prefetch"],
        win["num_stages"],
    ) == (128, 4, 2, False, 3)
    assert win["geomean_ms"] == pytest.approx(3**0.5, abs=1e-5)
    assert win["best_ms_per_shape"] == {"a": 0.5, "b": 1.0}
    assert tune.choose([], shapes) is None


def test_tuner_merges_tables_and_writes_a_loadable_one(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    entry = {"block_n": 64, "num_warps": 2, "programs_per_sm": 4}
    a.write_text(json.dumps({"_doc": "x", "GPU X": {"128": {"k4v4": entry}}}))
    b.write_text(json.dumps({"GPU X": {"64": {"k4v4": entry}, "128": {"k3v3": entry}}}))
    assert tune.main(["--merge-tables", str(a), str(b), "--write-table", str(out)]) == 0
    merged = dec.load_launch_table(str(out))
    assert set(merged["GPU X"]) == {64, 128} and set(merged["GPU X"][128]) == {"k4v4", "k3v3"}
    with pytest.raises(SystemExit, match="needs --write-table"):
        tune.main(["--merge-tables", str(a)])

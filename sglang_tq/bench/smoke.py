"""Start an SGLang server, check that it answers /generate, record its token budget.

Used on the GPU host with a dummy-weight model config (no tokenizer needed):

    python scripts/server_smoke.py --model-path benchmarks/model_configs/llama-3.1-8b \
        --out smoke.json -- --attention-backend triton --mem-fraction-static 0.45

Everything after ``--`` goes to ``python -m sglang.launch_server`` unchanged.
The JSON holds the /generate reply, ``max_total_num_tokens`` parsed from the
server log, the start-up time and the provenance of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import Server, post

from sglang_tq.provenance import provenance

# two Llama-3 prompts; other vocabularies get them modulo their size (dummy weights: any id
# inside the vocabulary is a valid prompt, one outside it is a 400 or a crash)
PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, 16, 11, 17, 11, 18, 11]]


def vocab_size(model_path: str) -> int | None:
    """The model config's vocabulary size (top level or its ``text_config``), None if unknown."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def prompts_for(model_path: str) -> list[list[int]]:
    vocab = vocab_size(model_path)
    return [[i % vocab for i in p] for p in PROMPTS] if vocab else PROMPTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--port", type=int, default=30111)
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--log", default="server.log")
    ap.add_argument("--out", default="server_smoke.json")
    ap.add_argument(
        "server_args",
        nargs=argparse.REMAINDER,
        help="after --: extra arguments for sglang.launch_server",
    )
    args = ap.parse_args()
    extra = [a for a in args.server_args if a != "--"]
    server = Server(
        args.model_path,
        ["--load-format", "dummy", "--skip-tokenizer-init", *extra],
        args.log,
        port=args.port,
        startup_timeout=args.startup_timeout,
    )
    result = {**provenance(), "command": server.cmd, "ok": False}
    try:
        with server:
            result["startup_s"] = server.startup_s
            reply = post(
                server.base + "/generate",
                {
                    "input_ids": prompts_for(args.model_path),
                    "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0},
                },
                timeout=120,
            )
            result["reply"] = reply
            result["ok"] = all(len(r.get("output_ids", [])) == args.max_new_tokens for r in reply)
    except Exception as exc:
        result["error"] = repr(exc)
    log_text = open(args.log, errors="replace").read()
    m = re.findall(r"max_total_num_tokens=(\d+)", log_text)
    result["max_total_num_tokens"] = int(m[-1]) if m else None
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        json.dumps({k: result.get(k) for k in ("ok", "startup_s", "max_total_num_tokens", "error")})
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Start an SGLang server, check that it answers /generate, record its token budget.

Used on the GPU host with a dummy-weight model config (no tokenizer needed):

    python -m sglang_tq.bench smoke --model-path benchmarks/model_configs/llama-3.1-8b \
        --out smoke.json -- --attention-backend triton --mem-fraction-static 0.45

Everything after ``--`` goes to ``python -m sglang.launch_server`` unchanged.
The JSON holds the /generate reply, ``max_total_num_tokens`` parsed from the
server log, the start-up time and the provenance of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import add_model_path, doc_parser
from .results import get_provenance, write_doc
from .server import SGLangServer, post_json

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = doc_parser("python -m sglang_tq.bench smoke", __doc__)
    add_model_path(ap, required=True)
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
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    extra = [a for a in args.server_args if a != "--"]
    server = SGLangServer(
        args.model_path,
        ["--load-format", "dummy", "--skip-tokenizer-init", *extra],
        args.log,
        port=args.port,
    )
    prov = get_provenance()
    result = {"command": server.cmd, "ok": False}
    try:
        result["startup_s"] = server.start(args.startup_timeout)
        reply = post_json(
            server.base_url + "/generate",
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
    finally:
        server.stop()
    result["max_total_num_tokens"] = server.pool_from_log()["max_total_num_tokens"]
    write_doc(args.out, "sglang_tq.bench smoke", args.argv, prov, **result)
    print(
        json.dumps({k: result.get(k) for k in ("ok", "startup_s", "max_total_num_tokens", "error")})
    )
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

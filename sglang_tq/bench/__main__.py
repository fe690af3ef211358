"""``python -m sglang_tq.bench <subcommand> ...``: parse the subcommand's arguments, then run it."""

from __future__ import annotations

import importlib
import sys

from . import SUBCOMMANDS

USAGE = (
    "usage: python -m sglang_tq.bench <subcommand> [args]\n"
    "subcommands:\n"
    "  eval           GSM8K-CoT / HumanEval accuracy of KV configs, paired against bf16\n"
    "  eval prepare   build the evaluation's data folder (needs PyPI access)\n"
    "  decode-mla     MLA decode attention per step: packed latent vs SGLang's FA3 (bf16, fp8)\n"
    "`python -m sglang_tq.bench <subcommand> --help` describes each."
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}: choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name])
    args = module.parse_args(rest)
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())

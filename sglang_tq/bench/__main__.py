"""``python -m sglang_tq.bench <subcommand> ...``: parse the subcommand's arguments, then run it."""

from __future__ import annotations

import importlib
import sys

from . import SUBCOMMANDS


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = [f"  {name:<{width}}  {line}" for name, (_, line) in SUBCOMMANDS.items()]
    return "\n".join(
        [
            "usage: python -m sglang_tq.bench <subcommand> [args]",
            "subcommands:",
            *rows,
            "`python -m sglang_tq.bench <subcommand> --help` describes each.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}: choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.run(module.parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())

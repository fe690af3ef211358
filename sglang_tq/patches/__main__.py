"""``python -m sglang_tq.patches {status,apply,revert} [--root DIR]`` (see the package doc)."""

import argparse
import sys

from . import run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tq.patches",
        description="Apply the sglang-tq patch series to the installed SGLang.",
    )
    ap.add_argument("action", choices=("status", "apply", "revert"))
    ap.add_argument("--root", help="folder holding the sglang package (default: the imported one)")
    args = ap.parse_args(argv)
    try:
        for name, st in run(args.action, args.root):
            print(f"{name}: {st}")
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The argument vocabulary every ``python -m sglang_tq.bench`` subcommand shares.

One spelling per idea, so that a flag means the same thing in every benchmark:

* ``--shapes``: decode or prefill shapes, ``BxL`` (batch x context), ``BxLxD`` (with the head
  dim) and ``BxE+P`` / ``BxE+Ps`` (E new tokens on a P-token prefix, ``s``: one prefix shared
  by the batch); :func:`parse_shapes` reads all of them and each tool says which forms it takes;
* ``--kv``: TurboQuant bit pairs (``k4v4,k3v3``), parsed by :meth:`TQConfig.parse_bits`;
  server-level KV config labels (``bf16,fp8,k4v4-nc,hq4,...``) are
  :mod:`sglang_tq.bench.configs`' grammar instead;
* ``--out``: the results file; by default ``benchmarks/results/<tool>/<stem>_<gpu>_<commit>.json``
  (:func:`default_out`);
* ``--model-path``: an SGLang model folder (the dummy configs live in
  ``benchmarks/model_configs/``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

from sglang_tq.config import TQConfig

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MODEL_CONFIGS = REPO / "benchmarks" / "model_configs"

_SHAPE_RE = re.compile(r"(\d+)x(\d+)(?:x(\d+))?(?:\+(\d+)(s?))?")


class Shape(NamedTuple):
    batch: int
    length: int  # context (decode) or new tokens per request (prefill)
    head_dim: int | None = None  # None: the tool's --head-dim
    prefix: int = 0  # prefix tokens per request (prefill shapes)
    shared: bool = False  # one prefix shared by the whole batch

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    def __str__(self) -> str:
        dim = f"x{self.head_dim}" if self.head_dim is not None else ""
        pre = f"+{self.prefix}{'s' if self.shared else ''}" if self.prefix else ""
        return f"{self.batch}x{self.length}{dim}{pre}"


def parse_shapes(text: str, *, head_dim: bool = False, prefix: bool = False) -> list[Shape]:
    """``"1x4096,64x16384"`` -> shapes in order, repeats dropped. ``head_dim`` allows
    ``BxLxD``, ``prefix`` allows ``BxE+P[s]``; ValueError names the accepted forms."""
    forms = ["BxL"] + (["BxLxD"] if head_dim else []) + (["BxE+P", "BxE+Ps"] if prefix else [])
    shapes = []
    for item in (s.strip().lower() for s in str(text).split(",")):
        if not item:
            continue
        m = _SHAPE_RE.fullmatch(item)
        ok = (
            m is not None
            and (head_dim or m[3] is None)
            and (prefix or m[4] is None)
            and int(m[1]) >= 1
            and int(m[2]) >= 1
            and (m[3] is None or int(m[3]) >= 8)
        )
        if not ok:
            raise ValueError(
                f"--shapes takes {', '.join(forms)} with positive integers "
                f"(e.g. 1x4096,64x16384), got {item!r}."
            )
        shapes.append(
            Shape(
                int(m[1]),
                int(m[2]),
                int(m[3]) if m[3] else None,
                int(m[4] or 0),
                bool(m[5]),
            )
        )
    if not shapes:
        raise ValueError("--shapes is empty: give at least one shape such as 1x4096.")
    return list(dict.fromkeys(shapes))


class BenchParser(argparse.ArgumentParser):
    """An ArgumentParser whose namespace also carries ``argv``: the arguments as given (by
    the dispatcher, a test, or the command line), which every results file records."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        ns.argv = list(sys.argv[1:] if args is None else args)
        return ns


def doc_parser(prog: str, doc: str) -> BenchParser:
    """The parser of a tool run as ``prog``: its module docstring's first paragraph as the
    description and the rest, as written, after the options."""
    head, _, rest = doc.partition("\n\n")
    return BenchParser(
        prog=prog,
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _arg_type(fn, **kw):
    """An argparse ``type=`` that turns the parser's ValueError into a usage error."""

    def parse(text: str):
        try:
            return fn(text, **kw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def add_shapes(
    ap: argparse.ArgumentParser,
    default: str,
    *,
    head_dim: bool = False,
    prefix: bool = False,
    help: str = "comma list of shapes",
) -> None:
    forms = "BxL" + (" or BxLxD" if head_dim else "") + (", BxE+P or BxE+Ps" if prefix else "")
    ap.add_argument(
        "--shapes",
        type=_arg_type(parse_shapes, head_dim=head_dim, prefix=prefix),
        default=parse_shapes(default, head_dim=head_dim, prefix=prefix),
        help=f"{help}, each {forms} (default {default})",
    )


def parse_kv_bits(text: str) -> list[tuple[str, int, int]]:
    """``"k4v4,k3v3"`` -> [("k4v4", 4, 4), ("k3v3", 3, 3)], repeats dropped."""
    pairs = list(dict.fromkeys(TQConfig.parse_bits_list(text)))
    if not pairs:
        raise ValueError("--kv is empty: give bit pairs such as k4v4,k3v3.")
    return pairs


def add_kv_bits(ap: argparse.ArgumentParser, default: str = "k4v4,k3v3") -> None:
    ap.add_argument(
        "--kv",
        type=_arg_type(parse_kv_bits),
        default=parse_kv_bits(default),
        help=f"TurboQuant bit pairs, comma separated (default {default})",
    )


def add_model_path(ap: argparse.ArgumentParser, default: str | None = None, **kw) -> None:
    ap.add_argument(
        "--model-path",
        default=default,
        help=kw.pop("help", "model folder (weights, or a config.json for dummy weights)"),
        **kw,
    )


def add_out(ap: argparse.ArgumentParser, tool: str, stem: str | None = None) -> None:
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON (default: {stem or tool}_<gpu>_<commit>.json in the {tool} results folder)",
    )


def gpu_tag(gpu: str | None) -> str:
    """'NVIDIA H200' -> 'h200'; names without a model number -> a lower-case slug."""
    m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", gpu or "")
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", (gpu or "unknown").lower()).strip("-") or "unknown"


def default_out(tool: str, provenance: dict, stem: str | None = None) -> Path:
    """``benchmarks/results/<tool>/<stem>_<gpu>_<commit7>[-dirty].json``."""
    commit = str(provenance.get("commit") or "unknown")
    tag = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    return RESULTS / tool / f"{stem or tool}_{gpu_tag(provenance.get('gpu'))}_{tag}.json"

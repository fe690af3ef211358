"""Greedy generation on SGLang servers with logprobs: what ``fidelity`` and ``radix`` share.

* Config names: ``config_flags`` maps a name to its server flags, in this order: a name
  defined with ``--config NAME=FLAGS`` (`parse_config_specs`) or by `add_centered_configs`
  (``<config>-c``: keys centered by a ``--key-centers`` file); a label of the shared table
  :mod:`sglang_tq.bench.configs` (bf16, fp8, bf16-triton, kXvY, kXvY-nc, ...); a TurboQuant
  label plus ``-pp`` (``--kv-quant-packed-prefill``, e.g. k4v4-pp, k4v4-nc-pp).
* Servers: ``COMMON_SERVER_ARGS`` (token ids in and out, half the memory, seeded), `started`
  (start a :class:`~sglang_tq.bench.server.SGLangServer` with a start-up limit, always stop
  it) and `exit_on_sigterm` (``timeout``'s SIGTERM unwinds through those ``finally`` blocks,
  so no server outlives the tool).
* Requests and replies: `post_generate` (one POST /generate, the reply as a list) and the
  parsers of SGLang's logprob replies, which check the rows' alignment.

SGLang API used (0.5.17, checked in io_struct.GenerateReqInput, tokenizer_manager and
scheduler_components/logprob_result_processor): POST /generate with ``input_ids``,
``sampling_params``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``;
reply ``meta_info.output_token_logprobs`` = [[logprob, token_id, null], ...],
``meta_info.output_top_logprobs`` = [[[logprob, token_id, null] x K], ...] per generated
token; ``meta_info.input_token_logprobs`` has one entry per input token from
``logprob_start_len`` on, the first being [null, token_id, null]; entry j is
log P(input[start + j] | input[:start + j]); ``input_top_logprobs`` is aligned the same
way (entry 0 null). The parsers check this alignment (token ids, and the token's logprob
against the top-K list) and raise RuntimeError if it does not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
from collections.abc import Iterator

from sglang_tq.bench.configs import kv_server_flags
from sglang_tq.bench.fidelity_metrics import first_divergence
from sglang_tq.bench.server import SGLangServer, post_json

COMMON_SERVER_ARGS = (
    "--skip-tokenizer-init --mem-fraction-static 0.5 "
    "--cuda-graph-max-bs-decode 32 --disable-prefill-cuda-graph --random-seed 0"
)


def parse_config_specs(specs: list[str], error) -> dict[str, list[str]]:
    """``--config NAME=FLAGS`` values → {name: flags}; ``error`` (argparse's) on a bad one."""
    custom = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not flags:
            error(f"--config {spec!r}: expected NAME=FLAGS")
        custom[name.strip()] = shlex.split(flags)
    return custom


def add_centered_configs(
    names: list[str], custom: dict[str, list[str]], key_centers: str | None, error
) -> None:
    """Define each ``<config>-c`` name (keys quantized around the model's key centers) as
    ``<config>``'s flags plus ``--kv-quant-key-centers FILE``; ``error`` (argparse's) if no
    centers file was given or ``<config>`` is not a TurboQuant config with default centers."""
    for name in names:
        if name.endswith("-c") and name not in custom:
            if not key_centers:
                error(
                    f"config {name!r} (centered keys) needs --key-centers FILE, made by "
                    "python -m sglang_tq.tools.key_centers for this model"
                )
            base = config_flags(name[:-2], custom)
            if "--kv-quant" not in base or "--kv-quant-key-centers" in base:
                error(
                    f"config {name!r}: -c adds key centers to a TurboQuant config with default "
                    "centers (e.g. k4v4-c, k4v4-pp-c); drop the -c or the -nc"
                )
            custom[name] = [*base, "--kv-quant-key-centers", key_centers]


def config_flags(name: str, custom: dict[str, list[str]] | None = None) -> list[str]:
    """Server flags of a config name.

    In this order: a name of ``custom`` (--config NAME=FLAGS, and the -c names that
    `add_centered_configs` defines); a label of the shared table
    ``sglang_tq.bench.configs.kv_server_flags`` (bf16, fp8 on SGLang's default attention
    backend; bf16-triton, fp8-triton, bf16-fa3, fp8-fa3; kXvY with default key centers,
    kXvY-nc uncentered); a TurboQuant name of either kind plus ``-pp``
    (``--kv-quant-packed-prefill``), e.g. k4v4-pp, k4v4-nc-pp.
    """
    if custom and name in custom:
        return list(custom[name])
    try:
        return kv_server_flags(name)
    except ValueError:
        pass
    base, sep, suffix = name.rpartition("-")
    if sep and suffix == "pp":
        try:
            flags = config_flags(base, custom)
        except ValueError:
            flags = []
        if "--kv-quant" in flags and "--kv-quant-packed-prefill" not in flags:
            return [*flags, "--kv-quant-packed-prefill"]
    raise ValueError(
        f"unknown config {name!r}: use a label of sglang_tq.bench.configs (bf16, fp8, "
        "bf16-triton, fp8-triton, bf16-fa3, fp8-fa3, kXvY such as k4v4, kXvY-nc), a "
        "TurboQuant label plus -pp or -c (with --key-centers), or define it with "
        "--config NAME='flags'"
    )


def parse_generation(item: dict, max_new_tokens: int) -> dict:
    """One /generate reply (return_logprob, top_logprobs_num) -> tokens, own logprobs, top-K."""
    meta = item["meta_info"]
    otl = meta["output_token_logprobs"]
    tokens = [int(e[1]) for e in otl]
    if "output_ids" in item and list(item["output_ids"]) != tokens:
        raise RuntimeError("output_ids and output_token_logprobs disagree")
    if len(tokens) != max_new_tokens:
        raise RuntimeError(
            f"generated {len(tokens)} tokens, expected {max_new_tokens} "
            f"(finish_reason {meta.get('finish_reason')})"
        )
    top = meta["output_top_logprobs"]
    if len(top) != len(tokens):
        raise RuntimeError(f"{len(top)} top-logprob rows for {len(tokens)} tokens")
    return {"tokens": tokens, "token_lps": [float(e[0]) for e in otl], "top": top}


def parse_scoring(item: dict, prompt_len: int, gen_tokens: list) -> dict:
    """A /generate reply with logprob_start_len = prompt_len - 1 on prompt + gen_tokens
    -> bf16 logprob of each generated token and bf16's top-K at that position."""
    meta = item["meta_info"]
    itl, itop = meta["input_token_logprobs"], meta["input_top_logprobs"]
    n = len(gen_tokens)
    # entry 0 is token prompt[-1] (no logprob), entry 1 + i is gen_tokens[i]
    if len(itl) != n + 1 or len(itop) != n + 1:
        raise RuntimeError(
            f"scoring returned {len(itl)} / {len(itop)} input logprob rows, "
            f"expected {n + 1} (prompt_len {prompt_len}); logprob_start_len "
            "semantics changed?"
        )
    ids = [int(e[1]) for e in itl[1:]]
    if ids != [int(t) for t in gen_tokens]:
        bad = first_divergence(ids, gen_tokens)
        raise RuntimeError(
            f"scoring rows are not aligned with the generated tokens (first "
            f"mismatch at {bad}): input_token_logprobs ids {ids[:8]}..., "
            f"tokens {list(gen_tokens[:8])}..."
        )
    lps = [float(e[0]) for e in itl[1:]]
    top = itop[1:]
    check_alignment(gen_tokens, lps, top)
    return {"token_lps": lps, "top": top}


def check_alignment(tokens, token_lps, top, tol: float = 2e-3) -> int:
    """Where a token is in the same position's top-K, its logprob must equal that entry.
    Returns the number of positions checked; raises on a mismatch (off-by-one rows)."""
    checked = 0
    for t, lp, row in zip(tokens, token_lps, top):
        for e in row or ():
            if int(e[1]) == int(t):
                checked += 1
                if abs(float(e[0]) - lp) > tol:
                    raise RuntimeError(
                        f"token {t}: logprob {lp} but top-K says {e[0]}: rows misaligned"
                    )
                break
    if tokens and checked == 0:
        raise RuntimeError("no generated token appears in any top-K row: rows misaligned")
    return checked


def post_generate(
    base_url: str,
    input_ids: list,
    sampling: dict,
    *,
    top_k: int | None = None,
    logprob_start_len: int | list[int] = -1,
    timeout: float = 1200,
) -> list[dict]:
    """One POST /generate of ``input_ids`` (one prompt or a batch); with ``top_k``, also
    ``return_logprob`` from ``logprob_start_len`` with ``top_logprobs_num=top_k``. The
    reply as a list of items (SGLang answers one prompt with an object)."""
    payload = {"input_ids": input_ids, "sampling_params": sampling}
    if top_k is not None:
        payload.update(
            return_logprob=True, logprob_start_len=logprob_start_len, top_logprobs_num=top_k
        )
    reply = post_json(f"{base_url}/generate", payload, timeout)
    return reply if isinstance(reply, list) else [reply]


@contextlib.contextmanager
def started(srv: SGLangServer, timeout_s: float) -> Iterator[SGLangServer]:
    """``with started(srv, timeout_s):`` start ``srv`` (healthy within ``timeout_s`` or
    RuntimeError with its log tail) and stop it however the block ends."""
    try:
        srv.start(timeout_s)
        yield srv
    finally:
        srv.stop()


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``) into SystemExit(128 + 15), so that `started` blocks stop
    their servers (they run in their own sessions and would outlive the tool otherwise)."""

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def split_flags(*texts: str) -> list[str]:
    """shlex-split and join server-flag strings (``--common-server-args``, ``--server-args``)."""
    return [tok for text in texts for tok in shlex.split(text)]


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """The server options of ``fidelity`` and ``radix``: --config NAME=FLAGS (parsed by
    `parse_config_specs`), --common-server-args, --server-args and --startup-timeout."""
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="define a config, e.g. --config 'k4v2bf=--kv-quant turboquant "
        "--kv-quant-bits k4v2 --kv-quant-bf16-layers 0,1'",
    )
    ap.add_argument(
        "--common-server-args",
        default=COMMON_SERVER_ARGS,
        help=f"flags of every server (default: {COMMON_SERVER_ARGS!r})",
    )
    ap.add_argument("--server-args", default="", help="extra flags appended for every server")
    ap.add_argument("--startup-timeout", type=float, default=420)

"""sglang_tq.bench: the project's benchmarks behind one command, ``python -m sglang_tq.bench``.

Shared parts, for every benchmark of the package:

* :mod:`.server` -- :class:`~.server.SGLangServer`, the one launcher of
  ``python -m sglang.launch_server`` (loopback only, own process group, health polling,
  log file, group kill on stop);
* :mod:`.results` -- the results file: provenance from a child process, atomic rewrites,
  entries keyed per benchmark;
* :mod:`.configs` -- KV config labels (bf16, fp8, kXvY, ...) and their server flags.

Subcommands (``SUBCOMMANDS``: name -> (module, one line); each module has ``parse_args(argv)``
and ``run(args)``, and ``main(argv)`` that calls the two). No subcommand imports another:
what two of them share lives in a module that is not a subcommand (``server``, ``results``,
``configs``, ``cli``, ``timing``, ...). The kernel benchmarks need torch and triton (sgl-kernel
and SGLang for their baseline rows); the server benchmarks need the standard library and
aiohttp (which SGLang brings).
"""

SUBCOMMANDS = {
    # kernels, one GPU, no server
    "decode": ("sglang_tq.bench.decode", "decode attention per step: packed KV vs FA3/FlashInfer"),
    "ab-decode": ("sglang_tq.bench.ab_decode", "A/B of decode kernel variants, one shape each"),
    "profile-decode": ("sglang_tq.bench.profile_decode", "per-kernel profile of one decode step"),
    "extend": ("sglang_tq.bench.extend", "prefill (extend) attention: packed prefix vs FA3"),
    "decode-mla": ("sglang_tq.bench.decode_mla", "MLA decode per step: packed latent vs FA3"),
    # servers
    "load": ("sglang_tq.bench.load", "load test: reference, long-generation, single-stream"),
    "smoke": ("sglang_tq.bench.smoke", "start a server per KV config, answer one request"),
    "soak": ("sglang_tq.bench.soak", "overload soak of one server: crashes, 4xx, memory"),
    "radix": ("sglang_tq.bench.radix", "radix-cache hits on packed KV against cold prefill"),
    # accuracy
    "eval": (
        "sglang_tq.bench.eval.cli",
        "GSM8K-CoT / HumanEval accuracy vs bf16 (eval prepare: data)",
    ),
    "fidelity": ("sglang_tq.bench.fidelity", "teacher-forced KL / top-1 per KV config vs bf16"),
    "fidelity-ref": ("sglang_tq.bench.fidelity_ref", "the same in transformers (reference)"),
    "plot-fidelity": ("sglang_tq.bench.plot_fidelity", "per-position KL plot of a result"),
    "attn-error": ("sglang_tq.bench.attn_error", "attention-output error per layer"),
    "quantizer-mse": ("sglang_tq.bench.quantizer_mse", "quantizer MSE against the bound"),
}

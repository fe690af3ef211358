"""sglang_tq.bench: the project's benchmarks behind one command, ``python -m sglang_tq.bench``.

Shared parts, for every benchmark of the package:

* :mod:`.server` -- :class:`~.server.SGLangServer`, the one launcher of
  ``python -m sglang.launch_server`` (loopback only, own process group, health polling,
  log file, group kill on stop);
* :mod:`.results` -- the results file: provenance from a child process, atomic rewrites,
  entries keyed per benchmark;
* :mod:`.configs` -- KV config labels (bf16, fp8, kXvY, ...) and their server flags.

Subcommands (``SUBCOMMANDS``: name -> module with ``parse_args(argv)`` and ``run(args)``):

* ``eval`` -- GSM8K-CoT and HumanEval accuracy per KV config, paired against bf16;
  ``eval prepare`` builds its data folder (:mod:`.eval`);
* ``decode-mla`` -- MLA (DeepSeek-V2/V3) decode attention per step, the packed latent
  against SGLang's FA3 MLA path with bf16 and fp8 caches (:mod:`.decode_mla`).

``eval`` needs the standard library and aiohttp (which SGLang brings) only; ``decode-mla``
times kernels with torch and triton (sgl-kernel's FA3 for its baseline rows). The package
never imports from scripts/.
"""

SUBCOMMANDS = {
    "eval": "sglang_tq.bench.eval.cli",
    "decode-mla": "sglang_tq.bench.decode_mla",
}

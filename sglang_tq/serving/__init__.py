"""The SGLang side of sglang-tq: the plugin entry point (``sglang_tq.serving.plugin:register``),
the hooks (:mod:`~sglang_tq.serving.integration`), start-up refusals, the packed pools and
attention backends (MHA and MLA), and the simulated prior-art pool.

Only this package (with :mod:`sglang_tq.patches`, :mod:`sglang_tq.bench` and
:mod:`sglang_tq.tools`) imports ``sglang.srt``; it builds on :mod:`sglang_tq.format` and
:mod:`sglang_tq.kernels`.
"""

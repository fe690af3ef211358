"""Entry point of the ``sglang.srt.plugins`` group: ``sglang_tq.serving.plugin:register``.

SGLang calls it with no arguments in every process that loads plugins and then
applies the registered hooks. It only registers (cheap, idempotent, no kernels
imported); everything it touches is in :mod:`sglang_tq.serving.integration`.
"""

from __future__ import annotations


def register() -> None:
    from .integration import install

    install()

"""Triton kernels of sglang-tq (``sglang_tq.kernels``), built on :mod:`sglang_tq.format`.

Each module holds one kernel, its asserting launcher and a pure-torch ``*_ref``
twin built on :mod:`sglang_tq.format.quantizer`.
"""

"""Triton kernels of sglang-tq, installed as ``sglang_tq.kernels``.

Each module holds one kernel, its asserting launcher and a pure-torch ``*_ref``
twin built on :mod:`sglang_tq.quantizer`.
"""

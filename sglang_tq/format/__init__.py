"""The packed KV format of sglang-tq in torch: rotations, codebooks, bit packing, the
reference quantizer, key centers, the per-layer codec the kernels read (its codebook
lookup PTX comes from :mod:`sglang_tq.kernels._lut`), and the prior-art quantizers
(Hadamard + int, KIVI).

Nothing here imports SGLang; :mod:`sglang_tq.kernels` and :mod:`sglang_tq.serving`
build on it.
"""

"""Codebook lookup for packed codes: 4 codes per PTX block with byte permutes.

A table lookup per element (``tl.load(codebook + idx)``) costs a 64-bit address,
a global load and a conversion per code: far over the few instructions per code
that a bandwidth-bound decode can afford (REFERENCE.md, compute budget). Instead,
following the ``prmt`` idea in DESIGN.md: the Lloyd-Max codebook is symmetric and
codes are sign-magnitude (``quantizer.code_of_index``: top bit = sign, low bits =
magnitude rank), so a 4-bit code is a 3-bit magnitude index j < 8 plus a sign
bit. The eight fp16 magnitudes are 8 low bytes and 8 high bytes held in four
registers; one ``prmt`` selects the low bytes of four codes, one the high bytes,
the sign bits are OR-ed into the high bytes, and two more prmt interleave them
into two fp16x2 registers: 16 instructions per eight codes, no memory access.

``lut_asm`` builds the PTX for one register of four packed bytes holding 4 fields of
2 bits each (3-bit: plus their high bits from a second register), fed as two uint16
elements from head_dim 128 (:func:`word_tiles`: outputs pair bytes (0, 2) and (1, 3),
the even- and odd-byte tiles) or as four uint8 elements at head_dim 64 (pairs (0, 1)
and (2, 3)); Triton re-packs single bytes into the register with a few instructions per
byte, 16-bit elements pass through. Four 2-bit codes have only four fp16 values: 8 bytes, one
prmt source. So the table holds the values themselves, no sign step is needed,
and one ``mad`` turns the four fields of a word into prmt selectors at once
(field c → nibbles 2c, 2c+1: s = c·0x22 + 0x10 per byte); one prmt per two codes
then yields an fp16x2 (about 1.5 instructions per code). 3-bit codes are first made
whole: the 2-bit fields and their high bits (from the 1-bit plane) are merged into two
words of 3-bit nibbles, fields 0 and 2 of each byte and fields 1 and 3, and those
nibbles select from the eight fp16 values split into low bytes (two words) and high
bytes (two words), paired up by two more permutes (about 1.7 instructions per code;
an earlier version looked up four magnitudes and OR-ed the sign into bit 15, about 3
per code). ``lut4_asm`` is the 4-bit
version fed two uint16 elements (one 32-bit word, 8 codes) at a time: all eight
3-bit magnitude indices come from one xor/and on the word, two byte permutes
turn them into selectors, and it returns the codes of even bytes and odd bytes,
low and high nibbles, as four fp16 tiles; this avoids Triton re-packing single
bytes into words (about 2 instructions per code with uint8 elements).
``emulate`` executes that PTX subset in Python so the CPU tests check the bit
logic against the codebook.

The four table words are operands, not immediates: the kernels load them once per
program (``table_words`` → ``LayerCodec.k_lut_words``) and the asm reads them from
registers. With immediates, ptxas re-materialised the four words before every asm
block (about 0.45 instructions per code inside the decode loop, offline SASS).
Operand order (Triton's): outputs, the packed code input(s), then each table word
repeated ``pack`` times (one register per packed element; the first is used).
"""

from __future__ import annotations

import functools

import torch
import triton


def _rep(byte: int) -> int:
    return byte * 0x01010101


def table_words(codebook: torch.Tensor, bits: int) -> tuple[int, int, int, int]:
    """The four 32-bit table operands of :func:`lut_asm` for a codebook.

    4-bit: (lo bytes 0-3, lo bytes 4-7, hi bytes 0-3, hi bytes 4-7) of the eight fp16
    magnitudes; 3-bit: the same of the eight fp16 values. 2-bit: the four fp16 values,
    two per word (code 2i in the low half of word i), so one prmt reads a whole fp16 pair.
    """
    return _table_words(codebook.detach().cpu().float(), bits)


def table_tensor(codebook: torch.Tensor, bits: int, device=None) -> torch.Tensor:
    """:func:`table_words` as an int32 tensor [4] (two's complement), for the kernels."""
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in table_words(codebook, bits)]
    return torch.tensor(words, dtype=torch.int32, device=device)


def _fp16_bits(values: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFF for v in values.to(torch.float16).view(torch.int16).to(torch.int64)]


def _word(b) -> int:
    return b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24


def _table_words(codebook: torch.Tensor, bits: int) -> tuple[int, int, int, int]:
    if bits == 2:  # the four values
        vals = _fp16_bits(codebook[:4]) + [0] * 4
        return tuple(vals[2 * i] | vals[2 * i + 1] << 16 for i in range(4))
    vals = _fp16_bits(codebook[:8])  # 4-bit: the eight magnitudes; 3-bit: the eight values
    lo = [v & 0xFF for v in vals]
    hi = [v >> 8 for v in vals]
    return _word(lo[:4]), _word(lo[4:]), _word(hi[:4]), _word(hi[4:])


def fields_of(bits: int) -> tuple[int, int]:
    """(fields per byte, field width) of the low plane of 2- and 3-bit codes."""
    return (4, 2)


PACK_SMALL = 4  # uint8 elements per asm call (2- and 3-bit codes read as bytes)
PACK_WORD = 2  # uint16 elements per asm call (4-bit codes; 2- and 3-bit codes read as words)


@triton.constexpr_function
def word_tiles(bits: int, head_dim: int) -> bool:
    """Whether ``bits``-bit codes of ``head_dim`` are read as uint16 words (4-bit: always;
    2- and 3-bit: from head_dim 128, into eight [·, D/8] tiles, since a tensor-core dot
    needs 16 columns) rather than as bytes into four [·, D/4] tiles (2- and 3-bit at
    head_dim 64). Words reach the asm's 32-bit registers without byte re-packing."""
    return bits == 4 or head_dim >= 128


def _table_operands(first: int, pack: int) -> list[str]:
    return [f"${first + pack * i}" for i in range(4)]


def constraints(bits: int, words: bool) -> str:
    """Triton constraint string of :func:`lut_asm`'s PTX."""
    if bits == 4:
        return ",".join(["=r"] * 4 + ["r"] + ["r"] * 4 * PACK_WORD)
    pack = PACK_WORD if words else PACK_SMALL
    # 3-bit: the high-bit bytes and their per-column shift (int32, one register per element)
    n_in = 2 + pack if bits == 3 else 1
    return ",".join(["=r"] * 8 + ["r"] * n_in + ["r"] * 4 * pack)


@functools.cache
def _small_asm_cached(bits: int, words: bool) -> str:
    """PTX of 2- and 3-bit codes: $8 holds four packed bytes, $0-$7 receive field f's
    fp16 pairs in $2f and $2f+1: bytes (0, 1) and (2, 3) when read as bytes, (0, 2) and
    (1, 3) when read as two uint16 words (Triton's element order of each output)."""
    pack = PACK_WORD if words else PACK_SMALL
    nfields, width = fields_of(bits)
    t0, t1, t2, t3 = _table_operands(8 + (2 + pack if bits == 3 else 1), pack)
    if bits == 2:
        lines = ["{", ".reg .b32 y, x, s, t;"]
        src = "$8"
        if words:  # bytes (0, 2, 1, 3), so the low half serves bytes 0 and 2
            lines.append("prmt.b32 y, $8, $8, 0x3120;")
            src = "y"
        for f in range(nfields):
            lines += [
                # selector: each byte's field f as nibbles (2c, 2c+1), i.e. the two bytes
                # of fp16 value c in the table; the low 16 bits serve the first pair
                f"shr.b32 x, {src}, {f * width};",
                f"and.b32 x, x, {_rep((1 << width) - 1):#x};",
                f"mad.lo.u32 s, x, 0x22, {_rep(0x10):#x};",
                "shr.b32 t, s, 16;",
                f"prmt.b32 ${2 * f}, {t0}, {t1}, s;",
                f"prmt.b32 ${2 * f + 1}, {t0}, {t1}, t;",
            ]
        lines.append("}")
        return "\n".join(lines)
    # 3-bit: $9 the high-bit bytes, $10 their column shift
    lines = [
        "{",
        ".reg .b32 hb, t, x0, x1, s, l, h;",
        # high bit of field f of byte k at bit 8k + 2f
        "shr.b32 hb, $9, $10;",
        # whole 3-bit codes as nibbles: x0 holds fields 0 (low nibble) and 2 (high
        # nibble) of every byte, x1 fields 1 and 3; the high bit goes to nibble bit 2
        "shl.b32 t, hb, 2;",
        "and.b32 t, t, 0x44444444;",
        "and.b32 x0, $8, 0x33333333;",
        "or.b32 x0, x0, t;",
        "shr.b32 x1, $8, 2;",
        "and.b32 x1, x1, 0x33333333;",
        "and.b32 t, hb, 0x44444444;",
        "or.b32 x1, x1, t;",
    ]
    for x, fa, fb in (("x0", 0, 2), ("x1", 1, 3)):
        for pair in range(2):
            # the nibbles of the pair's two bytes select the low and the high bytes of
            # their fp16 values; two more permutes pair them up per field
            if words:
                lines.append(f"prmt.b32 s, {x}, {x}, {('0x2020', '0x3131')[pair]};")
                sel = "s"
            elif pair:
                lines.append(f"shr.b32 s, {x}, 16;")
                sel = "s"
            else:
                sel = x
            lines += [
                f"prmt.b32 l, {t0}, {t1}, {sel};",
                f"prmt.b32 h, {t2}, {t3}, {sel};",
                f"prmt.b32 ${2 * fa + pair}, l, h, 0x6240;",
                f"prmt.b32 ${2 * fb + pair}, l, h, 0x7351;",
            ]
    lines.append("}")
    return "\n".join(lines)


def lut_asm(codebook: torch.Tensor, bits: int, words: bool) -> str:
    """PTX for ``bits``-bit codes: :func:`lut4_asm` at 4 bits, else a register of 4
    packed bytes (``words``: two uint16 elements, see :func:`word_tiles`) to the fp16
    values of their fields."""
    if bits == 4:
        return lut4_asm(codebook)
    if bits not in (2, 3):
        raise ValueError(f"the prmt lookup supports 2-4-bit codes, got {bits}.")
    _check_codebook(codebook, bits)
    return _small_asm_cached(bits, words)


def _check_codebook(codebook: torch.Tensor, bits: int) -> None:
    """A ``bits``-bit lookup needs 2**bits entries; the 4-bit one, whose table holds only
    the eight magnitudes and sets the sign from the code's top bit, also needs the
    codebook in sign-magnitude code order: code 8 + m = −code m (2- and 3-bit tables
    hold every value)."""
    if codebook.numel() != 1 << bits:
        raise ValueError(f"a {bits}-bit lookup needs {1 << bits} codebook entries.")
    c, half = codebook.detach().cpu().float(), 1 << (bits - 1)
    if bits == 4 and not torch.equal(c[half:], -c[:half]):
        raise ValueError(
            f"the {bits}-bit prmt lookup needs a symmetric codebook in "
            f"sign-magnitude code order (code {half} + m = −code m)."
        )


LUT4_PAIRINGS = ("nibbles", "bytes")


@functools.cache
def _lut4_asm_cached(pairing: str = "nibbles") -> str:
    tl0, tl1, th0, th1 = _table_operands(5, PACK_WORD)
    if pairing == "nibbles":
        # selectors: nibbles (lo0, hi0, lo2, hi2) and (lo1, hi1, lo3, hi3); sign gathers and
        # output permutes in that order
        sel = ["prmt.b32 sx, j, j, 0x2020;", "prmt.b32 sy, j, j, 0x3131;"]
        gather, out = ("0x6240", "0x7351"), ("0x6240", "0x6240", "0x7351", "0x7351")
        outs = ("lx, hx", "ly, hy", "lx, hx", "ly, hy")
    else:
        # "bytes": the word's own low half selects bytes 0, 1 (nibbles lo0, hi0, lo1, hi1)
        # and its high half bytes 2, 3: one shift instead of two permutes
        sel = ["mov.b32 sx, j;", "shr.b32 sy, j, 16;"]
        gather, out = ("0x5140", "0x7362"), ("0x5140", "0x7362", "0x5140", "0x7362")
        outs = ("lx, hx", "lx, hx", "ly, hy", "ly, hy")
    return "\n".join(
        [
            "{",
            ".reg .b32 j, sx, sy, lx, hx, ly, hy, t, gx, gy;",
            # sign-magnitude codes: the low 3 bits of every nibble index the magnitude
            "and.b32 j, $4, 0x77777777;",
            *sel,
            f"prmt.b32 lx, {tl0}, {tl1}, sx;",
            f"prmt.b32 hx, {th0}, {th1}, sx;",
            f"prmt.b32 ly, {tl0}, {tl1}, sy;",
            f"prmt.b32 hy, {th0}, {th1}, sy;",
            # signs into bit 7 of the high bytes, gathered bytewise from w << 4 (a byte's
            # low-nibble sign at bit 7) and w (its high-nibble sign) in the selectors' order
            "shl.b32 t, $4, 4;",
            f"prmt.b32 gx, t, $4, {gather[0]};",
            f"prmt.b32 gy, t, $4, {gather[1]};",
            "and.b32 gx, gx, 0x80808080;",
            "or.b32 hx, hx, gx;",
            "and.b32 gy, gy, 0x80808080;",
            "or.b32 hy, hy, gy;",
            # fp16x2 outputs: "nibbles": low nibbles of bytes 0,2 / 1,3, high nibbles of
            # bytes 0,2 / 1,3; "bytes": the (low, high) nibble pair of byte 0 / 1 / 2 / 3
            *(f"prmt.b32 ${i}, {outs[i]}, {out[i]};" for i in range(4)),
            "}",
        ]
    )


def lut4_asm(codebook: torch.Tensor, pairing: str = "nibbles") -> str:
    """PTX mapping a word of two uint16 elements (8 packed 4-bit codes) to four fp16x2
    registers: ``pairing="nibbles"``: low nibbles of bytes (0, 2), of bytes (1, 3), high
    nibbles of bytes (0, 2), of bytes (1, 3); ``"bytes"``: the (low, high) nibbles of
    byte 0, 1, 2, 3."""
    _check_codebook(codebook, 4)
    if pairing not in LUT4_PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(LUT4_PAIRINGS)}, got {pairing!r}.")
    return _lut4_asm_cached(pairing)


# ----------------------------------------------------------------------------- emulator
def _prmt(a: int, b: int, sel: int) -> int:
    src = (a | (b << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def emulate_lookup(
    codebook: torch.Tensor,
    bits: int,
    code_inputs: list[int],
    shift: int = 0,
    words: bool = False,
    pairing: str = "nibbles",
) -> list[int]:
    """Run :func:`lut_asm` on packed code registers with the codebook's table operands
    (3-bit: ``code_inputs`` = [low plane, high-bit bytes], ``shift`` their column shift;
    4-bit: ``pairing`` as :func:`lut4_asm`)."""
    pack = PACK_WORD if bits == 4 or words else PACK_SMALL
    tables = [w for w in table_words(codebook, bits) for _ in range(pack)]
    extra = [shift] * pack if bits == 3 else []
    asm = lut4_asm(codebook, pairing) if bits == 4 else lut_asm(codebook, bits, words)
    return emulate(asm, list(code_inputs) + extra + tables, 4 if bits == 4 else 8)


def emulate(asm: str, inputs: list[int], num_outputs: int) -> list[int]:
    """Run the PTX subset ``lut_asm`` emits on 32-bit Python ints (for tests)."""
    regs: dict[str, int] = {f"${num_outputs + i}": v for i, v in enumerate(inputs)}
    mask = 0xFFFFFFFF

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if (tok.startswith("$") or tok.isalpha() or tok in regs) else int(tok, 0)

    for raw in asm.splitlines():
        line = raw.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, srcs = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = srcs[0]
        elif op == "shr.b32":
            r = srcs[0] >> srcs[1]
        elif op == "shl.b32":
            r = srcs[0] << srcs[1]
        elif op == "and.b32":
            r = srcs[0] & srcs[1]
        elif op == "or.b32":
            r = srcs[0] | srcs[1]
        elif op == "xor.b32":
            r = srcs[0] ^ srcs[1]
        elif op == "sub.u32":
            r = srcs[0] - srcs[1]
        elif op == "mul.lo.u32":
            r = srcs[0] * srcs[1]
        elif op == "mad.lo.u32":
            r = srcs[0] * srcs[1] + srcs[2]
        elif op == "not.b32":
            r = ~srcs[0]
        elif op == "prmt.b32":
            r = _prmt(srcs[0], srcs[1], srcs[2])
        else:
            raise ValueError(f"emulator does not know {op}")
        regs[d] = r & mask
    return [regs[f"${i}"] for i in range(num_outputs)]

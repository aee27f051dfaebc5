"""The NF4 kernels' in-register lookup (hotlora.kernels._nf4_triton._prmt_asm), run through a small PTX
interpreter: the GPU tests run it for real; this checks the tables, the permuted nibble order and every asm variant
on every byte value in CI, where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels._nf4_triton import _prmt_asm, prmt_table_words
from hotlora.kernels.reference import NF4_CODE, NF4_NIBBLE, NF4_NIBBLE_ORDER


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte sel[i] & 7 of {b, a}, or its sign replicated
    when bit 3 of the selector nibble is set."""
    src, out = (b << 32) | a, 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))


def _run(asm: str, word: int, operands: list[int]) -> list[int]:
    """Execute the asm's instructions on input $4 = word and $5.. = operands; return $0..$3."""
    regs = {"$4": word, **{f"${5 + i}": v & 0xFFFFFFFF for i, v in enumerate(operands)}}

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    ops = {
        "mov.b32": lambda a: val(a[0]), "and.b32": lambda a: val(a[0]) & val(a[1]),
        "or.b32": lambda a: val(a[0]) | val(a[1]), "xor.b32": lambda a: val(a[0]) ^ val(a[1]),
        "shr.b32": lambda a: val(a[0]) >> val(a[1]),
        "prmt.b32": lambda a: _prmt(*map(val, a)), "lop3.b32": lambda a: _lop3(*map(val, a)),
    }
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [t.strip() for t in args.split(",")]
        regs[dst] = ops[op](src)
    return [regs[f"${i}"] for i in range(4)]


def _check_every_byte(asm: str, operands: list[int], dtype: torch.dtype) -> None:
    """Every byte value in each of the four byte positions of $4 gives its high nibble's value in $0/$1 and its low
    nibble's in $2/$3 (element k of 4: half k % 2 of register k // 2)."""
    want = torch.tensor(NF4_NIBBLE).to(dtype).tolist()
    for first in range(0, 256, 4):
        word = sum(((first + k) % 256) << (8 * k) for k in range(4))
        out = _run(asm, word, operands)
        for k in range(4):
            byte = (first + k) % 256
            hi = (out[k // 2] >> (16 * (k % 2))) & 0xFFFF
            lo = (out[2 + k // 2] >> (16 * (k % 2))) & 0xFFFF
            assert _value(hi, dtype) == want[byte >> 4]
            assert _value(lo, dtype) == want[byte & 15]


def _value(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).item()


def test_nibble_order_is_a_permutation_paired_for_bf16():
    assert sorted(NF4_NIBBLE_ORDER) == list(range(16))
    assert tuple(NF4_CODE[c] for c in NF4_NIBBLE_ORDER) == NF4_NIBBLE
    bits = torch.tensor(NF4_NIBBLE).to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    bits = torch.where(bits == 0, 0x8000, bits)  # zero as -0.0, as the asm takes it
    for j in range(8):  # the top bit of each byte agrees between nibbles j and j + 8
        assert (bits[j] ^ bits[j + 8]) & 0x8080 == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("immediates", [False, True], ids=["operands", "immediates"])
def test_lookup_gives_every_nibble_value(dtype, immediates):
    asm, words = _prmt_asm(dtype, immediates=immediates)
    operands = []
    if not immediates:  # the words come from lut: two copies, 16 words apart (_prmt_table)
        table_words = prmt_table_words(dtype)
        assert table_words[:9] == table_words[16:25]
        assert [w & 0xFFFFFFFF for w in table_words[:9]] == words
        operands = [w for w in table_words[:9] for _ in range(4)]  # pack=4: four operands per 32-bit word
    _check_every_byte(asm, operands, dtype)
    if dtype == torch.bfloat16:  # paired, operands or immediates: no mask, 19 instructions per 8 values
        body = [line for line in asm.splitlines() if line[:4] in ("prmt", "xor.", "shr.", "and.", "or.b", "lop3")]
        assert len(body) == 19 and not any(line.startswith(("and.", "lop3")) for line in body)

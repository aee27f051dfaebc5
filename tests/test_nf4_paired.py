"""The paired NF4 layout (hotlora.kernels.nf4: adjacent columns share a byte, one dot per 128-column group),
against bitsandbytes and the fp32 reference: the CPU reference, and the Triton kernels under TRITON_INTERPRET=1
(fp16/fp32 at small sizes; bf16 and real sizes in tests/test_nf4_kernel_gpu.py)."""

from __future__ import annotations

import os

import bitsandbytes.functional as bnbF
import pytest
import torch
from nf4_cases import TOLERANCE, packed_group, quantize, reference, rel_err

from hotlora.kernels.nf4 import (
    SCALE_EXACT,
    SCALE_VALUES,
    Nf4Config,
    nf4_dequantize,
    nf4_matmul,
    pack_nf4,
    pack_nf4_group,
)
from hotlora.kernels.reference import nf4_dequantize_ref

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)"
)


@pytest.fixture
def triton_cpu(monkeypatch):
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_paired_reference_dequantizes_bit_identically(dtype):
    packed, state = bnbF.quantize_4bit(torch.randn(40, 320, dtype=dtype), blocksize=64, quant_type="nf4")
    w = pack_nf4(packed, state, paired=True)
    assert w.paired and w.rows(8, 24).paired
    assert not torch.equal(w.codes, pack_nf4(packed, state).codes)  # another byte order, the same values
    got = nf4_dequantize_ref(w)
    assert torch.equal(got.view(torch.uint8), bnbF.dequantize_4bit(packed, state).view(torch.uint8))


def test_group_members_share_the_layout():
    members = quantize((16, 16), 128, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        pack_nf4_group([pack_nf4(*members[0]), pack_nf4(*members[1], paired=True)])


@interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_paired_dequantizes_bit_identically(triton_cpu, dtype):
    members = quantize((40, 24), 576, dtype)  # K = 576: the last group is half past K
    got = nf4_dequantize(packed_group(members, paired=True))
    want = torch.cat([bnbF.dequantize_4bit(p, s) for p, s in members])
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


CONFIGS = {  # weights first and x first, both scales a paired weight takes, K split, masked and unmasked
    "swap-values-split2": Nf4Config(64, 32, split_k=2, swap_ab=True, scale=SCALE_VALUES),
    "swap-exact": Nf4Config(32, 32, swap_ab=True, scale=SCALE_EXACT),
    "x-first-values-split3": Nf4Config(32, 16, split_k=3, scale=SCALE_VALUES),
    "x-first-partials": Nf4Config(16, 16, split_k=2),  # SCALE_PARTIALS: promoted to SCALE_VALUES
    "swap-even": Nf4Config(64, 16, split_k=2, swap_ab=True, scale=SCALE_VALUES),
    "dense": Nf4Config(16, 16, dense=True),
}


@interpret
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_paired_matmul_matches_reference(triton_cpu, name, dtype):
    k = 512 if name == "swap-even" else 576
    members = quantize((48, 16), k, dtype)
    x = torch.randn(37, k, dtype=dtype)
    bias = torch.randn(64, dtype=dtype)
    y = nf4_matmul(x, packed_group(members, paired=True), bias, config=CONFIGS[name])
    assert rel_err(y, reference(x, members, bias)) < TOLERANCE[dtype]


@interpret
@pytest.mark.parametrize("m", [1, 40, 130])
def test_triton_paired_recorded_configs(triton_cpu, m):
    """nf4_matmul's own pick for a paired weight at decode, mid and large sizes (never the GEMV kernel)."""
    members = quantize((64,), 576, torch.float16)
    x = torch.randn(m, 576, dtype=torch.float16)
    y = nf4_matmul(x, packed_group(members, paired=True))
    assert rel_err(y, reference(x, members, None)) < TOLERANCE[torch.float16]

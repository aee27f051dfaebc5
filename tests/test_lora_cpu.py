"""The CPU serving path of lora_apply (kernels/lora_cpu.py) against the grouped torch reference and the oracle,
including its caches: per-step masks, and concatenated A spans kept across steps until the pool changes."""

from __future__ import annotations

import pytest
import torch
from lora_cases import POPULARITY, assert_matches, make_case

from hotlora.kernels.lora import LoraSlice, lora_apply
from hotlora.kernels.lora_cpu import lora_apply_cpu
from hotlora.kernels.reference import lora_apply_ref

SIZES = {"qkv": (72, (72, 24, 24)), "gate_up": (40, (100, 100)), "down": (100, (40,))}


def _run(fn, case, meta=None) -> torch.Tensor:
    fused = case.fused.clone()
    fn(case.ys(fused), case.x, case.slices, meta or case.meta())
    return fused


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_tokens", [1, 8, 45])
@pytest.mark.parametrize("ranks", [8, "mixed"])
@pytest.mark.parametrize("size", list(SIZES))
def test_cpu_matches_reference_fp32(size, ranks, num_tokens, popularity):
    in_features, outs = SIZES[size]
    case = make_case(torch.float32, in_features, outs, ranks, num_tokens, popularity)
    got = _run(lora_apply_cpu, case)
    assert_matches(case, got, case.expected(), 1e-5)  # also: no-adapter tokens and rank-0 slices untouched
    torch.testing.assert_close(got, _run(lora_apply_ref, case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_other_dtypes_take_reference(dtype):
    in_features, outs = SIZES["qkv"]
    case = make_case(dtype, in_features, outs, "mixed", 20, "some_none")
    assert torch.equal(_run(lora_apply_cpu, case), _run(lora_apply_ref, case))


def test_cpu_caches_follow_changes():
    """Same layer slices across steps: new token slots, then new pool contents, must both show."""
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.float32, in_features, outs, 16, 12, "uniform")
    meta = case.meta()
    assert_matches(case, _run(lora_apply_cpu, case, meta), case.expected(), 1e-5)
    assert_matches(case, _run(lora_apply_cpu, case, meta), case.expected(), 1e-5)  # cached plan and A rows
    case.token_slots.copy_(torch.roll(case.token_slots, 3))  # in place: the plan must see the new version
    case.token_slots[0] = -1
    meta = case.meta()
    assert_matches(case, _run(lora_apply_cpu, case, meta), case.expected(), 1e-5)
    for sl in case.slices:  # an adapter reloaded into the same rows
        sl.a.mul_(-0.5)
        sl.b.mul_(2.0)
    assert_matches(case, _run(lora_apply_cpu, case, meta), case.expected(), 1e-5)
    case.scale.mul_(2.0)
    assert_matches(case, _run(lora_apply_cpu, case, meta), case.expected(), 1e-5)


def test_cpu_checks_new_slices():
    """The slices are checked when a layer's pools are first seen, even after a good call with the same a."""
    case = make_case(torch.float32, 40, (24,), 8, 6, "uniform")
    meta = case.meta()
    lora_apply_cpu(case.ys(case.fused.clone()), case.x, case.slices, meta)
    bad = LoraSlice(case.slices[0].a, case.slices[0].b, case.slices[0].rank.long())  # int64 rank table
    with pytest.raises(ValueError):
        lora_apply(case.ys(case.fused.clone()), case.x, [bad], meta)


def test_cpu_overflow_stays_in_its_own_tokens():
    """An adapter whose finite A overflows x @ A (an uploaded 3e38) gives inf in its span columns for every token;
    the mask must not turn that into NaN (inf * 0) in the other tokens' outputs."""
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.float32, in_features, outs, 8, 24, "some_none")
    bad = int(case.token_slots[case.token_slots >= 0][0])
    expected = case.expected()
    start = int(case.row_start[bad])
    for sl in case.slices:
        sl.a[start:start + int(sl.rank[bad])] = 3e38
    got = _run(lora_apply_cpu, case)
    others = case.token_slots != bad
    assert others.any() and (~others).any()
    assert torch.isfinite(got[others]).all()
    torch.testing.assert_close(got[others], expected[others], rtol=1e-5, atol=1e-5)

"""The NF4 matmul launch that also runs a LoRA shrink as its first programs (kernels._fused_triton), under
TRITON_INTERPRET=1 (fp16/fp32; CI sets it): the matmul's output is bit-identical to the plain launch's and the
shrink's workspace to lora_shrink's, the split-K counters back at zero; the shrink is claimed once."""

from __future__ import annotations

import os

import pytest
import torch
from lora_cases import make_case
from nf4_cases import TOLERANCE, packed_group, quantize, reference, rel_err

from hotlora.kernels import lora as lora_mod
from hotlora.kernels.lora import KernelConfig
from hotlora.kernels.nf4 import Nf4Config, nf4_matmul

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)"
)

SMALL = KernelConfig(shrink_block_k=64, expand_block_n=32)


class _Hook:
    """A finish hook that offers one shrink and lets the reduce run."""

    def __init__(self, shrink) -> None:
        self.shrink, self.claims, self.calls = shrink, 0, 0

    def claim_shrink(self):
        self.claims += 1
        shrink, self.shrink = self.shrink, None
        return shrink

    def __call__(self, part, bias, y) -> bool:
        self.calls += 1
        return False


@pytest.mark.parametrize(("dtype", "num_tokens", "split", "swap_ab"),
                         [(torch.float32, 7, 2, False), (torch.float16, 3, 1, False), (torch.float16, 20, 3, True)])
def test_fused_shrink_matches_both_launches(monkeypatch, dtype, num_tokens, split, swap_ab):
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    in_features, outs = 320, (48, 16, 16)  # K: 2.5 groups of 128, so the last group is half masked
    case = make_case(dtype, in_features, outs, "mixed", num_tokens, "some_none", num_slots=4, seed=split)
    members = quantize(outs, in_features, dtype)
    w = packed_group(members)
    cfg = Nf4Config(16, 32, split_k=split, swap_ab=swap_ab)
    alone, fused = case.meta(split_k=2), case.meta(split_k=2)
    alone.workspace.zero_()  # entries no shrink writes compare equal
    fused.workspace.zero_()
    want = nf4_matmul(case.x, w, config=cfg)
    lora_mod.lora_shrink(case.x, case.slices, alone, SMALL)
    hook = _Hook(lora_mod.shrink_launch(case.x, case.slices, fused, lora_mod.kernel_config(fused, override=SMALL)))
    got = nf4_matmul(case.x, w, config=cfg, finish=hook)
    assert torch.equal(got, want) and rel_err(got, reference(case.x, members, None)) < TOLERANCE[dtype]
    assert torch.equal(fused.workspace[0], alone.workspace[0])
    assert alone.workspace[0].abs().sum() > 0  # some token has an adapter: the shrink wrote something
    assert not fused.split_count.any()
    assert hook.claims == 1 and hook.shrink is None and hook.calls == (split > 1)
    again = nf4_matmul(case.x, w, config=cfg, finish=hook)  # claimed already: the plain launch
    assert torch.equal(again, want) and hook.claims == 2

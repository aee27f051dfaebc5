"""Which way lora_project adds the LoRA delta to an NF4 base that splits K (hotlora.kernels.lora_project._Finish):
the fused finish for small steps, the delta beside the matmul (added by its reduce) for larger ones, or the expand
after the reduce (HOTLORA_LORA_BESIDE=0, or an output wider than the slices); every way against the base plus
lora_apply_ref. Under TRITON_INTERPRET=1 (CI) in fp16, and on the GPU in bf16."""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, make_case

from hotlora.kernels import lora_project as project_mod
from hotlora.kernels.lora import lora_project
from hotlora.kernels.reference import lora_apply_ref

OUTS = (72, 24, 24)  # q/k/v-like, GQA-shaped k/v


@pytest.fixture
def device(kernel_device: str) -> str:  # conftest.kernel_device: the interpreter on the CPU, and the GPU
    return kernel_device


def _spy(monkeypatch, module, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(name)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)


def _nf4(rows: int, in_features: int, dtype: torch.dtype, device: str, seed: int):
    from bitsandbytes.functional import quantize_4bit

    from hotlora.kernels.nf4 import pack_nf4

    dense = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)) * in_features**-0.5
    return pack_nf4(*quantize_4bit(dense.to(dtype).to(device), blocksize=64, compress_statistics=True,
                                   quant_type="nf4"))


@pytest.mark.parametrize(("num_tokens", "beside", "extra_cols", "path"),
                         [(3, "1", 0, ["_launch_finish"]),
                          (6, "1", 0, ["_launch_expand", "nf4_reduce"]),
                          (6, "0", 0, ["_launch_expand"]),
                          (6, "1", 8, ["_launch_expand"]),
                          (3, "1", 8, ["_launch_expand"])])  # fmt: skip
def test_project_paths(device, num_tokens, beside, extra_cols, path, monkeypatch):
    """extra_cols: the base output has columns past the slices' (a member without LoRA), so neither the finish nor
    the delta's reduce may write it: the plain reduce, then the expand into the slices' views."""
    from hotlora.kernels.nf4 import nf4_matmul

    monkeypatch.delenv("HOTLORA_LORA_FINISH", raising=False)
    monkeypatch.setenv("HOTLORA_LORA_BESIDE", beside)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    in_features = 512  # whole 64-column blocks, enough 128-column groups to split K
    case = make_case(dtype, in_features, OUTS, "mixed", num_tokens, "some_none", device=device, seed=11)
    case.token_slots[0] = -1  # a token without an adapter
    meta = case.meta()
    w = _nf4(sum(OUTS) + extra_cols, in_features, dtype, device, seed=3)
    calls: list[str] = []
    _spy(monkeypatch, project_mod, "_launch_finish", calls)
    _spy(monkeypatch, project_mod._lora, "_launch_expand", calls)
    _spy(monkeypatch, project_mod, "nf4_reduce", calls)  # only the hook's reduce: nf4_matmul calls its own

    def base(fin):  # the slices' column views of the whole output
        return list(nf4_matmul(case.x, w, finish=fin)[:, : sum(OUTS)].split(list(OUTS), 1))

    ys = lora_project(base, case.x, case.slices, meta)
    assert calls == path
    want = base(None)
    plain = torch.cat(want, dim=1).clone()
    lora_apply_ref(want, case.x, case.slices, meta)
    want = torch.cat(want, dim=1).double()
    got = torch.cat(ys, dim=1).double()
    delta = want - plain.double()
    assert delta.norm() > 0  # some token has an adapter
    assert ((got - want).norm() / delta.norm()).item() < TOLERANCE[dtype]
    none = case.token_slots < 0  # no adapter: exactly the plain matmul (the finish's or the delta's zeros added)
    assert none.any() and torch.equal(got[none], want[none])


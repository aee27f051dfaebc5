"""The LoRA shrink inside the norm and SiLU*mul kernels (hotlora.kernels.lora_fused), and lora_project reading
its parts: against the torch references, under TRITON_INTERPRET=1 (CI) in fp32/fp16 and on the GPU in bf16."""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, make_case

from hotlora.kernels import lora_project as project_mod
from hotlora.kernels.lora import lora_project, shrink_in_producer
from hotlora.kernels.lora_fused import norm_shrink, silu_mul_shrink
from hotlora.kernels.reference import lora_apply_ref, lora_shrink_ref, norm_shrink_ref, silu_mul_shrink_ref


@pytest.fixture
def device(kernel_device: str) -> str:  # conftest.kernel_device: the interpreter on the CPU, and the GPU
    return kernel_device


def _dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" and dtype == torch.float16 else dtype


def _read_entries(case, meta, n: int) -> torch.Tensor:
    """bool [n, T, max_rank]: the workspace entries a consumer reads (a slot's token, the slice's rank)."""
    slots = case.token_slots.cpu().long()
    valid = (slots >= 0) & (slots < meta.num_slots)
    ranks = torch.stack([sl.rank.cpu()[slots.clamp(min=0)] for sl in case.slices[:n]])  # [n, T]
    ranks = torch.where(valid[None, :], ranks, 0)
    return torch.arange(meta.max_rank)[None, None, :] < ranks[:, :, None]


def _assert_shrink(case, meta, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The parts added up (per slice and token, token order) equal `want` wherever a consumer reads them."""
    n = want.shape[0]
    got = meta.workspace[:, :n].sum(0)[:, meta.token_pos.long()].cpu().double()
    read = _read_entries(case, meta, n)
    assert torch.isfinite(got[read]).all()  # every part of every entry read was written
    want = want.cpu().double()[read]
    err = ((got[read] - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err < TOLERANCE[dtype] / 10, err


# (in_features, outputs): q/k/v with GQA-shaped k/v, gate/up, a down; none a multiple of any chunk
SIZES = {"qkv": (72, (72, 24, 24)), "gate_up": (40, (100, 100)), "down": (100, (40,))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("size", "num_tokens", "split_k", "popularity", "rank_class"),
                         [("qkv", 1, 16, "uniform", None), ("qkv", 4, 4, "some_none", 16),
                          ("gate_up", 3, 16, "distinct", None), ("gate_up", 2, 1, "identical", None),
                          ("qkv", 3, 3, "all_none", None)])  # fmt: skip
@pytest.mark.parametrize("with_delta", [True, False])
def test_norm_shrink(device, dtype, size, num_tokens, split_k, popularity, rank_class, with_delta):
    """h2 and x as the reference computes them (h untouched); the parts add up to the shrink of x. 16 parts
    of a 40-wide row leave the last parts without columns: they must hold zeros. Rank class 16 with ranks up to
    64: the rows past the first 16 of a slot load inside the kernel's rank loop."""
    dtype = _dtype(device, dtype)
    in_features, outs = SIZES[size]
    case = make_case(dtype, in_features, outs, "mixed", num_tokens, popularity, device=device, seed=num_tokens)
    meta = case.meta(split_k=split_k, rank_class=rank_class)
    meta.workspace.fill_(float("nan"))  # every part a consumer reads must be written
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    delta = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device) if with_delta else None
    w = torch.randn(in_features, generator=gen).to(dtype).to(device)
    h_before = h.clone()
    h2, x = norm_shrink(h, delta, w, 1e-5, case.slices, meta)
    h2_ref, x_ref, _ = norm_shrink_ref(h, delta, w, 1e-5, case.slices, meta)
    assert torch.equal(h, h_before)
    assert torch.equal(h2, h2_ref)  # the residual add rounds as torch's
    err = ((x.float() - x_ref.float()).norm() / x_ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    _assert_shrink(case, meta, lora_shrink_ref(x, case.slices, meta), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "split_k", "popularity"), [(1, 16, "uniform"), (4, 5, "some_none")])
def test_silu_mul_shrink_on_views(device, dtype, num_tokens, split_k, popularity):
    dtype = _dtype(device, dtype)
    in_features, outs = SIZES["down"]
    case = make_case(dtype, in_features, outs, "mixed", num_tokens, popularity, device=device)
    meta = case.meta(split_k=split_k)
    meta.workspace.fill_(float("nan"))
    both = torch.randn(num_tokens, 2 * in_features, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    gate, up = both.split(in_features, dim=1)  # gate/up as column views of one tensor
    y = silu_mul_shrink(gate, up, case.slices, meta)
    y_ref, _ = silu_mul_shrink_ref(gate, up, case.slices, meta)
    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    _assert_shrink(case, meta, lora_shrink_ref(y, case.slices, meta), dtype)


@pytest.mark.parametrize("finish", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 4, 8])
def test_project_reads_the_parts(device, finish, num_tokens, monkeypatch):
    """lora_project(shrunk=True) after norm_shrink: no shrink launch; the finish (an NF4 base that splits K, up to
    its 4 tokens) or the expand (past them, after the matmul summed its own splits; or a base without split sums)
    adds the parts; the result is the base plus lora_apply_ref's delta."""
    from bitsandbytes.functional import quantize_4bit

    from hotlora.kernels.nf4 import nf4_matmul, pack_nf4

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    # NF4: K in whole 64-column blocks, enough of them to split (on CUDA nf4_regs_kernel serves up to 16 tokens and
    # splits K only in slices of at least 512 columns: regs_config)
    in_features, outs = (2048 if device == "cuda" else 512), SIZES["qkv"][1]
    case = make_case(dtype, in_features, outs, "mixed", num_tokens, "uniform" if num_tokens == 1 else "some_none",
                     device=device, seed=5)
    meta = case.meta(split_k=4)
    dense = torch.randn(sum(outs), in_features, generator=torch.Generator().manual_seed(2)) * in_features**-0.5
    w = pack_nf4(*quantize_4bit(dense.to(dtype).to(device), blocksize=64, compress_statistics=True, quant_type="nf4"))
    h = torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    norm_w = torch.ones(in_features, dtype=dtype, device=device)
    calls: list[str] = []
    for name in ("_launch_shrink", "_launch_expand"):
        real = getattr(project_mod._lora, name)
        monkeypatch.setattr(project_mod._lora, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k)))
    real_finish = project_mod._launch_finish
    monkeypatch.setattr(project_mod, "_launch_finish", lambda *a: (calls.append("_launch_finish"), real_finish(*a)))
    import hotlora.kernels.nf4 as nf4_mod

    real_reduce = nf4_mod._reduce
    monkeypatch.setattr(nf4_mod, "_reduce", lambda *a: (calls.append("_reduce"), real_reduce(*a)))

    _, x = norm_shrink(h, None, norm_w, 1e-5, case.slices, meta)
    if finish:
        def base(fin):
            return list(nf4_matmul(x, w, finish=fin).split(list(outs), dim=1))
    else:
        dq = (torch.randn(sum(outs), in_features, generator=torch.Generator().manual_seed(6)) * in_features**-0.5
              ).to(dtype).to(device)

        def base(fin):
            return list((x @ dq.T).split(list(outs), dim=1))
    ys = lora_project(base, x, case.slices, meta, shrunk=True)
    # past the finish's tokens the matmul sums its own splits first: in its last slice or (nf4_regs_kernel) by the
    # reduce launch
    assert [c for c in calls if c != "_reduce"] == (["_launch_finish"] if finish and num_tokens <= 4
                                                    else ["_launch_expand"])
    assert "_reduce" not in calls or (finish and num_tokens > 4)
    want = base(None)
    plain = torch.cat(want, dim=1).clone()
    lora_apply_ref(want, x, case.slices, meta)
    want = torch.cat(want, dim=1).double()
    assert (want != plain.double()).any()  # some token has an adapter
    err = ((torch.cat(ys, dim=1).double() - want).norm() / (want - plain.double()).norm()).item()
    assert err < TOLERANCE[dtype], err


@pytest.mark.parametrize(("env", "taken"), [(None, [1]), ("0", []), ("4", [1, 4]), ("32", [1, 4])])
def test_producer_takes_small_triton_steps(monkeypatch, env, taken):
    """Triton steps of up to PRODUCER_MAX_TOKENS tokens, or HOTLORA_LORA_PRODUCER's number (0: none), and never
    more than the finish takes; never the CPU's torch path or a step without adapters."""
    if env is None:
        monkeypatch.delenv("HOTLORA_LORA_PRODUCER", raising=False)
    else:
        monkeypatch.setenv("HOTLORA_LORA_PRODUCER", env)
    monkeypatch.delenv("HOTLORA_LORA_FINISH", raising=False)
    assert project_mod.PRODUCER_MAX_TOKENS == 1
    metas = {t: make_case(torch.float32, 40, (24, 8), 8, t, "uniform").meta() for t in (1, 4, 32)}
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    assert [t for t, m in metas.items() if shrink_in_producer(torch.zeros(t, 40), m)] == taken
    assert not shrink_in_producer(torch.zeros(1, 40), None)
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "0")
    assert not shrink_in_producer(torch.zeros(1, 40), metas[1])  # the CPU path: torch
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    monkeypatch.setenv("HOTLORA_LORA_PRODUCER", "on")
    with pytest.raises(ValueError, match="HOTLORA_LORA_PRODUCER must be a token count"):
        shrink_in_producer(torch.zeros(1, 40), metas[1])

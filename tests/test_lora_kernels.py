"""LoRA kernels on the CPU: the torch reference against a per-token oracle, the Triton kernels under
TRITON_INTERPRET=1 (CI sets it) against the same oracle, the metadata step, and the wrapper checks.

bf16 runs only on the GPU (tests/test_lora_kernels_gpu.py): the interpreter's bf16 tl.dot is wrong
(triton-lang/triton#11584).
"""

from __future__ import annotations

import os

import pytest
import torch
from lora_cases import POPULARITY, TOLERANCE, assert_matches, make_case

from hotlora.kernels import lora as lora_mod
from hotlora.kernels import lora_project as project_mod
from hotlora.kernels.lora import (
    KernelConfig,
    LoraSlice,
    build_lora_meta,
    lora_apply,
    lora_apply_triton,
    refresh_lora_meta,
    refresh_lora_meta_triton,
)
from hotlora.kernels.reference import (
    lora_apply_naive,
    lora_apply_ref,
    lora_expand_ref,
    lora_shrink_ref,
    refresh_lora_meta_ref,
)

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (set by make test)"
)

# (in_features, outputs): q/k/v with GQA-shaped k/v, gate/up, a single o/down; none a multiple of the blocks
SIZES = {"qkv": (72, (72, 24, 24)), "gate_up": (40, (100, 100)), "down": (100, (40,))}
# small blocks so the sizes above span several K steps and column blocks, partial ones included
SMALL_BLOCKS = KernelConfig(shrink_block_k=32, expand_block_n=32)
MEDIUM_BLOCKS = KernelConfig(shrink_block_k=64, expand_block_n=64)
DTYPES = (torch.float16, torch.float32)
RANKS = (8, 16, 64, "mixed")
TOKENS = (1, 7, 32, 300)


def _matrix() -> list:
    """Every (rank, tokens, popularity) once, its dtype and size rotating so that each pair of axis values
    meets both dtypes and every size; plus the full dtype x rank x tokens product at uniform popularity.
    (The full five-way product takes too long under the interpreter for CI's two cores.)"""
    cases = []
    for ri, ranks in enumerate(RANKS):
        for ti, tokens in enumerate(TOKENS):
            for pi, pop in enumerate(POPULARITY):
                dtype = DTYPES[(ri + ti + pi) % 2]
                cases.append((dtype, ranks, tokens, pop, list(SIZES)[(ri + 2 * ti + pi) % 3]))
            for dtype in DTYPES:
                if (dtype, ranks, tokens, "uniform") not in [c[:4] for c in cases]:
                    cases.append((dtype, ranks, tokens, "uniform", list(SIZES)[(ri + ti) % 3]))
    return [pytest.param(*c, id=f"{str(c[0])[6:]}-r{c[1]}-t{c[2]}-{c[3]}-{c[4]}") for c in cases]


def run_triton(case, fused, blocks=None, **meta_kw):
    meta = case.meta(**meta_kw)
    lora_apply_triton(
        case.ys(fused), case.x, case.slices, meta, blocks or KernelConfig(shrink_block_k=64, expand_block_n=64)
    )
    return fused


@interpret
@pytest.mark.parametrize(("dtype", "ranks", "num_tokens", "popularity", "size"), _matrix())
def test_triton_matches_oracle(dtype, ranks, num_tokens, popularity, size):
    in_features, outs = SIZES[size]
    case = make_case(dtype, in_features, outs, ranks, num_tokens, popularity, seed=num_tokens)
    got = run_triton(case, case.fused.clone())
    assert_matches(case, got, case.expected(), TOLERANCE[dtype])


@interpret
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize(("block_m", "split_k"), [(16, 1), (16, 3), (64, 2)])
def test_triton_blocks_and_splits(size, block_m, split_k):
    in_features, outs = SIZES[size]
    case = make_case(torch.float32, in_features, outs, "mixed", 90, "zipf", seed=block_m + split_k)
    got = run_triton(case, case.fused.clone(), SMALL_BLOCKS, block_m=block_m, split_k=split_k)
    assert_matches(case, got, case.expected(), TOLERANCE[torch.float32])


@interpret
def test_triton_rank_above_block():
    """Ranks over 64 loop over several rank chunks in both kernels."""
    case = make_case(torch.float32, 40, (48, 24), 100, 20, "uniform", num_slots=3)
    got = run_triton(case, case.fused.clone(), SMALL_BLOCKS)
    assert_matches(case, got, case.expected(), TOLERANCE[torch.float32])


@interpret
def test_shrink_workspace_matches_reference():
    in_features, outs = SIZES["qkv"]
    case = make_case(torch.float32, in_features, outs, "mixed", 33, "some_none")
    meta = case.meta(split_k=2)
    lora_mod.lora_shrink(case.x, case.slices, meta, SMALL_BLOCKS)
    h_ref = lora_shrink_ref(case.x, case.slices, meta)
    ws = meta.workspace[0]  # [slices, sorted position, rank]: the splits' sum
    pos = torch.empty_like(meta.sorted_tokens)
    pos[meta.sorted_tokens.long()] = torch.arange(meta.num_tokens, dtype=torch.int32)
    for i, sl in enumerate(case.slices):
        for t, s in enumerate(case.token_slots.tolist()):
            r = int(sl.rank[s]) if s >= 0 else 0
            torch.testing.assert_close(ws[i, pos[t], :r], h_ref[i, t, :r], rtol=1e-5, atol=1e-5)
    assert not meta.split_count.any(), "split counters must return to zero (CUDA-graph replays)"


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("ranks", [8, "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_reference_matches_oracle(dtype, ranks, popularity):
    in_features, outs = SIZES["qkv"]
    case = make_case(dtype, in_features, outs, ranks, 45, popularity)
    fused = case.fused.clone()
    lora_apply_ref(case.ys(fused), case.x, case.slices, case.meta())
    # same fp32 math as the oracle (which uses fp64) up to one rounding of y
    assert_matches(case, fused, case.expected(), {torch.float32: 1e-5}.get(dtype, 1e-2))


def test_reference_shrink_expand_compose():
    in_features, outs = SIZES["gate_up"]
    case = make_case(torch.float32, in_features, outs, "mixed", 20, "zipf")
    meta = case.meta()
    fused = case.fused.clone()
    lora_expand_ref(case.ys(fused), lora_shrink_ref(case.x, case.slices, meta), case.slices, meta)
    assert_matches(case, fused, case.expected(), 1e-5)


def test_lora_apply_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(lora_mod, "lora_apply_cpu", lambda *a: calls.append("cpu"))
    monkeypatch.setattr(lora_mod, "lora_apply_triton", lambda *a: calls.append("triton"))
    case = make_case(torch.float32, 40, (24,), 8, 5, "uniform")
    monkeypatch.delenv("HOTLORA_TRITON_CPU", raising=False)
    lora_apply(case.ys(case.fused), case.x, case.slices, case.meta())
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    lora_apply(case.ys(case.fused), case.x, case.slices, case.meta())
    assert calls == ["cpu", "triton"]


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 300])
def test_meta_grouping(num_tokens, popularity):
    """Every adapted token sits in exactly one tile; a tile holds <= block_m tokens of a single slot."""
    case = make_case(torch.float32, 8, (8,), 8, num_tokens, popularity, num_slots=5)
    meta = case.meta(block_m=16)
    slots = case.token_slots.long()
    key = torch.where(slots < 0, meta.num_slots, slots)
    order = meta.sorted_tokens.long()
    assert torch.equal(key[order], key.sort(stable=True).values)
    assert torch.equal(meta.token_pos.long()[order], torch.arange(num_tokens))
    seen = torch.zeros(num_tokens, dtype=torch.int64)
    for slot, start, end, row0 in meta.tile_info.tolist():
        if slot < 0:
            continue
        assert end == min(start + meta.block_m, int(meta.slot_bounds[slot + 1]))
        assert int(meta.slot_bounds[slot]) <= start < end
        assert row0 == int(case.row_start[slot])
        assert (slots[order[start:end]] == slot).all()
        seen[order[start:end]] += 1
    assert torch.equal(seen, (slots >= 0).long())


@interpret
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize(("num_tokens", "num_slots", "block_m"), [(0, 3, 16), (1, 1, 16), (45, 5, 16), (300, 40, 16),
                                                                  (300, 7, 64), (600, 200, 64)])  # fmt: skip
def test_meta_triton_matches_torch(num_tokens, num_slots, block_m, popularity):
    case = make_case(torch.float32, 8, (8,), 8, num_tokens, popularity, num_slots=num_slots)
    if num_tokens > 10:
        case.token_slots[3] = 10_000  # an out-of-range slot counts as no adapter in both
    meta = case.meta(block_m=block_m)
    expected = {k: getattr(meta, k).clone() for k in ("sorted_tokens", "token_pos", "slot_bounds", "tile_info")}
    for k in expected:
        getattr(meta, k).fill_(-7)  # poison: every element must be rewritten
    refresh_lora_meta_triton(meta)
    for k, v in expected.items():
        assert torch.equal(getattr(meta, k), v), k
    refresh_lora_meta_ref(meta)
    for k, v in expected.items():
        assert torch.equal(getattr(meta, k), v), k


def test_refresh_meta_in_place():
    case = make_case(torch.float32, 8, (8,), 8, 50, "uniform", num_slots=6)
    meta = case.meta()
    ptrs = [t.data_ptr() for t in (meta.sorted_tokens, meta.tile_info, meta.workspace)]
    case.token_slots.copy_(torch.randint(-1, 6, (50,), dtype=torch.int32))
    refresh_lora_meta(meta)
    fresh = case.meta()
    assert ptrs == [t.data_ptr() for t in (meta.sorted_tokens, meta.tile_info, meta.workspace)]
    for name in ("sorted_tokens", "token_pos", "slot_bounds", "tile_info"):
        assert torch.equal(getattr(meta, name), getattr(fresh, name)), name


def test_wrapper_rejects_bad_inputs():
    case = make_case(torch.float16, 40, (24, 8), 8, 6, "uniform")
    meta, ys = case.meta(), case.ys(case.fused)
    with pytest.raises(TypeError):
        lora_apply(ys, case.x.float(), case.slices, meta)
    with pytest.raises(ValueError):
        lora_apply(ys, case.x.T.contiguous().T, case.slices, meta)  # column stride != 1
    with pytest.raises(ValueError):
        lora_apply(ys[:1], case.x, case.slices, meta)
    bad = LoraSlice(case.slices[0].a, case.slices[0].b, case.slices[0].rank.long())
    with pytest.raises(ValueError):
        lora_apply(ys[:1], case.x, [bad], meta)
    with pytest.raises(ValueError):
        lora_apply(ys, case.x[:3], case.slices, meta)
    with pytest.raises(TypeError):
        build_lora_meta(case.token_slots.long(), case.row_start, case.scale, 8)


def _finish_expected(case, part: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64: the splits summed in order (+ bias), plus the oracle's delta."""
    base = part[0].double()
    for s in range(1, part.shape[0]):
        base = base + part[s].double()
    if bias is not None:
        base = base + bias.double()
    delta = torch.zeros(case.x.shape[0], sum(case.outs), dtype=torch.float64)
    ys = list(delta.split(list(case.outs), dim=1))
    lora_apply_naive(ys, case.x, case.slices, case.token_slots, case.row_start, case.scale)
    return base + delta


@interpret
@pytest.mark.parametrize("fn", ["lora_finish", "lora_tile_finish"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("size", "ranks", "num_tokens", "split", "bias"),
                         [("qkv", "mixed", 7, 4, True), ("gate_up", 16, 32, 2, False), ("down", 64, 1, 3, True),
                          ("qkv", 100, 5, 2, False), ("qkv", "mixed", 45, 3, True)])  # fmt: skip
def test_finish_sums_splits_and_adds_the_delta(fn, dtype, size, ranks, num_tokens, split, bias):
    """lora_finish (per token) and lora_tile_finish (per adapter tile; tiles of 8 tokens here, so slots span
    several, and tail programs cover the tokens without an adapter): a base matmul's split-K sums (+ bias) and
    the expand in one pass, rounded once; tokens without an adapter get exactly the fp32 sum of their splits;
    rank 0 slices add nothing."""
    in_features, outs = SIZES[size]
    case = make_case(dtype, in_features, outs, ranks, num_tokens, "some_none", seed=split, num_slots=4)
    meta = case.meta(split_k=2, block_m=8) if fn == "lora_tile_finish" else case.meta(split_k=2)
    n = sum(outs)
    gen = torch.Generator().manual_seed(7)
    part = torch.randn(split, num_tokens, n, generator=gen)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    lora_mod.lora_shrink(case.x, case.slices, meta, SMALL_BLOCKS)
    y = torch.full((num_tokens, n), float("nan"), dtype=dtype)
    getattr(lora_mod, fn)(part, b, y, case.slices, meta)
    want = _finish_expected(case, part, b)
    assert torch.isfinite(y).all()
    err = ((y.double() - want).norm() / want.norm()).item()
    assert err < TOLERANCE[dtype], err
    plain = part[0].clone()  # fp32, the splits in order, as the kernel (and nf4's reduce) adds them
    for s in range(1, split):
        plain += part[s]
    plain = (plain + b.float() if bias else plain).to(dtype)
    none = case.token_slots < 0
    assert torch.equal(y[none], plain[none])
    if len(outs) > 1:  # slice 1 has rank 0 for odd slots: those columns are the plain sums
        lo, hi = outs[0], outs[0] + outs[1]
        odd = (case.token_slots >= 0) & (case.token_slots % 2 == 1)
        assert torch.equal(y[odd, lo:hi], plain[odd, lo:hi])


def test_finish_rejects_bad_shapes():
    case = make_case(torch.float32, 40, (24, 8), 8, 6, "uniform")
    meta = case.meta()
    with pytest.raises(ValueError, match="part"):
        lora_mod.lora_finish(torch.zeros(2, 6, 31), None, torch.zeros(6, 32), case.slices, meta)
    with pytest.raises(ValueError, match="y"):
        lora_mod.lora_finish(torch.zeros(2, 6, 32), None, torch.zeros(6, 33), case.slices, meta)


@pytest.mark.parametrize(("env", "taken"), [(None, [1, 4]), ("0", []), ("1", [1]), ("4", [1, 4]), ("32", [1, 4, 32])])
def test_finish_takes_steps_up_to_its_limit(monkeypatch, env, taken):
    """The fused finish serves steps of up to FINISH_MAX_TOKENS tokens, or HOTLORA_LORA_FINISH's number (0: none),
    and only when the output is exactly the slices' columns, unit-strided."""
    if env is None:
        monkeypatch.delenv("HOTLORA_LORA_FINISH", raising=False)
    else:
        monkeypatch.setenv("HOTLORA_LORA_FINISH", env)
    case = make_case(torch.float32, 40, (24, 8), 8, 6, "uniform")
    assert project_mod.FINISH_MAX_TOKENS == 4
    got = [t for t in (1, 4, 32) if project_mod._fuse_finish(t, torch.zeros(t, 32), case.slices)]
    assert got == taken
    assert not project_mod._fuse_finish(1, torch.zeros(1, 40), case.slices)  # wider than slices
    assert not project_mod._fuse_finish(1, torch.zeros(1, 64)[:, ::2], case.slices)  # strided
    monkeypatch.setenv("HOTLORA_LORA_FINISH", "on")
    with pytest.raises(ValueError, match="HOTLORA_LORA_FINISH must be a token count"):
        project_mod._fuse_finish(1, torch.zeros(1, 32), case.slices)


@pytest.mark.parametrize(("env", "taken"), [(None, []), ("0", []), ("32", [1, 4, 32]), ("4096", [1, 4, 32, 4096])])
def test_tile_finish_takes_steps_up_to_its_limit(monkeypatch, env, taken):
    """The tile finish (tried after the per-token finish) serves steps of up to TILE_FINISH_MAX_TOKENS tokens (none
    by default), or HOTLORA_LORA_TILE_FINISH's number (0: none), with the same output conditions as the finish."""
    if env is None:
        monkeypatch.delenv("HOTLORA_LORA_TILE_FINISH", raising=False)
    else:
        monkeypatch.setenv("HOTLORA_LORA_TILE_FINISH", env)
    case = make_case(torch.float32, 40, (24, 8), 8, 6, "uniform")
    fits = [t for t in (1, 4, 32, 4096) if project_mod._fuse_tile_finish(t, torch.zeros(t, 32), case.slices)]
    assert fits == taken
    assert not project_mod._fuse_tile_finish(8, torch.zeros(8, 40), case.slices)
    assert not project_mod._fuse_tile_finish(8, torch.zeros(8, 64)[:, ::2], case.slices)


def test_finish_hook_says_which_steps_it_sums(monkeypatch):
    """The hook nf4_matmul asks before it launches (takes: it then keeps the split sums for the hook; else the matmul
    sums them itself) answers as the finishes' limits do, and refuses split sums without unit column stride."""
    monkeypatch.delenv("HOTLORA_LORA_FINISH", raising=False)
    monkeypatch.setenv("HOTLORA_LORA_TILE_FINISH", "16")
    case = make_case(torch.float32, 40, (24, 8), 8, 6, "uniform")
    hook = project_mod._Finish(case.slices, None, None)
    assert [t for t in (1, 4, 8, 16, 17, 64) if hook.takes(t, torch.zeros(t, 32))] == [1, 4, 8, 16]
    assert not hook.takes(1, torch.zeros(1, 40))
    assert not hook(torch.zeros(2, 8, 64)[:, :, ::2], None, torch.zeros(8, 32))
    assert not hook.finished

"""Random LoRA batches for the kernel tests (CPU interpreter and GPU): row pools, slots, fused outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotlora.kernels.lora import LoraMeta, LoraSlice, build_lora_meta
from hotlora.kernels.reference import lora_apply_naive

POPULARITY = ("distinct", "uniform", "zipf", "identical", "some_none", "all_none")
# relative error of the kernel's delta against the float64 oracle: ||y - y_ref|| / ||y_ref - y0||
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Case:
    x: torch.Tensor
    slices: list[LoraSlice]
    token_slots: torch.Tensor
    row_start: torch.Tensor
    scale: torch.Tensor
    max_rank: int
    fused: torch.Tensor  # [T, sum(outs) + 5]: the slices' outputs side by side, then 5 columns nobody owns
    outs: tuple[int, ...]

    def ys(self, fused: torch.Tensor) -> list[torch.Tensor]:
        return list(fused[:, : sum(self.outs)].split(list(self.outs), dim=1))

    def meta(self, **kw) -> LoraMeta:
        return build_lora_meta(self.token_slots, self.row_start, self.scale, self.max_rank, **kw)

    def expected(self) -> torch.Tensor:
        fused = self.fused.clone()
        lora_apply_naive(self.ys(fused), self.x, self.slices, self.token_slots, self.row_start, self.scale)
        return fused


def slot_ranks(ranks: str | int, num_slots: int, gen: torch.Generator) -> list[int]:
    if ranks in ("mixed", "small"):  # small: every rank within the smallest rank class (16)
        choices = torch.tensor([8, 12, 16, 24, 33, 64] if ranks == "mixed" else [4, 8, 12, 16])
        return choices[torch.randint(0, len(choices), (num_slots,), generator=gen)].tolist()
    return [int(ranks)] * num_slots


def token_slots_for(popularity: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    if popularity == "distinct":
        slots = torch.randperm(num_tokens, generator=gen) % num_slots
    elif popularity in ("uniform", "some_none"):
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf" and num_tokens:
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    elif popularity == "identical":
        slots = torch.full((num_tokens,), int(torch.randint(0, num_slots, (1,), generator=gen)))
    elif popularity in ("all_none", "zipf"):
        slots = torch.full((num_tokens,), -1)
    else:
        raise ValueError(popularity)
    if popularity == "some_none":
        slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    return slots.to(torch.int32)


def make_case(
    dtype: torch.dtype,
    in_features: int,
    outs: tuple[int, ...],
    ranks: str | int,
    num_tokens: int,
    popularity: str,
    *,
    num_slots: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> Case:
    """Slots placed in the pool in a shuffled order with gaps of garbage rows, so that a wrong row shows.

    Slice 1 (k in q/k/v) skips the odd slots (rank 0): a module that an adapter does not target.
    """
    gen = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        num_slots = max(num_slots, min(num_tokens, 32))
    rank = slot_ranks(ranks, num_slots, gen)
    row_start, cursor = [0] * num_slots, 3
    for s in torch.randperm(num_slots, generator=gen).tolist():
        row_start[s] = cursor
        cursor += rank[s] + 2
    pool_rows = cursor + 1

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    slices = []
    for i, out in enumerate(outs):
        r = [0 if i == 1 and s % 2 else rank[s] for s in range(num_slots)]
        a = rnd(pool_rows, in_features, std=in_features**-0.5)
        b = rnd(pool_rows, out, std=max(rank) ** -0.5)
        slices.append(LoraSlice(a=a, b=b, rank=torch.tensor(r, dtype=torch.int32, device=device)))
    alpha = torch.rand(num_slots, generator=gen) + 0.5
    return Case(
        x=rnd(num_tokens, in_features),
        slices=slices,
        token_slots=token_slots_for(popularity, num_tokens, num_slots, gen).to(device),
        row_start=torch.tensor(row_start, dtype=torch.int32, device=device),
        scale=alpha.to(device),
        max_rank=max(rank),
        fused=rnd(num_tokens, sum(outs) + 5),
        outs=tuple(outs),
    )


def assert_matches(case: Case, got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Delta within tol of the oracle; untouched exactly where no adapter applies (poison check)."""
    assert torch.isfinite(got).all()
    base, got64, exp64 = case.fused.double(), got.double(), expected.double()
    delta = (exp64 - base).norm().item()
    if delta > 0:
        err = (got64 - exp64).norm().item() / delta
        assert err < tol, f"relative error {err:.3g} > {tol:.3g}"
    none = case.token_slots < 0
    assert torch.equal(got[none], case.fused[none]), "a token without adapter was written"
    assert torch.equal(got[:, sum(case.outs) :], case.fused[:, sum(case.outs) :]), "columns past the slices written"
    if len(case.outs) > 1:  # slice 1 has rank 0 for odd slots
        lo, hi = case.outs[0], case.outs[0] + case.outs[1]
        odd = (case.token_slots >= 0) & (case.token_slots % 2 == 1)
        assert torch.equal(got[odd, lo:hi], case.fused[odd, lo:hi]), "a rank-0 slice was written"

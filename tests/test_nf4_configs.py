"""The NF4 kernel's launch configs (hotlora.kernels.nf4.pick_config and Nf4Config's checks): which config each M and
weight shape gets, and how many programs it launches. Pure Python: no kernel runs here (tests/test_nf4_kernel.py
runs the configs)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from nf4_cases import LLAMA

from hotlora.kernels import _nf4_configs as configs_mod
from hotlora.kernels.nf4 import MAX_GEMV_M, SCALE_VALUES, Nf4Config, pick_config


def test_x_tma_is_served_only_when_switched_on(monkeypatch):
    monkeypatch.delenv("HOTLORA_NF4_X_TMA", raising=False)
    assert pick_config(176, 28672, 4096).x_tma is configs_mod.SERVE_X_TMA
    monkeypatch.setenv("HOTLORA_NF4_X_TMA", "1")
    assert pick_config(176, 28672, 4096).x_tma and pick_config(256, 6144, 4096).x_tma
    assert not pick_config(512, 28672, 4096).x_tma  # the 256-row tile takes x by pointer loads
    assert not pick_config(16, 28672, 4096).x_tma  # no TMA at small M
    monkeypatch.setenv("HOTLORA_NF4_X_TMA", "0")
    assert not pick_config(176, 28672, 4096).x_tma


def test_x_tma_needs_tma():
    with pytest.raises(ValueError, match="x_tma"):
        Nf4Config(16, 32, x_tma=True)
    for rows, warps, stages in ((256, 8, 3), (128, 4, 4), (64, 4, 5)):  # only the tiles verified on the GPU
        with pytest.raises(ValueError, match="raced"):
            Nf4Config(rows, 128, warps=warps, stages=stages, tma=True, x_tma=True)
    for rows, warps, stages in ((256, 8, 2), (128, 8, 3), (128, 4, 1)):
        assert Nf4Config(rows, 128, warps=warps, stages=stages, tma=True, x_tma=True).x_tma


def test_tail_configs_need_scaled_weights_and_no_prefetch():
    for kwargs in ({}, {"scale": SCALE_VALUES, "prefetch": True}, {"scale": SCALE_VALUES, "dense": True}):
        with pytest.raises(ValueError, match="tail_m"):
            Nf4Config(16, 32, tail_m=16, **kwargs)
    for tail in (24, -16):
        with pytest.raises(ValueError, match="power of two"):
            Nf4Config(16, 32, scale=SCALE_VALUES, tail_m=tail)
    assert Nf4Config(128, 64, scale=SCALE_VALUES, tail_m=64).rows == 192


def test_configs_cover_every_m():
    for m in (1, MAX_GEMV_M, MAX_GEMV_M + 1, 16, 17, 64, 65, 96, 129, 176, 2048, 10**6):
        cfg = configs_mod.pick_config(m, 4096, 4096, gemv=True)
        assert cfg.gemv == (m <= MAX_GEMV_M)
        assert pick_config(m, 4096, 4096).gemv == (m <= MAX_GEMV_M and configs_mod.SERVE_GEMV)
        if m <= 192:
            assert cfg.rows >= m  # one program's rows (a tile and its tail) hold M
        elif m > 256:
            assert cfg.dense
        assert not pick_config(m, 4096, 4096, gemv=False).gemv


def test_gemv_split_fills_the_gpu():
    """Few output tiles take more K slices (o, down); a wide output needs none (gate/up: no reduce launch)."""
    splits = {name: pick_config(1, sum(w), k, gemv=True).split_k for name, (k, w) in LLAMA.items()}
    assert splits["gate_up"] == 1 and splits["o"] > 1 and splits["down"] > 1
    assert pick_config(1, 192, 576, gemv=True).split_k <= 3  # never more slices than SmolLM2's 5 groups can fill


def test_split_by_sms_fills_the_gpu():
    """Buckets recorded with BY_SMS take the fewest K slices (a power of two within K's 128-column groups) that
    give every SM a program; the large-weight config serves N * K >= LARGE_WEIGHT only."""
    for m in (65, 96, 128, 129, 176, 256):
        for k, widths in LLAMA.values():
            n = sum(widths)
            cfg = pick_config(m, n, k, gemv=False)
            tiles = -(-m // cfg.rows) * -(-n // cfg.block_n)
            assert cfg.split_k >= 1 and cfg.split_k & (cfg.split_k - 1) == 0 and cfg.split_k <= k // 128
            assert tiles * cfg.split_k >= configs_mod._SMS or 2 * cfg.split_k > k // 128
            assert cfg.split_k == 1 or tiles * cfg.split_k // 2 < configs_mod._SMS
    small, large = (pick_config(256, n, 4096, gemv=False) for n in (4096, configs_mod.LARGE_WEIGHT // 4096))
    assert large.block_m > small.block_m


def test_decode_splits_give_enough_programs():
    """At decode sizes (M <= 16; large weights to 64 rows) the recorded K slices are doubled until the launch has
    _MIN_PROGRAMS programs or K's groups run out: o and down take more slices than q/k/v and gate/up."""
    for m in (1, 16, 32, 64):
        for name, (k, widths) in LLAMA.items():
            n = sum(widths)
            cfg = pick_config(m, n, k, gemv=False)
            rec, big = next((c, big) for hi, c, big in configs_mod._CONFIGS if m <= hi and not c.gemv)
            rec = big if big is not None and n * k >= configs_mod.LARGE_WEIGHT else rec
            if m > 16 and n * k < configs_mod.LARGE_WEIGHT:
                continue
            tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
            assert tiles * cfg.split_k >= configs_mod._MIN_PROGRAMS or 2 * cfg.split_k > k // 128, (name, m)
            assert cfg.split_k == 1 or tiles * cfg.split_k // 2 < configs_mod._MIN_PROGRAMS or (
                cfg.split_k <= rec.split_k), (name, m)
    assert pick_config(1, 4096, 4096).split_k > pick_config(1, 6144, 4096).split_k
    assert pick_config(1, 4096, 14336).split_k > pick_config(1, 28672, 4096).split_k
    assert pick_config(1, 128, 512).split_k <= 4  # never more slices than K's 128-column groups
    assert pick_config(32, 4096, 4096).split_k < pick_config(32, 4096, 14336).split_k  # o keeps 4 above 16 rows


def test_one_row_alone_takes_two_warp_tiles():
    """At M = 1 with no LoRA shrink beside it (a base-model step) the matmul takes the 32-wide weights-first tiles
    over 2 warps; beside a shrink, and above one row, the recorded configs."""
    for k, widths in LLAMA.values():
        n = sum(widths)
        alone, beside = pick_config(1, n, k, alone=True), pick_config(1, n, k)
        assert (alone.block_n, alone.warps, alone.swap_ab) == (32, 2, True)
        assert (beside.block_n, beside.warps, beside.swap_ab) == (64, 4, False)
        assert pick_config(2, n, k, alone=True) == pick_config(2, n, k)
    assert pick_config(1, 4096, 14336, alone=True).split_k == 8  # down: 128 tiles, 8 slices


def test_down_at_32_rows_takes_x_first():
    """Large weights at 17-32 rows take weights-first tiles over 2 warps, except deep K (down) where M is a multiple
    of 16 (Triton's separate build for it ran slower weights first): the same tile, x first."""
    (k_down, (n_down,)), (k_gu, w_gu) = LLAMA["down"], LLAMA["gate_up"]
    at32, at24 = pick_config(32, n_down, k_down), pick_config(24, n_down, k_down)
    assert at24.swap_ab and not at32.swap_ab
    assert at32 == replace(at24, swap_ab=False)
    assert pick_config(32, sum(w_gu), k_gu).swap_ab and pick_config(24, sum(w_gu), k_gu).swap_ab


def test_every_sweep_variant_builds_its_configs():
    """bench/nf4_sweep_configs.py's variants of the recorded configs are valid Nf4Configs at every bucket, including
    the served x-by-TMA ones at other stage counts (Nf4Config refuses unverified x-by-TMA tiles on construction)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "nf4_sweep_configs.py"
    spec = importlib.util.spec_from_file_location("bench_nf4_sweep_configs", path)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep
    spec.loader.exec_module(sweep)
    for variant, m, (k, widths) in itertools.product(sweep.VARIANTS, (1, 16, 32, 64, 96, 176, 208, 256, 384, 512),
                                                    LLAMA.values()):
        configs = sweep.variant_configs(variant, m, sum(widths), k)
        assert configs and all(isinstance(c, Nf4Config) for c in configs), (variant, m)
        assert all(c.x_tma_verified for c in configs if c.x_tma), (variant, m)


def test_regs_kernel_serves_decode_sizes_with_the_swept_slices(monkeypatch):
    """regs_config: served up to MAX_REGS_M rows (16: 8 x-rows a program up to 8, 16 above), with the K slices swept
    on the H200 (8 rows: q/k/v, o, down 8, gate/up 4; 16 rows: q/k/v 4, o and down 8, gate/up 2) and never more slices
    than K has 4-group runs; HOTLORA_NF4_REGS=0 turns it off, and the recorded configs stay pick_config's."""
    monkeypatch.delenv("HOTLORA_NF4_REGS", raising=False)
    swept = {8: {"qkv": 8, "o": 8, "gate_up": 4, "down": 8}, 16: {"qkv": 4, "o": 8, "gate_up": 2, "down": 8}}
    for m, want in swept.items():
        assert {name: configs_mod.regs_config(m, sum(w), k).split_k for name, (k, w) in LLAMA.items()} == want, m
    assert configs_mod.MAX_REGS_M == 16
    for m in range(1, configs_mod.MAX_REGS_M + 1):
        cfg = configs_mod.regs_config(m, 4096, 4096)
        assert cfg.regs and cfg.block_m == (8 if m <= 8 else 16) and cfg.block_n == 64 and cfg.stages >= 2
        assert not pick_config(m, 4096, 4096).regs
    assert configs_mod.regs_config(configs_mod.MAX_REGS_M + 1, 4096, 4096) is None
    for m in (1, 16):  # SmolLM2: 5 groups, one slice
        assert configs_mod.regs_config(m, 1728, 576).split_k == 1
    monkeypatch.setenv("HOTLORA_NF4_REGS", "0")
    assert configs_mod.regs_config(1, 4096, 4096) is None


def test_regs_configs_refuse_what_the_kernel_cannot_run():
    for bad in (dict(block_m=4), dict(block_m=64), dict(block_n=48), dict(stages=1), dict(stages=5), dict(swap_ab=True),
                dict(tma=True), dict(scale=SCALE_VALUES), dict(warps=8)):  # 8 warps need 16 x-rows (the x copies)
        with pytest.raises(ValueError):
            Nf4Config(**{"block_m": 8, "block_n": 64, "split_k": 2, "stages": 3, "regs": True, **bad})
    Nf4Config(16, 128, 2, warps=8, stages=3, regs=True)  # valid


def test_ss_kernel_serves_large_weights_at_384_to_768_rows(monkeypatch):
    """ss_config (served by default, SERVE_SS): nf4_ss_kernel for gate/up and down (N * K >= LARGE_WEIGHT) at
    SS_MIN_M-SS_MAX_M rows, 256x128 tiles over 8 warps with the fewest K slices whose waves are 90% full (gate/up 1,
    down 2 at 512 rows, as swept); not for q/k/v or o, nor outside the rows; HOTLORA_NF4_SS=0 turns it off (=1 on), and
    pick_config never returns it (the fallback where the kernel cannot run: not Hopper, fp32 x)."""
    monkeypatch.delenv("HOTLORA_NF4_SS", raising=False)
    assert configs_mod.ss_config(512, 28672, 4096).ss  # the default
    monkeypatch.setattr(configs_mod, "SERVE_SS", False)
    assert configs_mod.ss_config(512, 28672, 4096) is None
    monkeypatch.setenv("HOTLORA_NF4_SS", "1")
    splits = {name: configs_mod.ss_config(512, sum(w), k) for name, (k, w) in LLAMA.items()}
    assert splits["qkv"] is None and splits["o"] is None
    assert (splits["gate_up"].split_k, splits["down"].split_k) == (1, 2)
    # 768 rows: gate/up's last wave goes to the tail launch; down's 96 tiles take 4 slices (2: 1.45 waves)
    assert [configs_mod.ss_config(768, sum(w), k).split_k for k, w in (LLAMA["gate_up"], LLAMA["down"])] == [1, 4]
    assert all(c.ss and (c.block_m, c.block_n, c.warps) == (256, 128, 8) for c in (splits["gate_up"], splits["down"]))
    k, widths = LLAMA["gate_up"]
    for m in (configs_mod.SS_MIN_M - 1, configs_mod.SS_MAX_M + 1, 64):
        assert configs_mod.ss_config(m, sum(widths), k) is None
    assert configs_mod.ss_config(configs_mod.SS_MIN_M, sum(widths), k).ss
    assert not any(pick_config(m, sum(widths), k).ss for m in (384, 512))
    monkeypatch.setenv("HOTLORA_NF4_SS", "0")
    assert configs_mod.ss_config(512, sum(widths), k) is None


def test_ss_configs_refuse_what_the_kernel_cannot_run():
    for bad in (dict(block_m=32), dict(warps=2, block_n=32), dict(block_n=64), dict(scale=0), dict(swap_ab=True),
                dict(tma=True), dict(dense=True)):
        with pytest.raises(ValueError):
            Nf4Config(**{"block_m": 256, "block_n": 128, "warps": 8, "scale": SCALE_VALUES, "ss": True, **bad})
    Nf4Config(256, 64, 2, warps=4, scale=SCALE_VALUES, ss=True)  # valid

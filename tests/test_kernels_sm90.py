"""The KV-cache kernels compiled for an H200 (sm_90) on a machine with no GPU (tests/sm90_compile.py): CI runs
them only under the interpreter, which accepts code the GPU compiler refuses and converts to fp8 its own way. The
constexprs are the ones the wrappers pick for Llama-3-8B's shape (head_dim 128, GQA 4, blocks of 16 tokens); with
an fp8 cache the PTX must convert to and from e4m3 in hardware."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hotlora.kernels.attention import attention_tiles, launch_plan

CACHES = {"bf16": "*bf16", "fp8": "*fp8e4nv"}
ROPE = ("elementwise:_rope_kv_kernel", {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i32",
                                        "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"})  # fmt: skip
ATTENTION = ("_attention_triton:paged_attention_kernel", {
    "q": "*bf16", "out": "*bf16", "qk_scale": "fp32", "part_o": "*fp32", "part_lse": "*fp32", "cu_q": "*i32",
    "ctx_lens": "*i32", "tables": "*i32"})  # fmt: skip
# max_q_len, split-KV: the configs paged_attention picks for each
SHAPES = {"decode": (1, False), "split": (1, True), "prefill": (512, False), "mixed-split": (176, True)}


def _attention_case(cache: str, max_q_len: int, split: bool) -> list:
    block_q, g_pad = attention_tiles(max_q_len, 4)
    cfg, _ = launch_plan(torch.device("cuda"), max_q_len, max_q_len + 1, 8, 4, max_q_len, 8192, 2 if split else 1)
    consts = {"G": 4, "G_PAD": g_pad, "HEAD_DIM": 128, "D_PAD": 128, "BLOCK_SIZE": 16, "BLOCK_Q": block_q,
              "BLOCK_M": max(16, block_q * g_pad), "BLOCK_N": cfg.block_n, "SPLIT": split, "WINDOW": False,
              "PREC": "tf32", "PDL": True}  # fmt: skip
    pointers = ATTENTION[1] | {"k_cache": CACHES[cache], "v_cache": CACHES[cache]}
    return [ATTENTION[0], pointers, consts, cfg.warps, cfg.stages]


CASES = {("rope_kv", cache): [ROPE[0], ROPE[1] | {"kc_ptr": CACHES[cache], "vc_ptr": CACHES[cache]},
                              {"HALF": 64, "FP8": cache == "fp8", "PDL": True}, 4, 2] for cache in CACHES}  # fmt: skip
CASES |= {(shape, cache): _attention_case(cache, *SHAPES[shape]) for shape in SHAPES for cache in CACHES}


@pytest.fixture(scope="module")
def conversions() -> dict:
    """Every case compiled in one subprocess, out of the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script), json.dumps(list(CASES.values()))], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return {key: set(found) for key, found in zip(CASES, json.loads(run.stdout), strict=True)}


@pytest.mark.parametrize("cache", list(CACHES))
def test_rope_kv_write_compiles(conversions, cache):
    assert conversions["rope_kv", cache] == ({"cvt.rn.satfinite.e4m3x2"} if cache == "fp8" else set())


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_attention_compiles(conversions, shape, cache):
    assert conversions[shape, cache] == ({"cvt.rn.f16x2.e4m3x2"} if cache == "fp8" else set())

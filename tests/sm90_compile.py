"""Compile hotlora's Triton kernels for an H200 (sm_90) on a machine with no GPU, with the ptxas that Triton's wheel
ships, and report the fp8 conversions in their PTX (tests/test_kernels_sm90.py). Run it as a script, without
TRITON_INTERPRET: under the interpreter @triton.jit gives functions that cannot be compiled.

    python tests/sm90_compile.py CASES_JSON  ->  one JSON list: each case's sorted e4m3 conversions

A case is [kernel, pointer types, constexprs, num_warps, num_stages]; kernel is "module:name" under
hotlora.kernels, and parameters it does not name are int32 scalars.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(kernel, pointers: dict[str, str], consts: dict, warps: int, stages: int) -> str:
    """kernel's PTX for sm_90; a cubin is built too, so ptxas accepts it."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    if not compiled.asm["cubin"]:
        raise RuntimeError(f"no cubin for {kernel.fn.__name__}")
    return compiled.asm["ptx"]


def main(cases: list) -> list[list[str]]:
    out = []
    for kernel, pointers, consts, warps, stages in cases:
        module, name = kernel.split(":")
        fn = getattr(importlib.import_module(f"hotlora.kernels.{module}"), name)
        ptx = compile_sm90(fn, pointers, consts, warps, stages)
        out.append(sorted(set(re.findall(r"cvt\.[\w.]*e4m3x2", ptx))))
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

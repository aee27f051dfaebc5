"""One NF4 projection at one M, called in a loop with its served config: the program for ncu or nsys to wrap.

    ncu -k regex:nf4 --launch-skip 20 --launch-count 1 --section WarpStateStats ... \
        python bench/nf4_profile.py --shape gate/up --m 1

Rotating weight copies as in nf4_gemm.py (so each call reads its weights from HBM); prints the config it served.
"""

from __future__ import annotations

import argparse

import torch
from nf4_gemm import SHAPES, Case

from hotlora.kernels import nf4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gate/up", help="a prefix of one of nf4_gemm.SHAPES' names")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=40)
    a = ap.parse_args()
    name = next(s for s in SHAPES if s.startswith(a.shape))
    case = Case(*SHAPES[name])
    xs = [torch.randn(a.m, case.k, device="cuda", dtype=torch.bfloat16) for _ in range(case.count)]
    for i in range(a.calls):
        nf4.nf4_matmul(xs[i % case.count], case.packed[i % case.count])
    torch.cuda.synchronize()
    print(name, "M", a.m, nf4._served_config(xs[0], case.packed[0], None), flush=True)


if __name__ == "__main__":
    main()

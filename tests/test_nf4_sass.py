"""The NF4 kernel compiled here for sm_90 with no GPU (bench/nf4_sass.py, with the ptxas and nvdisasm Triton's
wheel ships): HOTLORA_NF4_L2_PREFETCH's L2 prefetches sit ahead of the PDL wait; and its setting is checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hotlora.kernels import nf4

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("groups", [0, 2])
def test_l2_prefetch_precedes_the_pdl_wait(groups):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = subprocess.run([sys.executable, "nf4_sass.py", "--m", "1", "--l2-prefetch", str(groups)], cwd=BENCH,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, total = map(int, re.search(r"L2 prefetches before the PDL wait / all: (\d+) / (\d+)", out.stdout).groups())
    assert (before, total) == ((total, total) if groups else (0, 0)) and (total > 0) == bool(groups)


def test_l2_prefetch_setting(monkeypatch):
    x = torch.zeros(1, 128)
    for raw in ("0", "2", "4"):  # a CPU tensor: never (inline PTX)
        monkeypatch.setenv("HOTLORA_NF4_L2_PREFETCH", raw)
        assert nf4._l2_prefetch(x) == 0
    for bad in ("3", "-1", "on"):
        monkeypatch.setenv("HOTLORA_NF4_L2_PREFETCH", bad)
        with pytest.raises(ValueError, match="HOTLORA_NF4_L2_PREFETCH"):
            nf4._l2_prefetch(x)

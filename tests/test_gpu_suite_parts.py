"""bench/gpu_suite.sh runs the GPU tests in parts, one device call each: every test file with GPU tests must be in one
part (a new file left out would never run on the GPU)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_with_gpu_tests_is_in_a_part():
    script = (ROOT / "bench" / "gpu_suite.sh").read_text()
    listed = re.findall(r"tests/(test_\w+\.py)", script)
    gpu = {p.name for p in (ROOT / "tests").glob("test_*.py")
           if p.name != Path(__file__).name and re.search(r"mark\.gpu|kernel_device", p.read_text())}
    assert sorted(listed) == sorted(set(listed))  # none twice
    assert set(listed) == gpu

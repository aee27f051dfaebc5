"""The parts of `make test-container` (tests/container_e2e.py) that run without a container engine: its
refusals must say why, and its limits and wheel lookup must be right, since CI depends on them."""

from __future__ import annotations

import resource
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from container_engine import Unusable, detect_engine, find_torch_wheel, torch_version, ulimit_flags, wheel_server

WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def test_ulimits_stay_within_the_hard_limits():
    flags = ulimit_flags()
    limits = dict(flag.split("=") for flag in flags[1::2])
    for name, rlimit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = (int(v) for v in limits[name].split(":"))
        assert soft == hard > 0
        cap = resource.getrlimit(rlimit)[1]
        assert cap == resource.RLIM_INFINITY or hard <= cap


def test_a_missing_engine_is_refused_with_the_reason():
    with pytest.raises(Unusable, match=r"no-such-engine: not installed(.|\n)*apt-get install podman"):
        detect_engine("no-such-engine")


def test_the_target_exits_non_zero_and_says_why():
    """Never a silent skip: no engine means exit 2 and a line naming what is missing."""
    script = Path(__file__).resolve().parent / "container_e2e.py"
    out = subprocess.run(
        [sys.executable, str(script), "--engine", "no-such-engine"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot run here" in out.stdout and "no-such-engine: not installed" in out.stdout


def test_torch_wheel_lookup(tmp_path, monkeypatch):
    (tmp_path / WHEEL).write_bytes(b"")
    (tmp_path / WHEEL.replace("cp311", "cp312")).write_bytes(b"")
    monkeypatch.setenv("PIP_FIND_LINKS", f"/nonexistent {tmp_path}")
    assert find_torch_wheel("", "2.13.0", "cp311") == tmp_path / WHEEL
    assert find_torch_wheel(str(tmp_path / WHEEL), "2.13.0", "cp311") == tmp_path / WHEEL
    with pytest.raises(Unusable, match="not for the base image's python"):
        find_torch_wheel(str(tmp_path / WHEEL), "2.13.0", "cp313")
    with pytest.raises(Unusable, match=r"torch-2\.99\.0\+cpu-cp311-\*\.whl"):
        find_torch_wheel("", "2.99.0", "cp311")
    assert torch_version("torch==2.13.0") == "2.13.0"
    with pytest.raises(Unusable):
        torch_version("torch>=2")


def test_wheel_server_serves_a_find_links_page(tmp_path):
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"not really a wheel")
    with wheel_server(wheel, tmp_path) as url:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert f'href="{WHEEL.replace("+", "%2B")}"' in page
        assert urllib.request.urlopen(url + WHEEL.replace("+", "%2B"), timeout=10).read() == b"not really a wheel"

"""The export's work folders (server/api/export.py): a folder whose process died is removed by the next export's
sweep; folders of exports in progress, in this process or another, are kept. Real processes, real locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hotlora.server.api.export import WorkDir, sweep

_HOLD = """
import os, sys
from pathlib import Path
from hotlora.server.api.export import WorkDir
w = WorkDir(Path(sys.argv[1]))
(w.path / "merged").mkdir()
print(w.path, flush=True)
if sys.argv[2] == "die":
    os._exit(0)  # as a crash: no clean-up runs
sys.stdin.readline()
"""


def _holder(root: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_dead_exports_folder_is_swept_and_live_ones_are_kept(tmp_path):
    root = tmp_path / "exports"
    crashed, dead = _holder(root, "die")
    assert crashed.wait(30) == 0 and dead.is_dir()
    other, elsewhere = _holder(root, "hold")  # an export in progress in another process (a replica)
    mine = WorkDir(root)
    try:
        assert sweep(root) == [dead]
        assert not dead.exists() and elsewhere.is_dir() and mine.path.is_dir()
        assert sweep(root) == []
    finally:
        other.communicate("\n", timeout=30)
    assert sweep(root) == [elsewhere]  # its process ended without closing it
    mine.close()
    mine.close()  # the stream's end and the response's background task may both close it
    assert not any(root.iterdir())

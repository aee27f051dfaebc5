"""The export's work folders (server/api/export.py): a folder whose process died is removed by the next export's
sweep; folders of exports in progress, in this process or another, are kept. Real processes, real locks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def test_lockless_folders_of_older_versions_are_swept_once_a_day_old(tmp_path):
    root = tmp_path / "exports"
    old, fresh, touched = (root / n for n in ("old", "fresh", "touched"))
    for folder in (old, fresh, touched):
        (folder / "merged").mkdir(parents=True)
        (folder / "merged" / "model.safetensors").write_bytes(b"x")
    day_ago = time.time() - 2 * 24 * 3600
    for folder in (old, touched):
        for p in (folder / "merged" / "model.safetensors", folder / "merged", folder):
            os.utime(p, (day_ago, day_ago))
    (touched / "merged" / "model.safetensors").write_bytes(b"still being written")
    (root / "stray.txt").write_text("not a folder")
    assert sweep(root) == [old]
    assert fresh.is_dir() and touched.is_dir() and (root / "stray.txt").exists()
    assert sorted(sweep(root, unlocked_max_age_s=-1)) == [fresh, touched]

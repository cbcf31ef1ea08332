"""Live = post-mortem on a long real run: a straggler that lasts 560 steps (nine times the
service's window) stays one open finding from detection to the end, across a kill -9 and
restart of `ringwatch serve`, and `ringwatch analyze` names the same rank, class and onset.

The run is ``benchmarks/live_long.py`` (a real 4-rank Gloo job on 2 emulated hosts, a real
service and agent): its checks are this test's.
"""

from __future__ import annotations

import subprocess

from jobtools import PY, REPO, need_netns


def test_a_straggler_outlasting_the_window_survives_a_service_kill(tmp_path):
    need_netns()
    proc = subprocess.run([PY, str(REPO / "benchmarks" / "live_long.py"), "--steps", "600",
                           "--keep", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("ok  ") == 6

"""A plain ``pip install`` of ringwatch (no extras, no torch) in a fresh virtual environment
runs the post-mortem, the log checks, the service and the node agent: every module those
commands import is a declared dependency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
H200_LOGS = REPO / "tests" / "data" / "h200" / "logs"
# What a fresh clone does not have: the developer's environment and build outputs.
_NOT_IN_A_CLONE = shutil.ignore_patterns(".venv", ".git", ".whl", "build", "dist",
                                         "*.egg-info", "__pycache__", ".pytest_cache",
                                         ".ruff_cache", "ringwatch-logs", "ringwatch-demo")


def _run(cmd: list[str], *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, check=False)


def test_a_plain_install_runs_analyze_serve_and_the_agent(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_IN_A_CLONE)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, rw = str(env_dir / "bin" / "python"), str(env_dir / "bin" / "ringwatch")
    p = _run([py, "-m", "pip", "install", "--quiet", str(src)], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run([py, "-c", "import torch"], cwd=tmp_path)
    assert "No module named 'torch'" in p.stderr  # nothing pulled torch in

    job = H200_LOGS / "train-nccl-idle"
    p = _run([rw, "analyze", str(job)], cwd=tmp_path)
    assert p.returncode == 0 and "1200 collective rows" in p.stdout, p.stdout + p.stderr
    p = _run([rw, "analyze", str(job), "--json"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert (report["collectives"], report["findings"]) == (1200, []), report
    page = tmp_path / "report.html"  # the page's package and the summary's rich are installed
    p = _run([rw, "analyze", str(job), "--html", str(page)], cwd=tmp_path)
    assert p.returncode == 0 and "<svg" in page.read_text(), p.stderr
    p = _run([py, "-c", "import rich.progress, rich.table"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = _run([rw, "logs", str(H200_LOGS / "nccl-ops"), "--check"], cwd=tmp_path)
    assert p.returncode == 0 and "flight recorder rank 0: OK" in p.stdout, p.stdout + p.stderr
    p = _run([rw, "serve", "--help"], cwd=tmp_path)
    assert p.returncode == 0 and "--otlp-listen" in p.stdout, p.stderr
    p = _run([rw, "agent", "--once", "--no-gpu", "--log-dir", "off", "--prometheus", "off"],
             cwd=tmp_path)
    assert p.returncode == 0 and "ringwatch_host_cpu_seconds_total" in p.stdout, p.stderr

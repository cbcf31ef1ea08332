"""Helpers for tests that run real multi-process torch.distributed jobs on Gloo.

Every job runs under ``torchrun --standalone`` (it picks a free port, so tests can run side by
side) in its own session; whatever outlives a test is killed with its process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "tests" / "jobs"


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in [k for k in env if k.startswith("RINGWATCH_")]:
        del env[k]
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, target: list[str]) -> list[str]:
    """``torchrun`` for ``target`` (``["-m", "mod", ...]`` or ``["script.py", ...]``)."""
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *target]


def ringwatch_cmd(*args: str) -> list[str]:
    return [PY, "-m", "ringwatch._cli", *args]


class Job:
    """A started job; ``finish()`` waits for it and kills its whole session on timeout."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None):
        self.cmd = cmd
        stamp = time.monotonic_ns()
        self.out_path = cwd / f"job-{stamp}.out"
        # the job's TMPDIR (torchrun leaves a folder per launch), removed when it finishes
        self.tmp_dir = cwd / f"tmp-{stamp}"
        self.tmp_dir.mkdir()
        env = dict(env or job_env(), TMPDIR=str(self.tmp_dir))
        self._out = open(self.out_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            self.proc.wait()
            raise
        finally:
            self.kill_all()  # ranks left behind by a failing launcher
            self._out.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    @property
    def output(self) -> str:
        return self.out_path.read_text()


def run_job(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 180) -> tuple[int, str]:
    job = Job(cmd, cwd=cwd, env=env)
    rc = job.finish(timeout)
    return rc, job.output


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_json_line(path: Path) -> dict:
    return json.loads(path.read_text().strip().splitlines()[-1])


def need_netns() -> None:
    """Skip a test that needs emulated hosts (root, iproute2) where they cannot be made; in CI,
    which runs as root so that they are tested, fail it instead."""
    import pytest

    from ringwatch.cluster._netns import netns_unavailable_reason

    why = netns_unavailable_reason()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI runs as root so that emulated hosts are tested: {why}")
    pytest.skip(f"emulated hosts need root: {why}")

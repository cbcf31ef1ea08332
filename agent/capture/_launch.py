"""``ringwatch run -- CMD``: launch any command with the agent attached to its Python processes.

The command runs with ringwatch's ``sitecustomize`` shim first on ``PYTHONPATH`` and
``RINGWATCH_AUTOATTACH=1``: every Python process it starts (``torchrun`` and the ranks it
spawns) attaches the agent when it imports torch; recording starts when the process group is
initialised. The launcher itself imports neither torch nor polars.

Signals: SIGTERM and SIGHUP sent to the launcher are forwarded to the command (so its ranks
flush their logs); SIGINT from a terminal already reaches the whole foreground process group,
so the launcher ignores it and waits for the command to finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ringwatch._config import ENV_AUTOATTACH, CaptureConfig

SHIM_DIR = Path(__file__).resolve().parent / "_shim"


def _package_root() -> Path:
    """The folder to put on the children's path so that ``import ringwatch`` works there."""
    import ringwatch

    return Path(ringwatch.__file__).resolve().parent.parent


def child_env(config: CaptureConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which a command's Python processes attach the agent."""
    env = dict(os.environ if base is None else base)
    env.update(config.to_env())
    env[ENV_AUTOATTACH] = "1"
    parts = [str(SHIM_DIR)]
    try:  # an editable or source checkout is not necessarily importable from the child's cwd
        import importlib.util

        spec = importlib.util.find_spec("ringwatch")
        if spec is not None and spec.origin and "site-packages" not in spec.origin:
            parts.append(str(_package_root()))
    except (ImportError, ValueError):
        pass
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(parts + ([old] if old else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :func:`run_command` saw.

    Attributes:
        returncode: The command's exit status (128 + N when killed by signal N).
        started_wall_s: Wall time at launch (seconds since the epoch).
        log_dir: Where the ranks wrote.
    """

    returncode: int
    started_wall_s: float
    log_dir: Path


def run_command(cmd: list[str], config: CaptureConfig, *, cwd: str | None = None,
                env: dict[str, str] | None = None) -> RunResult:
    """Run ``cmd`` with the agent attached; return when it exits.

    Args:
        cmd: The command and its arguments.
        config: Capture settings, passed to the children through the environment.
        cwd: Working folder of the command.
        env: Base environment (default: this process's).

    Raises:
        FileNotFoundError: the command does not exist.
    """
    started = time.time()
    proc = subprocess.Popen(cmd, env=child_env(config, env), cwd=cwd)

    def forward(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, forward)
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if rc < 0:
        rc = 128 - rc
    log_dir = Path(config.log_dir)
    return RunResult(rc, started, log_dir if log_dir.is_absolute() else Path(cwd or ".") / log_dir)


def jobs_since(log_dir: Path, started_wall_s: float) -> list[str]:
    """Job ids under ``log_dir`` with files written after ``started_wall_s``."""
    from ringwatch._logs import list_jobs, rank_dirs

    out = []
    for job in list_jobs(log_dir):
        dirs = rank_dirs(log_dir / job).values()
        if any(f.stat().st_mtime >= started_wall_s - 1 for d in dirs for f in d.iterdir()):
            out.append(job)
    return out

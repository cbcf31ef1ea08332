"""Finding and ending the processes of a cluster run.

Each launcher is started in its own session, with ``RINGWATCH_CLUSTER=<run id>`` in its
environment, which every rank inherits. Ending a run signals whatever carries its mark, found
by reading ``/proc/*/environ``: that reaches ranks however they were re-parented or
re-sessioned, and also the processes of a run whose owner died.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ringwatch.cluster._owner import ENV_MARK

_PROC = Path("/proc")


def marked_pids(run_id: str | None = None) -> dict[int, str]:
    """Live processes that carry a cluster mark: ``{pid: run id}`` (only ``run_id``'s if given)."""
    key = f"{ENV_MARK}=".encode()
    want = None if run_id is None else key + run_id.encode()
    out: dict[int, str] = {}
    for d in _PROC.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for item in env.split(b"\0"):
            if item.startswith(key) and (want is None or item == want):
                if is_running(int(d.name)):
                    out[int(d.name)] = item[len(key):].decode(errors="replace")
                break
    return out


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_processes(pids, *, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> list[int]:
    """Signal ``pids`` (after SIGCONT, so stopped ones can act), then SIGKILL what is left after
    ``grace_s``. Returns the pids that were still running when SIGKILL was needed."""
    pids = [p for p in pids if is_running(p)]
    if not pids:
        return []
    _signal(pids, signal.SIGCONT)
    _signal(pids, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids = [p for p in pids if is_running(p)]
        if not pids:
            return []
        time.sleep(0.05)
    _signal(pids, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.05)
    return pids

"""Each job's online-window state on disk: its baselines and open straggler episodes.

The baselines of a job's first steps (each rank's usual delay, the noise, each group's usual
bandwidth, structural imbalance) are what a straggler is measured against. Held only in
memory, they would be re-taken after a restart of the service from whatever steps come next,
which mid-fault are the fault: the straggler would become "structural imbalance". So each job's
:meth:`~ringwatch.analyzers.OnlineWindow.state` is written beside the findings, one small JSON
file per job (``windows/<sha256 of the job id>.json``, the id inside), when it changes, and read
back when the job's window is reopened. A file that cannot be read is renamed
``<name>.corrupt-<ns>`` and the window starts afresh, as it did before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("ringwatch.service")

FOLDER = "windows"
MAX_BYTES = 64 * 2**20  # a state of 10,000 ranks is ~1 MB


class WindowStates:
    """Saved window states under ``state_dir`` (``None``: nothing saved, nothing loaded)."""

    def __init__(self, state_dir: str | Path | None):
        self.folder = None if state_dir is None else Path(state_dir) / FOLDER
        self._saved: dict[str, object] = {}  # job -> key of the state last written
        self.errors = 0

    def _path(self, job: str) -> Path:
        return self.folder / f"{hashlib.sha256(job.encode()).hexdigest()}.json"

    def load(self, job: str, window) -> bool:
        """Restore ``window`` from the job's saved state; whether one was taken."""
        if self.folder is None:
            return False
        path = self._path(job)
        try:
            if path.stat().st_size > MAX_BYTES:
                raise ValueError(f"{path.stat().st_size} bytes")
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("job") != job:
                raise ValueError("not this job's state")
            window.restore(doc["state"])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            log.warning("window state of job %s unreadable (%s): starting afresh", job, exc)
            try:
                os.replace(path, path.with_name(f"{path.name}.corrupt-{time.time_ns()}"))
            except OSError:
                pass
            return False
        self._saved[job] = _key(window)
        return True

    def save(self, job: str, window) -> None:
        """Write the job's state when it changed since the last write (atomic)."""
        if self.folder is None:
            return
        key = _key(window)
        if self._saved.get(job) == key:
            return
        path = self._path(job)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"job": job, "state": window.state()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self.errors += 1
            log.warning("could not save the window state of job %s: %s", job, exc)
            return
        self._saved[job] = key

    def forget(self, job: str) -> None:
        """Remove a job's saved state (an evicted job)."""
        self._saved.pop(job, None)
        if self.folder is not None:
            try:
                self._path(job).unlink()
            except OSError:
                pass


def _key(window) -> tuple:
    """What changes when the state worth saving does: the baseline's freeze, the episodes,
    every ``keep_steps`` steps the usual's drift (a restart loses at most that much of it,
    besides the window's own steps), and with a pipeline each new step of its step and
    blocked times (the window judges them, and the onset of a straggler not yet shown lies
    in them)."""
    drift = getattr(window, "drift_step", None)
    work = getattr(window, "work", None)
    newest = None if work is None or work.is_empty() or not getattr(window, "pipeline", 0) \
        else work["step"].max()
    return (window.baseline_until, window.first_step,
            None if drift is None else drift // max(1, window.keep_steps),
            tuple(sorted((r, e[0], e[1]) for r, e in window.episodes.items())), newest)

"""Who owns what a cluster run creates, so that a later run can clean up after a crashed one.

Every run gets an id ``rw`` + the owner's pid (7 hex digits) + a counter digit, used as the
prefix of its namespaces and links and as the value of ``RINGWATCH_CLUSTER`` in the environment
of every process it starts. The owner holds an ``flock`` on ``<tmp>/ringwatch-cluster/<id>.lock``
for the run's lifetime; whatever carries an id whose lock nobody holds is left over from a run
that died, and :func:`ringwatch.cluster.sweep` removes it.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import tempfile
from pathlib import Path

ENV_MARK = "RINGWATCH_CLUSTER"
ID_RE = re.compile(r"^(rw[0-9a-f]{7}[0-9a-f])")
_counter = itertools.count()


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "ringwatch-cluster"


class RunLock:
    """The owner's claim on a run id (an exclusive flock held until :meth:`release`)."""

    def __init__(self) -> None:
        d = lock_dir()
        d.mkdir(parents=True, exist_ok=True)
        while True:
            self.id = f"rw{os.getpid() & 0xFFFFFFF:07x}{next(_counter) % 16:x}"
            self.path = d / f"{self.id}.lock"
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # this id is in use by another run of this process
                os.close(fd)
                continue
            self._fd = fd
            break

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def is_alive(run_id: str) -> bool:
    """Whether some process still holds the lock of ``run_id``."""
    path = lock_dir() / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def forget(run_id: str) -> None:
    """Remove the lock file of a dead run."""
    (lock_dir() / f"{run_id}.lock").unlink(missing_ok=True)


def lock_ids() -> set[str]:
    d = lock_dir()
    if not d.is_dir():
        return set()
    return {m.group(1) for p in d.glob("rw*.lock") if (m := ID_RE.match(p.stem))}

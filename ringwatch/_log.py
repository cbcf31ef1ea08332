"""Internal logging: one line per cause, never an exception.

Telemetry must not break the job, and it must not flood the job's stderr either: each distinct
cause is reported once per process, then counted silently.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

logger = logging.getLogger("ringwatch")
_lock = threading.Lock()
_seen: Counter[str] = Counter()


def warn_once(cause: str, message: str) -> None:
    """Log ``message`` at WARNING the first time ``cause`` is seen; count repeats."""
    try:
        with _lock:
            _seen[cause] += 1
            first = _seen[cause] == 1
        if first:
            if not logger.handlers and not logging.getLogger().handlers:
                # A job that never configured logging still gets the line on stderr.
                h = logging.StreamHandler()
                h.setFormatter(logging.Formatter("[ringwatch] %(message)s"))
                logger.addHandler(h)
                logger.propagate = False
            logger.warning(message)
    except Exception:  # noqa: BLE001, S110 - logging must never raise into the caller
        pass


def error_counts() -> dict[str, int]:
    """How many times each cause was seen (for the rank's meta file)."""
    with _lock:
        return dict(_seen)

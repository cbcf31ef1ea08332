"""ringwatch: find the rank, host or link that breaks the rhythm of a distributed job.

One-line use in a training script::

    import ringwatch
    ringwatch.attach()          # every collective of this rank, logged to ./ringwatch-logs

Zero-code use: ``ringwatch run -- torchrun --nproc-per-node 8 train.py``.

Importing ``ringwatch`` imports neither torch nor polars; each name loads what it needs.
"""

from __future__ import annotations

from ringwatch._config import CaptureConfig, ConfigError
from ringwatch._schema import COLUMNS, OPS, SCHEMA_VERSION, STATUSES, format_ranks, parse_ranks
from ringwatch._version import __version__
from ringwatch.agent import attach, attach_communicator, detach, mark_step


def read_events(log_dir, job_id: str | None = None, *, include_pending: bool = True):
    """All ranks' events under ``log_dir`` as one polars DataFrame; see :mod:`ringwatch._logs`."""
    from ringwatch._logs import read_events as _read

    return _read(log_dir, job_id, include_pending=include_pending)


__all__ = [
    "COLUMNS", "OPS", "SCHEMA_VERSION", "STATUSES", "CaptureConfig", "ConfigError",
    "__version__", "attach", "attach_communicator", "detach", "format_ranks", "mark_step",
    "parse_ranks",
    "read_events",
]

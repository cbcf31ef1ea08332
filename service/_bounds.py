"""What one value of an agent push may be, for the service to take it (``Jobs.ingest``).

Every bound is a plain constant with its reason. A value that fails its check is ``None``
here; the caller drops the data point (or the whole rank resource, for its job id, rank or
host) and counts it as rejected.
"""

from __future__ import annotations

import math

#: Job ids, host names, group and op names: the service's label values (Prometheus labels,
#: JSON keys, Parquet cells), so no label can cost more than this.
MAX_LABEL_CHARS = 256
#: A group's members in compact form ("0-7,16-23"): a strided group of thousands of ranks.
MAX_MEMBERS_CHARS = 16_384
#: Ranks, group sizes and ranks within a group are in 0..MAX_RANK-1 (a million ranks).
MAX_RANK = 1 << 20
#: Distinct ranks one job may have (6x the 10,000 GPUs ringwatch is built for).
MAX_RANKS_PER_JOB = 1 << 16
#: Steps are in 0..MAX_STEP-1: the analysis numbers a row step x 1024 + group, in an int64.
MAX_STEP = 1 << 43
#: Distinct groups of one job: the group part of that numbering.
MAX_GROUPS_PER_JOB = 1024
#: Send/recv peers kept per rank: a pipeline stage has two (more is no pipeline to infer).
MAX_P2P_PEERS = 64
#: Sequence numbers: integers a double holds exactly, well inside an int64.
MAX_SEQ = 1 << 53
#: Bytes and collective counts: the same.
MAX_COUNT = float(1 << 53)
#: Wall times, s since the epoch: times 1e9 they must fit an int64 of ns (up to 2242).
MAX_WALL_S = float(1 << 33)
#: Durations and ages, s: 11.6 days, far beyond any step or pending collective that matters.
MAX_DURATION_S = 1e6


def as_int(value, limit: int) -> int | None:
    """An integer in ``0..limit-1`` from an attribute value (int, integral double, or decimal
    text), else None; a bool is not an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            return None
        n = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            return None
        n = int(text)
    else:
        return None
    return n if 0 <= n < limit else None


def as_label(value, limit: int = MAX_LABEL_CHARS, *, empty_ok: bool = False) -> str | None:
    """A label of at most ``limit`` characters (an int attribute is taken as its text),
    else None; the empty text only with ``empty_ok``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or len(value) > limit or not (value or empty_ok):
        return None
    return value


def as_amount(value: float, limit: float, *, integral: bool = False) -> float | None:
    """A finite number in ``0..limit`` (a whole one with ``integral``), else None."""
    if not (math.isfinite(value) and 0 <= value <= limit):
        return None
    if integral and not float(value).is_integer():
        return None
    return value

"""The findings store's records (:class:`TrackedFinding`, :class:`Change`) and their Parquet
files: the flat row schema, atomic writes, tolerant loads.

Two files under the store's folder: ``findings.parquet`` (one row per tracked finding) and
``history.parquet`` (one row per change: ``what``, ``at_ns`` and the tracked finding as it was
then). Both share the tracking and :class:`~ringwatch.analyzers._findings.Finding` columns below.
A file that cannot be read is renamed ``<name>.corrupt-<ns>`` and treated as empty: the
service never fails to start because of its own state files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from ringwatch.analyzers._findings import Finding

log = logging.getLogger("ringwatch.service")
T = TypeVar("T")

STATES = ("open", "resolved")
WHATS = ("opened", "updated", "resolved")

FINDINGS_FILE = "findings.parquet"
HISTORY_FILE = "history.parquet"

#: Tracking columns (one tracked finding), then the flattened Finding.
TRACKING_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Utf8(), "job": pl.Utf8(), "state": pl.Utf8(), "opened_ns": pl.Int64(),
    "last_seen_ns": pl.Int64(), "resolved_ns": pl.Int64(), "updates": pl.Int64(),
}
FINDING_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.Utf8(), "cls": pl.Utf8(), "ranks": pl.List(pl.Int64()),
    "hosts": pl.List(pl.Utf8()), "local_ranks": pl.List(pl.Int64()), "pg": pl.Utf8(),
    "seq": pl.Int64(), "confidence": pl.Float64(), "since_ns": pl.Int64(),
    "since_step": pl.Int64(), "evidence": pl.List(pl.Utf8()), "gain_s_per_step": pl.Float64(),
    "detected_step": pl.Int64(), "until_step": pl.Int64(), "detected_ns": pl.Int64(),
}
FINDINGS_SCHEMA = {**TRACKING_SCHEMA, **FINDING_SCHEMA}
HISTORY_SCHEMA = {"what": pl.Utf8(), "at_ns": pl.Int64(), **FINDINGS_SCHEMA}


def finding_columns(f: Finding) -> dict[str, Any]:
    """``f`` as one flat row (lists for the tuples)."""
    return {
        "kind": f.kind, "cls": f.cls, "ranks": list(f.ranks), "hosts": list(f.hosts),
        "local_ranks": list(f.local_ranks), "pg": f.pg, "seq": f.seq,
        "confidence": f.confidence, "since_ns": f.since_ns, "since_step": f.since_step,
        "evidence": list(f.evidence), "gain_s_per_step": f.gain_s_per_step,
        "detected_step": f.detected_step, "until_step": f.until_step,
        "detected_ns": f.detected_ns,
    }


def finding_from_row(row: dict[str, Any]) -> Finding:
    """The Finding of a row written by :func:`finding_columns`.

    Raises:
        ValueError: the row does not hold a valid Finding (a bad kind or confidence).
    """
    d = {k: row[k] for k in FINDING_SCHEMA}
    for k in ("ranks", "hosts", "local_ranks", "evidence"):
        d[k] = tuple(d[k] or ())
    if d["pg"] is not None:
        d["pg"] = str(d["pg"])
    return Finding(**d)


@dataclass(frozen=True)
class TrackedFinding:
    """One occurrence of a finding, from when it opened to when it resolved.

    Attributes:
        id: Stable id, ``<job>:<kind>:<run>-<n>``: ``<run>`` the store's start (s, base 36),
            ``n`` counting up within the store and across its restarts.
        job: The job it belongs to.
        state: ``open`` or ``resolved``.
        opened_ns: Wall clock (ns) when it was first reported.
        last_seen_ns: Wall clock (ns) of the latest round that reported it.
        resolved_ns: Wall clock (ns) when it was resolved, ``None`` while open.
        updates: How many reports changed it (re-reports with the same Finding do not count).
        finding: The latest reported Finding.
    """

    id: str
    job: str
    state: str
    opened_ns: int
    last_seen_ns: int
    resolved_ns: int | None
    updates: int
    finding: Finding

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the tracking fields and ``finding`` as its ``to_dict()``."""
        return {"id": self.id, "job": self.job, "state": self.state,
                "opened_ns": self.opened_ns, "last_seen_ns": self.last_seen_ns,
                "resolved_ns": self.resolved_ns, "updates": self.updates,
                "finding": self.finding.to_dict()}

    def to_row(self) -> dict[str, Any]:
        d = self.to_dict()
        del d["finding"]
        return {**d, **finding_columns(self.finding)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrackedFinding:
        """Raises: ValueError: the row is not a tracked finding."""
        if row["state"] not in STATES or not row["id"] or row["job"] is None \
                or row["opened_ns"] is None or row["last_seen_ns"] is None:
            raise ValueError(f"not a tracked finding: id={row['id']!r} state={row['state']!r}")
        return cls(id=row["id"], job=row["job"], state=row["state"],
                   opened_ns=row["opened_ns"], last_seen_ns=row["last_seen_ns"],
                   resolved_ns=row["resolved_ns"], updates=row["updates"] or 0,
                   finding=finding_from_row(row))


@dataclass(frozen=True)
class Change:
    """One step of a finding's lifecycle: ``what`` happened to ``tracked`` at ``at_ns``.

    Attributes:
        what: ``opened``, ``updated`` or ``resolved``.
        tracked: The tracked finding as it was right after the change.
        at_ns: Wall clock (ns) of the change.
    """

    what: str
    tracked: TrackedFinding
    at_ns: int

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "at_ns": self.at_ns, "tracked": self.tracked.to_dict()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Change:
        """Raises: ValueError: the row is not a change."""
        if row["what"] not in WHATS or row["at_ns"] is None:
            raise ValueError(f"not a change: what={row['what']!r}")
        return cls(what=row["what"], tracked=TrackedFinding.from_row(row), at_ns=row["at_ns"])


def write_atomic(path: Path, rows: list[dict[str, Any]], schema: dict[str, pl.DataType]) -> None:
    """Write ``rows`` to ``path`` as Parquet: a temp file, fsync, then ``os.replace``.

    Raises:
        OSError: the folder is not writable (the old file is left as it was).
    """
    columns = {c: [r[c] for r in rows] for c in schema}
    df = pl.DataFrame(columns, schema=schema)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            df.write_parquet(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path, schema: dict[str, pl.DataType], convert: Callable[[dict[str, Any]], T],
         now_ns: int) -> list[T]:
    """The rows of ``path`` (none when it does not exist), each passed through ``convert``.

    A file that cannot be read, lacks a column of ``schema`` or holds a row ``convert``
    rejects (any exception) is renamed ``<name>.corrupt-<now_ns>`` with one warning, and
    nothing is returned from it.
    """
    if not path.exists():
        return []
    try:
        df = pl.read_parquet(path, columns=list(schema)).cast(schema)  # type: ignore[arg-type]
        return [convert(row) for row in df.iter_rows(named=True)]
    except Exception as e:  # noqa: BLE001 - any unreadable file is set aside, never fatal
        set_aside(path, now_ns, e)
        return []


def set_aside(path: Path, now_ns: int, why: BaseException) -> None:
    """Rename a bad state file to ``<name>.corrupt-<now_ns>`` and log one warning."""
    bad = path.with_name(f"{path.name}.corrupt-{now_ns}")
    try:
        os.replace(path, bad)
        where = f"kept as {bad.name}"
    except OSError as e:
        where = f"could not be renamed ({e})"
    log.warning("ringwatch store: %s is unreadable (%s: %s); starting without it, %s",
                path, type(why).__name__, why, where)

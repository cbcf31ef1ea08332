"""Read the per-rank logs the agent writes (layout: :mod:`ringwatch.agent._writer`).

A job's folder is ``LOG_DIR/<job_id>/`` with one ``rank-<RANK>/`` folder per rank. Each rank's
rows come from its segments (the widest non-overlapping ranges, so a crash during compaction
never duplicates rows) plus, optionally, the rows of ``pending.parquet`` that no segment holds
(collectives still in flight at the rank's last flush: what a hung or killed rank waited for).

Unreadable files (a disk that filled up, a foreign file) are skipped and reported in
:attr:`JobLogs.problems`; they never stop the others from being read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch._schema import SCHEMA_VERSION, polars_schema

SEGMENT_RE = re.compile(r"^seg-(\d{8})(?:-(\d{8}))?\.parquet$")
RANK_DIR_RE = re.compile(r"^rank-(\d+)$")
PENDING_FILE = "pending.parquet"
META_FILE = "meta.json"
FR_FILE = "flight_recorder.json"


class LogError(ValueError):
    """No readable ringwatch log where one was expected."""


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def select_segments(names: list[str]) -> list[str]:
    """The segment files to read among ``names``: widest ranges first, none overlapping.

    ``seg-00000001-00000032.parquet`` covers segments 1..32; if a crash left both it and some
    of ``seg-000000NN.parquet`` behind, only the range file is read.
    """
    ranges = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            a = int(m.group(1))
            b = int(m.group(2) or a)
            ranges.append((b - a, a, b, name))
    ranges.sort(key=lambda r: (-r[0], r[1]))
    taken: list[tuple[int, int]] = []
    out = []
    for _, a, b, name in ranges:
        if any(not (b < x or a > y) for x, y in taken):
            continue
        taken.append((a, b))
        out.append((a, name))
    return [name for _, name in sorted(out)]


def rank_dirs(job_dir: Path) -> dict[int, Path]:
    """``rank -> folder`` of one job's folder."""
    out = {}
    for p in Path(job_dir).iterdir():
        m = RANK_DIR_RE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def list_jobs(log_dir: str | Path) -> list[str]:
    """Job ids under ``log_dir``, oldest first (by the newest file of each job)."""
    root = Path(log_dir)
    if not root.is_dir():
        return []
    jobs = []
    for p in root.iterdir():
        if p.is_dir() and rank_dirs(p):
            newest = max((f.stat().st_mtime for d in rank_dirs(p).values()
                          for f in d.iterdir()), default=p.stat().st_mtime)
            jobs.append((newest, p.name))
    return [name for _, name in sorted(jobs)]


@dataclass
class JobLogs:
    """One job's logs on disk.

    Attributes:
        path: The job's folder.
        job_id: Its id.
        ranks: ``rank -> folder``.
        problems: One line per file that could not be read.
    """

    path: Path
    job_id: str
    ranks: dict[int, Path]
    problems: list[str] = field(default_factory=list)

    def _problem(self, line: str) -> None:
        if line not in self.problems:  # each read of the same bad file reports it once
            self.problems.append(line)

    def _read(self, path: Path):
        import polars as pl

        try:
            meta = pl.read_parquet_metadata(path)
            version = meta.get("ringwatch_schema_version")
            if version is None or _major(version) != _major(SCHEMA_VERSION):
                self._problem(f"{path}: schema version {version!r}, this reader "
                                     f"understands {SCHEMA_VERSION}")
                return None
            df = pl.read_parquet(path)
            return df.select([pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c)
                              for c, t in polars_schema().items()])
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            self._problem(f"{path}: unreadable ({type(exc).__name__}: {exc})")
            return None

    def rank_events(self, rank: int, *, include_pending: bool = True):
        """One rank's rows, by ``idx``."""
        import polars as pl

        d = self.ranks[rank]
        frames = [f for name in select_segments([p.name for p in d.iterdir()])
                  if (f := self._read(d / name)) is not None]
        if include_pending and (d / PENDING_FILE).exists():
            pend = self._read(d / PENDING_FILE)
            if pend is not None:
                seen = pl.concat([f.select("idx") for f in frames]) if frames else None
                if seen is not None:
                    pend = pend.join(seen, on="idx", how="anti")
                frames.append(pend)
        if not frames:
            return pl.DataFrame(schema=polars_schema())
        return pl.concat(frames, how="vertical").unique("idx", keep="first").sort("idx")

    def events(self, *, include_pending: bool = True):
        """All ranks' rows, by (rank, idx)."""
        import polars as pl

        frames = [self.rank_events(r, include_pending=include_pending) for r in self.ranks]
        if not frames:
            return pl.DataFrame(schema=polars_schema())
        return pl.concat(frames, how="vertical").sort("rank", "idx")

    def meta(self) -> dict[int, dict]:
        """``rank -> meta.json`` content (ranks whose meta is missing or bad are left out)."""
        out = {}
        for rank, d in self.ranks.items():
            path = d / META_FILE
            try:
                out[rank] = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                self._problem(f"{path}: unreadable ({exc})")
        return out

    def last_write_ns(self) -> dict[int, int]:
        """``rank -> wall clock (ns) of its agent's newest flush``: a heartbeat. The writer
        rewrites ``meta.json`` with the time (``written_ns``) at every flush while the process
        runs; for logs without it, the newest file's modification time (which a copy resets)."""
        out = {}
        for rank, m in self.meta().items():
            if isinstance(m.get("written_ns"), int):
                out[rank] = m["written_ns"]
        for rank, d in self.ranks.items():
            if rank in out:
                continue
            try:
                times = [p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()]
            except OSError as exc:
                self._problem(f"{d}: unreadable ({exc})")
                continue
            if times:
                out[rank] = max(times)
        return out

    def flight_recorder(self, rank: int) -> dict | None:
        """The Flight Recorder copy a rank saved at exit, or None."""
        from ringwatch._flight_recorder import load_dump

        path = self.ranks[rank] / FR_FILE
        if not path.exists():
            return None
        try:
            return load_dump(path)
        except (OSError, ValueError) as exc:
            self._problem(f"{path}: unreadable ({exc})")
            return None


def open_job(log_dir: str | Path, job_id: str | None = None) -> JobLogs:
    """Find one job's logs.

    Args:
        log_dir: The root given to the agent, or a job's folder itself.
        job_id: Which job; None means the only one, or else the most recently written.

    Raises:
        LogError: nothing readable there, or no such job.
    """
    root = Path(log_dir)
    if not root.is_dir():
        raise LogError(f"{root}: no such directory")
    if job_id is None and rank_dirs(root):
        return JobLogs(root, root.name, rank_dirs(root))
    if job_id is None:
        jobs = list_jobs(root)
        if not jobs:
            raise LogError(f"{root}: no ringwatch logs (expected <job_id>/rank-NNNNN/ folders)")
        job_id = jobs[-1]
    path = root / job_id
    ranks = rank_dirs(path) if path.is_dir() else {}
    if not ranks:
        raise LogError(f"{root}: no logs of job {job_id!r}")
    return JobLogs(path, job_id, ranks)


def read_events(log_dir: str | Path, job_id: str | None = None, *,
                include_pending: bool = True):
    """All ranks' events of one job as one polars DataFrame (columns: ``ringwatch.COLUMNS``).

    Args:
        log_dir: The agent's log root, or one job's folder.
        job_id: Which job; None means the most recently written one.
        include_pending: Add the collectives still in flight at each rank's last flush.

    Raises:
        LogError: no readable log there.
    """
    return open_job(log_dir, job_id).events(include_pending=include_pending)


__all__ = ["JobLogs", "LogError", "list_jobs", "open_job", "rank_dirs", "read_events",
           "select_segments"]

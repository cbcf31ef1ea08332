"""Per-rank Parquet segments, written atomically off the hot path.

Layout of one rank's folder ``LOG_DIR/<job_id>/rank-<RANK:05d>/``:

* ``seg-<first:08d>.parquet``: finished events, one file per flush; every
  ``compact_segments`` of them are merged into ``seg-<first:08d>-<last:08d>.parquet``. A reader
  takes the widest ranges and ignores the segments they cover, so a crash between writing a
  merged file and deleting its parts never duplicates rows.
* ``pending.parquet``: the events still in flight at the last flush (what a hung rank was
  waiting for); replaced at each flush, removed when nothing is pending.
* ``meta.json``: identity, versions, groups, counters.

Every file is written to a temporary name and renamed into place, so a rank killed at any
instant leaves only complete files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ringwatch._clock import Clock, SystemClock
from ringwatch._logs import FR_FILE, META_FILE, PENDING_FILE, SEGMENT_RE
from ringwatch._schema import COLUMN_NAMES, SCHEMA_VERSION, polars_schema
from ringwatch._version import __version__
from ringwatch.agent.capture._recorder import Event, RankIdentity

__all__ = ["FR_FILE", "SegmentWriter", "events_to_columns", "rank_dir"]


def rank_dir(log_dir: Path, job_id: str, rank: int) -> Path:
    """Folder of one rank's log."""
    return Path(log_dir) / job_id / f"rank-{rank:05d}"


def events_to_columns(events: Iterable[Event], ident: RankIdentity,
                      wall_minus_mono: int) -> dict[str, list]:
    """Turn events into schema columns; wall time = monotonic + ``wall_minus_mono``."""
    cols: dict[str, list] = {name: [] for name in COLUMN_NAMES}
    for e in events:
        g = e.group
        start = e.mono_start
        if e.wall_issue is not None:
            t_issue = e.wall_issue
        else:
            unknown = start is None and e.mono_issue == 0
            t_issue = None if unknown else e.mono_issue + wall_minus_mono
        t_start = None if start is None else start + wall_minus_mono
        t_end = None if e.mono_end is None else e.mono_end + wall_minus_mono
        nin, nout = e.nbytes_in, e.nbytes_out
        row = (
            ident.job_id, ident.rank, ident.local_rank, ident.world_size, ident.host, ident.pid,
            e.idx, g.backend, g.name, g.desc, g.ranks_spec, g.size, g.group_rank, e.seq, e.op,
            e.is_p2p, e.peer, e.root, e.dtype, e.numel, nin, nout,
            None if nin is None and nout is None else max(nin or 0, nout or 0),
            e.async_op, e.api, e.status, e.error, t_issue, t_start, t_end, start, e.mono_end,
            None if (start is None or e.mono_end is None) else e.mono_end - start,
            e.device_ns, e.end_source, e.step,
        )
        for name, value in zip(COLUMN_NAMES, row, strict=True):
            cols[name].append(value)
    return cols


def _write_atomic(df, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.write_parquet(tmp, compression="zstd", statistics=True,
                     metadata={"ringwatch_schema_version": SCHEMA_VERSION})
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SegmentWriter:
    """Writes one rank's segments. Not thread-safe: one writer thread owns it.

    Args:
        directory: The rank's folder (created on first write).
        identity: Constant columns.
        compact_segments: Merge this many single segments into one file.
        clock: Source of the (wall, monotonic) anchor taken at each write.
    """

    def __init__(self, directory: Path, identity: RankIdentity, *, compact_segments: int = 32,
                 clock: Clock | None = None):
        self.dir = Path(directory)
        self.identity = identity
        self.compact_segments = compact_segments
        self.clock = clock or SystemClock()
        self.next_seg = 1
        self.small: list[int] = []  # single segments not yet compacted
        self.rows_written = 0
        self._made = False

    def _ensure_dir(self) -> None:
        if not self._made:
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = [int(m.group(2) or m.group(1)) for p in self.dir.iterdir()
                        if (m := SEGMENT_RE.match(p.name))]
            self.next_seg = max(existing, default=0) + 1
            self._made = True

    def anchor(self) -> int:
        """``wall - monotonic`` now, in ns."""
        return self.clock.wall_ns() - self.clock.mono_ns()

    def frame(self, events: list[Event]):
        """A polars frame of ``events`` in schema order."""
        import polars as pl

        return pl.DataFrame(events_to_columns(events, self.identity, self.anchor()),
                            schema=polars_schema())

    def write(self, events: list[Event]) -> Path | None:
        """Write finished events as a new segment; compact when enough have accumulated."""
        if not events:
            return None
        self._ensure_dir()
        events = sorted(events, key=lambda e: e.idx)
        n = self.next_seg
        path = self.dir / f"seg-{n:08d}.parquet"
        _write_atomic(self.frame(events), path)
        self.next_seg += 1
        self.small.append(n)
        self.rows_written += len(events)
        if len(self.small) >= self.compact_segments:
            self.compact()
        return path

    def compact(self) -> Path | None:
        """Merge the single segments written so far into one range file."""
        import polars as pl

        if len(self.small) < 2:
            return None
        parts = [self.dir / f"seg-{n:08d}.parquet" for n in self.small]
        df = pl.concat([pl.read_parquet(p) for p in parts], how="vertical")
        out = self.dir / f"seg-{self.small[0]:08d}-{self.small[-1]:08d}.parquet"
        _write_atomic(df.sort("idx"), out)
        for p in parts:
            p.unlink(missing_ok=True)
        self.small = []
        return out

    def write_pending(self, events: list[Event]) -> None:
        """Replace the snapshot of in-flight events (remove it when there are none)."""
        path = self.dir / PENDING_FILE
        if not events:
            if self._made:
                path.unlink(missing_ok=True)
            return
        self._ensure_dir()
        _write_atomic(self.frame(events), path)

    def write_meta(self, meta: dict) -> None:
        """Replace the rank's meta file."""
        self._ensure_dir()
        base = {
            "schema_version": SCHEMA_VERSION,
            "ringwatch_version": __version__,
            "job_id": self.identity.job_id,
            "rank": self.identity.rank,
            "local_rank": self.identity.local_rank,
            "world_size": self.identity.world_size,
            "host": self.identity.host,
            "pid": self.identity.pid,
            "rows_written": self.rows_written,
            "wall_minus_mono_ns": self.anchor(),
        }
        base.update(meta)
        _write_text_atomic(json.dumps(base, indent=1, sort_keys=True, default=str),
                           self.dir / META_FILE)

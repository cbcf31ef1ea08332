"""Per-rank Parquet segments, written atomically off the hot path.

Layout of one rank's folder ``LOG_DIR/<job_id>/rank-<RANK:05d>/``:

* ``seg-<first:08d>.parquet``: finished events, one file per flush; every
  ``compact_segments`` of them are merged into ``seg-<first:08d>-<last:08d>.parquet``. A reader
  takes the widest ranges and ignores the segments they cover, so a crash between writing a
  merged file and deleting its parts never duplicates rows.
* ``pending.parquet``: the events still in flight at the last flush (what a hung rank was
  waiting for); replaced at each flush, removed when nothing is pending.
* ``meta.json``: identity, versions, groups, counters.
* ``.meta.reserve``: a few blocks held while the rank runs and given up for its final
  ``meta.json`` when the disk is full, so that the rank still says how its run ended.

Every file is written to a temporary name and renamed into place, so a rank killed at any
instant leaves only complete files; a failed write removes its temporary file. Whether a write
failed because the disk is full is told by :func:`disk_full`, whatever layer raised: an
ENOSPC/EDQUOT anywhere in the cause chain, or, where polars reports it only in its own words, a
folder with no space left (raised as :class:`DiskFullError`).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ringwatch._clock import Clock, SystemClock
from ringwatch._logs import (
    FR_FILE,
    META_FILE,
    PENDING_FILE,
    RESERVE_FILE,
    SEGMENT_RE,
    folder_full,
)
from ringwatch._schema import COLUMN_NAMES, SCHEMA_VERSION, polars_schema
from ringwatch._version import __version__
from ringwatch.agent.capture._recorder import Event, RankIdentity

__all__ = ["FR_FILE", "DiskFullError", "SegmentWriter", "disk_full", "events_to_columns",
           "rank_dir"]

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RESERVE_BYTES = 64 * 1024  # room for the final meta.json (about 1 KB + 200 B per group)


class DiskFullError(OSError):
    """A log write failed because the log folder's filesystem is full (or over quota)."""


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC or EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``: renamed onto it when the block succeeds, removed when
    it fails. A failure whose cause chain names no full disk, in a folder with no space left,
    is raised as :class:`DiskFullError`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        # Free space is read before the removal: the partial file's blocks count as used.
        full = not disk_full(exc) and folder_full(tmp.parent)
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
        raise
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


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
    with _replacing(path) as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=True,
                         metadata={"ringwatch_schema_version": SCHEMA_VERSION})


def _write_text_atomic(text: str, path: Path) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text)


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
        self._reserved = False
        self._pending = None  # the snapshot last written (a rank in a hang keeps it)

    def _ensure_dir(self) -> None:
        if not self._made:
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = [int(m.group(2) or m.group(1)) for p in self.dir.iterdir()
                        if (m := SEGMENT_RE.match(p.name))]
            self.next_seg = max(existing, default=0) + 1
            self._made = True
            self._reserve()

    def _reserve(self) -> None:
        """Hold :data:`RESERVE_BYTES` for the final meta (none if the disk is full already)."""
        path = self.dir / RESERVE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            self._reserved = True
        except (OSError, AttributeError):  # full, or no posix_fallocate here
            with suppress(OSError):
                path.unlink(missing_ok=True)

    def release_reserve(self) -> None:
        """Give the reserved blocks back (after the final meta, or to make room for it)."""
        if self._reserved:
            self._reserved = False
            with suppress(OSError):
                (self.dir / RESERVE_FILE).unlink(missing_ok=True)

    def anchor(self) -> int:
        """``wall - monotonic`` now, in ns."""
        return self.clock.wall_ns() - self.clock.mono_ns()

    def frame(self, events: list[Event], columns=None):
        """A polars frame of ``events`` and of the rows of frame ``columns`` (built in bulk
        by the native path, in schema order), sorted by ``idx``."""
        import polars as pl

        df = pl.DataFrame(events_to_columns(events, self.identity, self.anchor()),
                          schema=polars_schema())
        if columns is not None:
            df = pl.concat([df, columns]) if len(df) else columns
        return df.sort("idx") if len(df) > 1 else df

    def write(self, events: list[Event], columns=None) -> Path | None:
        """Write finished events (and bulk rows) as a new segment; compact when enough
        have accumulated."""
        if not events and columns is None:
            return None
        self._ensure_dir()
        n = self.next_seg
        path = self.dir / f"seg-{n:08d}.parquet"
        df = self.frame(events, columns)
        _write_atomic(df, path)
        self.next_seg += 1
        self.small.append(n)
        self.rows_written += len(df)
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

    def write_pending(self, events: list[Event], columns=None) -> None:
        """Replace the snapshot of in-flight events (remove it when there are none)."""
        path = self.dir / PENDING_FILE
        if not events and columns is None:
            if self._made:
                path.unlink(missing_ok=True)
            self._pending = None
            return
        self._ensure_dir()
        df = self.frame(events, columns)
        if self._pending is not None and df.equals(self._pending) and path.exists():
            return  # the same in flight as at the last flush (a hang): the file stands
        _write_atomic(df, path)
        self._pending = df

    def write_meta(self, meta: dict) -> None:
        """Replace the rank's meta file. The final one (``meta["final"]`` true) may use the
        reserve: on a full disk, the reserve is given up and the write tried once more."""
        final = meta.get("final") is True
        try:
            self._write_meta(meta)
        except Exception as exc:
            if not (final and self._reserved and disk_full(exc)):
                raise
            self.release_reserve()
            self._write_meta(meta)
        finally:
            if final:
                self.release_reserve()

    def write_flight_recorder(self, text: str) -> Path:
        """Save this process's Flight Recorder copy (JSON text) beside the log."""
        self._ensure_dir()
        path = self.dir / FR_FILE
        _write_text_atomic(text, path)
        return path

    def _write_meta(self, meta: dict) -> None:
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

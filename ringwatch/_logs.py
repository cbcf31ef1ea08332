"""Read the per-rank logs the agent writes (layout: :mod:`ringwatch.agent.capture._writer`).

A job's folder is ``LOG_DIR/<job_id>/`` with one ``rank-<RANK>/`` folder per rank. Each rank's
rows come from its segments (the widest non-overlapping ranges, so a crash during compaction
never duplicates rows) plus, optionally, the rows of ``pending.parquet`` that no segment holds
(collectives still in flight at the rank's last flush: what a hung or killed rank waited for).

Unreadable files (a disk that filled up, a foreign file) are skipped and reported in
:attr:`JobLogs.problems`; they never stop the others from being read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ringwatch._schema import SCHEMA_VERSION, polars_schema

SEGMENT_RE = re.compile(r"^seg-(\d{8})(?:-(\d{8}))?\.parquet$")
RANK_DIR_RE = re.compile(r"^rank-(\d+)$")
PENDING_FILE = "pending.parquet"
META_FILE = "meta.json"
FR_FILE = "flight_recorder.json"
RESERVE_FILE = ".meta.reserve"  # held while the rank runs, given up for its final meta.json
TMP_SUFFIX = ".tmp"  # a file being written; left behind only by a write cut short
FULL_BELOW_BYTES = 64 * 1024  # less free space than this: the filesystem is full


class LogError(ValueError):
    """No readable ringwatch log where one was expected."""


#: Files decoded by one read of :meth:`JobLogs.events`' fast path. Each read's rows are made
#: one chunk per column before the next read, so the file-sized chunks (thousands of small
#: pieces) are never all held at once; the reads' chunks are then joined into one per column
#: (analyzers run slower over many chunks, and some operations copy the whole frame to join
#: them).
FILES_PER_READ = 500
#: The columns are read in this many groups, each made one chunk per column before the next
#: (so the reads' chunks and their copies are never all held at once). 10M rows, 21 columns:
#: the read's peak 1.85, 1.93, 1.77 and 1.65 GiB in 1, 2, 3 and 4 groups; 6.1, 6.6, ~7.5 and
#: 8.7 s. Three: the analysis after it peaks higher than four's read.
COLUMN_GROUPS = 3


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def _increasing(df, *keys: str) -> bool:
    """Whether ``df``'s rows are in strictly increasing order of ``keys`` (no nulls)."""
    import polars as pl

    if df.select(pl.any_horizontal(pl.col(keys).is_null()).any()).item():
        return False
    ok = pl.lit(False)  # equal on every key: not strictly increasing
    for k in reversed(keys):
        prev = pl.col(k).shift(1)
        ok = (pl.col(k) > prev) | ((pl.col(k) == prev) & ok)
    return bool(df.select(ok.slice(1).all()).item())


def _one_chunk(columns: list):
    """A frame of ``columns`` (polars Series), each rechunked in turn and dropped from the
    list: a column's chunks are freed once it is copied, so memory grows by one column, not
    by the frame. The caller must hold no other reference to them."""
    import polars as pl

    out = []
    while columns:
        out.append(columns.pop(0).rechunk())
    return pl.DataFrame(out)


def _string_columns(columns) -> list[str]:
    import polars as pl

    schema = polars_schema()
    return [c for c in columns if schema.get(c) == pl.String]


def _as_categorical(df, categorical: bool):
    """``df`` with its string columns of the schema as ``pl.Categorical`` (when asked)."""
    import polars as pl

    if not categorical:
        return df
    return df.with_columns(pl.col(_string_columns(df.columns)).cast(pl.Categorical))


def folder_full(folder: str | Path) -> bool:
    """Whether the filesystem of ``folder`` has (almost) no space, or no inode, left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bavail * st.f_frsize < FULL_BELOW_BYTES
            or (st.f_files > 0 and st.f_favail == 0))


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


def _mtime(path: Path) -> float | None:
    """Modification time of ``path``, or None if it went away (a live writer's temporary)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def list_jobs(log_dir: str | Path) -> list[str]:
    """Job ids under ``log_dir``, oldest first (by the newest file of each job)."""
    root = Path(log_dir)
    if not root.is_dir():
        return []
    jobs = []
    for p in root.iterdir():
        if p.is_dir() and rank_dirs(p):
            times = [t for d in rank_dirs(p).values() for f in d.iterdir()
                     if (t := _mtime(f)) is not None]
            newest = max(times, default=p.stat().st_mtime)
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

    kind: ClassVar[str] = "ringwatch logs"
    path: Path
    job_id: str
    ranks: dict[int, Path]
    problems: list[str] = field(default_factory=list)
    #: Ranks whose ``meta.json`` is there but unreadable (their heartbeat is unknown).
    bad_meta: set[int] = field(default_factory=set)

    def _problem(self, line: str) -> None:
        if line not in self.problems:  # each read of the same bad file reports it once
            self.problems.append(line)

    def _read(self, path: Path, columns: tuple[str, ...] | None = None):
        import polars as pl

        schema = polars_schema()
        want = list(schema) if columns is None else [c for c in schema if c in columns]
        try:
            meta = pl.read_parquet_metadata(path)
            version = meta.get("ringwatch_schema_version")
            if version is None or _major(version) != _major(SCHEMA_VERSION):
                self._problem(f"{path}: schema version {version!r}, this reader "
                                     f"understands {SCHEMA_VERSION}")
                return None
            # glob=False: a job id may hold [, * or ?, which are not patterns here
            if columns is None:
                df = pl.read_parquet(path, glob=False)
            else:  # decode only those (an older file may lack some)
                have = pl.scan_parquet(path, glob=False).collect_schema()
                df = pl.read_parquet(path, columns=[c for c in want if c in have], glob=False)
            if list(df.schema.items()) == [(c, schema[c]) for c in want]:
                return df  # the schema's columns, types and order already
            return df.select([pl.col(c).cast(schema[c]) if c in df.columns
                              else pl.lit(None, schema[c]).alias(c) for c in want])
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            self._problem(f"{path}: unreadable ({type(exc).__name__}: {exc})")
            return None

    @staticmethod
    def _columns(columns) -> tuple[str, ...] | None:
        """The columns to read: ``columns`` plus the keys ``rank`` and ``idx``."""
        if columns is None:
            return None
        unknown = set(columns) - set(polars_schema())
        if unknown:
            raise ValueError(f"not columns of the schema: {sorted(unknown)}")
        return tuple(dict.fromkeys(("rank", "idx", *columns)))

    def rank_events(self, rank: int, *, include_pending: bool = True,
                    columns: list[str] | None = None):
        """One rank's rows, by ``idx``.

        Args:
            rank: The rank.
            include_pending: Add the collectives in flight at its last flush.
            columns: Read only these columns of the schema (and ``rank``, ``idx``), in the
                schema's order; None reads them all.

        Raises:
            ValueError: ``columns`` names a column the schema does not have.
        """
        import polars as pl

        cols = self._columns(columns)
        d = self.ranks[rank]
        frames = [f for name in select_segments([p.name for p in d.iterdir()])
                  if (f := self._read(d / name, cols)) is not None]
        if include_pending and (d / PENDING_FILE).exists():
            pend = self._read(d / PENDING_FILE, cols)
            if pend is not None:
                seen = pl.concat([f.select("idx") for f in frames]) if frames else None
                if seen is not None:
                    pend = pend.join(seen, on="idx", how="anti")
                frames.append(pend)
        if not frames:
            schema = polars_schema()
            return pl.DataFrame(schema={c: t for c, t in schema.items()
                                        if cols is None or c in cols})
        df = pl.concat(frames, how="vertical")
        if _increasing(df, "idx"):
            return df.rechunk()  # in order, no row twice: what unique + sort would give
        return df.unique("idx", keep="first").sort("idx")

    def events(self, *, include_pending: bool = True, columns: list[str] | None = None,
               categorical: bool = False, progress=None):
        """All ranks' rows, by (rank, idx).

        Args:
            include_pending: Add the collectives in flight at each rank's last flush.
            columns: Read only these columns of the schema (and ``rank``, ``idx``), in the
                schema's order; None reads them all. Fewer columns, less memory: a
                post-mortem pass over millions of rows reads what its analyzers use.
            categorical: The string columns (host, pg, op, ...) as ``pl.Categorical``, cast
                as they are read: a few hundred distinct values over millions of rows, 4
                bytes a cell instead of a string view, and cheaper to group and join on.
            progress: ``progress(done, total)`` as files (or ranks) are read.

        Raises:
            ValueError: ``columns`` names a column the schema does not have.
        """
        import polars as pl

        fast = self._read_all(include_pending, self._columns(columns), categorical, progress)
        if fast is not None:
            return fast
        frames = []
        for i, r in enumerate(self.ranks):
            if progress is not None:
                progress(i, len(self.ranks))
            frames.append(_as_categorical(self.rank_events(
                r, include_pending=include_pending, columns=columns), categorical))
        if not frames:
            cols = self._columns(columns)
            return _as_categorical(pl.DataFrame(schema={
                c: t for c, t in polars_schema().items() if cols is None or c in cols}),
                categorical)
        df = pl.concat(frames, how="vertical")
        del frames
        if _increasing(df, "rank", "idx"):
            # Ranks in order, each by idx: the sort would only have made it one chunk
            # (analyzers run 2-4x slower over a frame of thousands of chunks).
            columns = df.get_columns()
            del df
            return _one_chunk(columns)
        return df.sort("rank", "idx")

    def _read_all(self, include_pending: bool, cols: tuple[str, ...] | None,
                  categorical: bool = False, progress=None):
        """:meth:`events` in a few reads of many files, or None where it might differ.

        Reading file by file costs a few ms each, and a job of thousands of ranks has
        thousands of files. This reads them :data:`FILES_PER_READ` at a time (in rank
        order, each rank's segments then its pending rows) and keeps the result only where
        the per-rank path would give the very same rows: every file of this schema version
        and readable with the same columns, every row in its own rank's folder, and (rank,
        idx) strictly increasing (within each read and across them), so that no pending row
        repeats a segment's, no row is there twice and nothing needs sorting. Otherwise
        None: the per-rank path reads (and reports).
        """
        import polars as pl

        schema = polars_schema()
        want = [c for c in schema if cols is None or c in cols]
        files: list[str] = []
        owner: dict[str, int] = {}
        for rank, d in self.ranks.items():
            names = [p.name for p in d.iterdir()]
            chosen = select_segments(names)
            if include_pending and PENDING_FILE in names:
                chosen.append(PENDING_FILE)
            for name in chosen:
                files.append(str(d / name))
                owner[files[-1]] = rank
        if not files:
            return None
        try:
            for i, path in enumerate(files):
                if progress is not None and i % 64 == 0:
                    progress(i, len(files))
                version = pl.read_parquet_metadata(path).get("ringwatch_schema_version")
                if version is None or _major(version) != _major(SCHEMA_VERSION):
                    return None
            if progress is not None:
                progress(len(files), len(files))  # checked; decoding them
            # rank and idx (the checks) with the first group of columns, then the others
            rest = [c for c in want if c not in ("rank", "idx")]
            groups = [[c for c in want if c in ("rank", "idx") or c in rest[0::COLUMN_GROUPS]]]
            groups += [g for g in (rest[i::COLUMN_GROUPS] for i in range(1, COLUMN_GROUPS))
                       if g]
            columns: dict[str, object] = {}
            heights: list[int] = []
            for n, group in enumerate(groups):
                parts = []
                for i in range(0, len(files), FILES_PER_READ):
                    part = self._read_files(files[i:i + FILES_PER_READ], group, owner,
                                            categorical, check=n == 0)
                    if part is None:
                        return None
                    if n == 0:
                        if parts and not _increasing(
                                pl.concat([parts[-1].tail(1), part.head(1)]), "rank", "idx"):
                            return None
                        heights.append(part.height)
                    elif part.height != heights[len(parts)]:
                        return None
                    parts.append(part)
                got = pl.concat(parts, rechunk=False).get_columns()
                del parts, part
                columns.update((c.name, c) for c in _one_chunk(got).get_columns())
        except Exception:  # noqa: BLE001 - the per-rank path reads them one by one, reports
            return None
        return pl.DataFrame([columns[c] for c in want])

    @staticmethod
    def _read_files(files: list[str], want: list[str], owner: dict[str, int],
                    categorical: bool, *, check: bool = True):
        """The ``want`` columns of ``files`` in one read, one chunk per column, or None where
        :meth:`_read_all` must step aside (see there; ``check``: the rows' order and folders
        too, with ``rank`` and ``idx`` among ``want``)."""
        import polars as pl

        schema = polars_schema()
        path = ["_path"] if check else []
        scan = pl.scan_parquet(files, include_file_paths="_path" if check else None,
                               glob=False).select(*want, *path)
        # the file path of every row as a categorical: a few hundred MB less than string
        # views at ten million rows
        strings = (_string_columns(want) if categorical else []) + path
        if strings:
            scan = scan.with_columns(pl.col(*strings).cast(pl.Categorical))
        df = scan.collect()
        expect = _as_categorical(pl.DataFrame(schema={c: schema[c] for c in want}),
                                 categorical).schema
        if list(df.select(want).schema.items()) != list(expect.items()):
            return None
        if not check:
            return _one_chunk(df.get_columns())
        if not _increasing(df, "rank", "idx"):
            return None
        runs = df.select(pl.col("_path").rle()).unnest("_path")  # per file, in order: rows
        folders = [owner.get(path) for path in runs["value"]]
        if None in folders:
            return None
        folder = pl.DataFrame({"r": folders, "n": runs["len"]}, schema={
            "r": schema["rank"], "n": runs["len"].dtype}).select(
            pl.col("r").repeat_by("n").explode())["r"]
        if not (df["rank"] == folder).all():
            return None
        columns = df.drop("_path").get_columns()  # one chunk per file: make it one
        del df, folder
        return _one_chunk(columns)

    def meta(self) -> dict[int, dict]:
        """``rank -> meta.json`` content (ranks whose meta is missing or bad are left out)."""
        out = {}
        for rank, d in self.ranks.items():
            path = d / META_FILE
            try:
                meta = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                self._problem(f"{path}: unreadable ({exc})")
                self.bad_meta.add(rank)
                continue
            if not isinstance(meta, dict):
                self._problem(f"{path}: unreadable (a JSON {type(meta).__name__}, not an "
                              "object)")
                self.bad_meta.add(rank)
                continue
            out[rank] = meta
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
            if rank in out or rank in self.bad_meta:
                continue  # a damaged meta.json says nothing of when the rank last wrote
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


__all__ = ["JobLogs", "LogError", "folder_full", "list_jobs", "open_job", "rank_dirs",
           "read_events", "select_segments"]

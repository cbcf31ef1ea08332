"""What ``ringwatch analyze PATH...`` reads: ringwatch's own logs and what other tools left.

Each kind of input is a *reader* (:class:`Reader`): ``sniff`` says from a file's name and first
bytes whether the file is of its kind, ``open`` turns the files it claimed into a
:class:`Source`, one job's rows in the documented event schema (``docs/schema.md``) that the
same analyzers read. :func:`open_sources` expands the paths (folders, files, globs), lets the
readers claim the files, and names every file that no reader could use: damaged input is
listed, never silently skipped, and never turned into a finding.

A folder holding ringwatch logs (``<job>/rank-NNNNN/`` or a job's folder) is read as such; any
other folder is searched for files the readers claim.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: Bytes of each file the readers' ``sniff`` sees.
HEAD_BYTES = 4096
#: Files searched in one folder at most (a wrong folder, such as ``/``, stops early).
MAX_FILES = 100_000
#: Names (suffixes) that look like an input: a file so named that no reader claims is named
#: as unreadable. Other files of a searched folder (a README, a script) are passed over.
INPUT_SUFFIXES = (".json", ".json.gz", ".pkl", ".pickle", ".parquet", ".csv", ".csv.gz")


class Source(Protocol):
    """One job's collectives from some input, as :func:`ringwatch._analyze.analyze_job`
    reads them.

    Attributes:
        kind: What was read (``"ringwatch logs"``, ``"flight recorder dumps"``, ...).
        path: Where (a folder or the first file).
        job_id: The job's id (the input's own, or derived from its path).
        ranks: The ranks present (keys; the values are the reader's own).
        problems: One line per file (or part of one) that could not be used, with why.
    """

    kind: str
    path: Path
    job_id: str
    ranks: Mapping[int, Any]
    problems: list[str]

    def events(self, *, include_pending: bool = True, columns: list[str] | None = None,
               categorical: bool = False):
        """All ranks' rows (a polars DataFrame in the event schema), by (rank, idx)."""

    def last_write_ns(self) -> dict[int, int]:
        """``rank -> wall ns`` when each rank was last known alive (may be empty)."""


@dataclass(frozen=True)
class Reader:
    """One kind of input.

    Attributes:
        kind: Its name, as reports print it.
        sniff: ``(path, first HEAD_BYTES bytes) -> bool``: is this file of this kind?
        open: ``(files claimed, job id or None) -> list of sources`` (one per job found);
            files it cannot use go to each source's ``problems``.
    """

    kind: str
    sniff: Callable[[Path, bytes], bool]
    open: Callable[[list[Path], str | None], list[Source]]


@dataclass
class Opened:
    """What :func:`open_sources` found: the sources, and the files no reader could use."""

    sources: list[Source] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def readers() -> list[Reader]:
    """The readers, most specific first (the first whose ``sniff`` says yes takes a file).
    Imported here, when inputs are opened: none loads at ``import ringwatch``."""
    from ringwatch.inputs._fr import READER as FR
    from ringwatch.inputs._kineto import READER as KINETO
    from ringwatch.inputs._table import READER as TABLE

    return [FR, KINETO, TABLE]


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def looks_like_input(path: Path) -> bool:
    """A name one of the readers could be expected to read (see ``INPUT_SUFFIXES``)."""
    name = path.name.lower()
    return name.endswith(INPUT_SUFFIXES)


def _expand(paths: list[str | Path]) -> tuple[list[Path], list[Path], list[str]]:
    """``paths`` as (log folders, candidate files, problems)."""
    from ringwatch._logs import list_jobs, rank_dirs

    log_dirs: list[Path] = []
    files: list[Path] = []
    problems: list[str] = []
    for raw in paths:
        p = Path(raw)
        hits = [Path(h) for h in sorted(_glob.glob(str(raw)))] if not p.exists() and \
            _glob.has_magic(str(raw)) else [p]
        if not hits:
            problems.append(f"{raw}: no file matches")
        for h in hits:
            if h.is_dir():
                if rank_dirs(h) or list_jobs(h):
                    log_dirs.append(h)
                    continue
                n = 0
                for root, dirs, names in os.walk(h):
                    dirs.sort()
                    for name in sorted(names):
                        n += 1
                        if n > MAX_FILES:
                            problems.append(f"{h}: more than {MAX_FILES} files; "
                                            "the rest were not searched")
                            break
                        files.append(Path(root) / name)
                    if n > MAX_FILES:
                        break
            elif h.is_file():
                files.append(h)
            else:
                problems.append(f"{h}: no such file or folder")
    return log_dirs, list(dict.fromkeys(files)), problems


def open_sources(paths: list[str | Path], job_id: str | None = None) -> Opened:
    """Every input under ``paths``, read into sources.

    Args:
        paths: Folders (ringwatch's log root, a job's folder, or any folder to search), files
            or glob patterns.
        job_id: With ringwatch logs, which job (default: the most recently written); other
            readers keep the jobs whose id it is, when they know one.

    Returns:
        The sources found and the files that could not be used (one line each, with why).
        Files given by name that no reader claims are named; in a searched folder, only
        those whose name looks like an input (``INPUT_SUFFIXES``).
    """
    from ringwatch._logs import LogError, open_job

    log_dirs, files, problems = _expand(paths)
    out = Opened(unreadable=problems)
    for d in log_dirs:
        try:
            job = open_job(d, job_id)
        except LogError as exc:
            out.unreadable.append(str(exc))
            continue
        out.sources.append(job)
    named = {Path(p) for p in paths}
    claimed: dict[int, list[Path]] = {}
    all_readers = readers()
    for f in files:
        try:
            head = _head(f)
        except OSError as exc:
            out.unreadable.append(f"{f}: unreadable ({exc.strerror or exc})")
            continue
        for i, r in enumerate(all_readers):
            if r.sniff(f, head):
                claimed.setdefault(i, []).append(f)
                break
        else:
            if f in named or looks_like_input(f):
                out.unreadable.append(f"{f}: not an input ringwatch reads (ringwatch logs, "
                                      "Flight Recorder dumps, profiler traces or a "
                                      "collective table)")
    for i, fs in sorted(claimed.items()):
        out.sources += all_readers[i].open(fs, job_id)
    return out


__all__ = ["HEAD_BYTES", "INPUT_SUFFIXES", "Opened", "Reader", "Source", "looks_like_input",
           "open_sources", "readers"]

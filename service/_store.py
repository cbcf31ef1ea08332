"""The findings lifecycle of the central service: which findings are open, since when, and what
changed, kept across restarts in local Parquet files.

The analysis loop hands each job's findings of one round to :meth:`FindingsStore.update`; the
store matches them to what it already tracks by an identity key (:func:`identity_key`), opens
the new ones, updates the ones seen again and resolves the ones gone quiet for
``resolve_after_s``. The HTTP API reads :meth:`~FindingsStore.current` and
:meth:`~FindingsStore.history` meanwhile: every method takes the store's one lock.

Durability: the analysis loop's changes are written at most every ``flush_interval_s`` (a
crash loses at most that much of them, and the next rounds find the same findings again); an
operator's resolve is written before :meth:`~FindingsStore.resolve` returns, so an answered
resolve survives a kill -9.

Ids: ``<job>:<kind>:<run>-<n>``, with ``n`` counting up across restarts (from the largest
loaded) and ``<run>`` the store's start time in seconds, base 36 (six characters): ids stay
unique even when both state files are lost (or set aside as corrupt) and ``n`` starts at 1
again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import polars as pl

from ringwatch._clock import Clock, SystemClock
from ringwatch.analyzers._findings import Finding
from ringwatch.service import _store_io as io
from ringwatch.service._store_io import STATES, Change, TrackedFinding

__all__ = ["Change", "FindingsStore", "TrackedFinding", "identity_key"]

log = logging.getLogger("ringwatch.service")


def identity_key(job: str, f: Finding) -> tuple:
    """What makes two reports the same finding.

    ``(job, kind, cls, ranks, hosts, pg)`` with ranks and hosts as sorted sets (their order
    carries no identity). ``seq`` is never part of it, so a hang that moves on to another
    collective number (or is re-reported at the same one) keeps its key. A slow link is keyed
    by ``(job, "slow_link", hosts)`` only: its ranks, group and class follow whichever groups
    are slow in the window, the suspect hosts are what it is about. A straggler is keyed
    without its class: one that ends within a few steps turns from ``compute straggler`` into
    ``transient straggler`` (a hiccup) as it ends, and that report must resolve it, not open
    a second finding.
    """
    hosts = tuple(sorted(set(f.hosts)))
    if f.kind == "slow_link":
        return (job, f.kind, hosts)
    cls = None if f.kind == "straggler" else f.cls
    return (job, f.kind, cls, tuple(sorted(set(f.ranks))), hosts, f.pg)


def _number(tid: str) -> int:
    """The counter of an id (``...:<run>-<n>``, or ``...:<n>`` as written before runs)."""
    try:
        return int(tid.rsplit(":", 1)[-1].rsplit("-", 1)[-1])
    except ValueError:
        return 0


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if not n:
            return out


def _same_episode(old: Finding, new: Finding) -> bool:
    """Whether an ended report (``until_step`` set) is the episode ``old`` already stood for."""
    if new.since_step is None and new.since_ns is None:
        return old.until_step == new.until_step
    return (old.since_step, old.since_ns) == (new.since_step, new.since_ns)


class FindingsStore:
    """Tracks each job's findings across analysis rounds: open, updated, resolved.

    Args:
        path: Folder for ``findings.parquet`` and ``history.parquet`` (created if missing;
            loaded if there); ``None`` keeps everything in memory only.
        clock: Source of wall time (``wall_ns()``); ``mono_ns()`` too, when it has one, for
            the flush interval. Default :class:`~ringwatch._clock.SystemClock`.
        resolve_after_s: An open finding not reported for this long (s, from its
            ``last_seen_ns``) is resolved by the next round of its job (or :meth:`sweep`).
        history_limit: Changes kept (newest), in memory and in ``history.parquet``.
        max_resolved: Resolved findings kept per job (the ones resolved first are dropped).
        flush_interval_s: Least time (s) between two automatic writes of the files.

    Raises:
        ValueError: a negative limit or interval.
        OSError: ``path`` cannot be created.
    """

    def __init__(self, path: str | Path | None, *, clock: Clock | None = None,
                 resolve_after_s: float = 30.0, history_limit: int = 10_000,
                 max_resolved: int = 1000, flush_interval_s: float = 1.0) -> None:
        if min(resolve_after_s, history_limit, max_resolved, flush_interval_s) < 0:
            raise ValueError("resolve_after_s, history_limit, max_resolved and "
                             "flush_interval_s must not be negative")
        self._clock = clock if clock is not None else SystemClock()
        # A clock with only wall_ns() still works; the flush interval then reads wall time.
        self._mono_ns = getattr(self._clock, "mono_ns", self._clock.wall_ns)
        self._resolve_after_ns = int(resolve_after_s * 1e9)
        self._max_resolved = max_resolved
        self._flush_interval_ns = int(flush_interval_s * 1e9)
        self._dir = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._by_id: dict[str, TrackedFinding] = {}  # in order of opening
        self._job_ids: dict[str, dict[str, None]] = {}  # job -> its ids, in order of opening
        self._latest: dict[tuple, str] = {}  # identity key -> id of its newest occurrence
        self._history: deque[Change] = deque(maxlen=history_limit)
        self._next_n = 1
        self._run = _base36(self._clock.wall_ns() // 1_000_000_000)
        self._findings_dirty = self._history_dirty = False
        self._pending = False  # changes made since the last write
        self._last_write_ns: int | None = None
        self._write_warned = False
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._load()

    # -- the analysis loop's side -------------------------------------------------------

    def update(self, job: str, findings: Iterable[Finding], *,
               now_ns: int | None = None) -> list[Change]:
        """Take the findings the analyzers returned for ``job`` in one round.

        Several findings with one identity key in a round count as one (the most confident).

        Args:
            job: The job the round analysed.
            findings: Everything the analyzers found in it (an empty round still resolves
                the findings gone quiet).
            now_ns: Wall clock (ns) of the round; default the clock's.

        Returns:
            The changes, in order: opened, updated and resolved findings.
        """
        with self._lock:
            batch: dict[tuple, Finding] = {}
            for f in findings:
                k = self._open_link_key(job, f) or identity_key(job, f)
                if k not in batch or f.confidence > batch[k].confidence:
                    batch[k] = f
            now = self._clock.wall_ns() if now_ns is None else int(now_ns)
            self._job_ids.setdefault(job, {})
            seen: set[str] = set()
            changes = [c for k, f in batch.items() for c in self._report(job, k, f, now, seen)]
            changes += self._expire(job, now, seen)
            self._findings_dirty |= bool(batch)
            self._record(changes)
            self._flush_if_due()
            return changes

    def _open_link_key(self, job: str, f: Finding) -> tuple | None:
        """The key of the open slow link of ``job`` that shares a host with ``f``: the
        analyzer narrows its suspects as more groups slow down (host0+host2, then host2),
        which is the same fault, not a new one."""
        if f.kind != "slow_link":
            return None
        hosts = set(f.hosts)
        for k, tid in self._latest.items():
            t = self._by_id.get(tid)
            if (t is not None and k[0] == job and k[1] == "slow_link" and t.state == "open"
                    and hosts & set(t.finding.hosts)):
                return k
        return None

    def sweep(self, *, now_ns: int | None = None) -> list[Change]:
        """Resolve the open findings of every job quiet for ``resolve_after_s`` (for jobs
        whose rounds stopped)."""
        with self._lock:
            now = self._clock.wall_ns() if now_ns is None else int(now_ns)
            changes = [c for job in list(self._job_ids) for c in self._expire(job, now, set())]
            self._record(changes)
            self._flush_if_due()
            return changes

    # -- the operator's and readers' side -----------------------------------------------

    def current(self, job: str | None = None, *,
                state: str | None = None) -> list[TrackedFinding]:
        """Tracked findings (of ``job``, in ``state`` when given), in order of opening.

        Raises:
            ValueError: ``state`` is not ``open``, ``resolved`` or ``None``.
        """
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES} or None, not {state!r}")
        with self._lock:
            ids = self._by_id if job is None else self._job_ids.get(job, {})
            return [t for t in (self._by_id[i] for i in ids)
                    if state is None or t.state == state]

    def history(self, job: str | None = None, limit: int | None = None) -> list[Change]:
        """The changes (of ``job``), oldest first, the newest ``limit`` when given."""
        with self._lock:
            out = [c for c in self._history if job is None or c.tracked.job == job]
        if limit is not None:
            out = out[len(out) - max(0, min(limit, len(out))):]
        return out

    def jobs(self) -> list[str]:
        """Jobs with tracked findings or a round since start, sorted."""
        with self._lock:
            return sorted(self._job_ids)

    def resolve(self, finding_id: str, *, durable: bool = True) -> TrackedFinding:
        """Close one finding by hand (a resolved one is returned as it is).

        If its analyzer reports it again, it re-opens as a new occurrence.

        Args:
            finding_id: The tracked finding's id.
            durable: Write the state files before returning (an operator's action); False
                leaves it to the next due write (the analysis loop's own resolves).

        Raises:
            KeyError: no tracked finding has this id.
            OSError: ``durable`` and the folder cannot be written (the finding is resolved
                in memory, and written by a later round when the folder is back).
        """
        with self._lock:
            t = self._by_id.get(finding_id)
            if t is None:
                raise KeyError(f"no tracked finding {finding_id!r}")
            if t.state == "resolved":
                return t
            now = self._clock.wall_ns()
            t = self._put(replace(t, state="resolved", resolved_ns=now))
            self._record([Change("resolved", t, now)])
            if durable:
                try:
                    self._write()
                except pl.exceptions.PolarsError as e:
                    raise OSError(f"cannot write {self._dir}: {e}") from None
            else:
                self._flush_if_due()
            return t

    def forget_job(self, job: str) -> int:
        """Drop a job's findings and history; returns how many findings were dropped."""
        with self._lock:
            ids = self._job_ids.pop(job, {})
            for i in ids:
                del self._by_id[i]
            self._latest = {k: i for k, i in self._latest.items() if k[0] != job}
            kept = [c for c in self._history if c.tracked.job != job]
            if len(kept) != len(self._history):
                self._history = deque(kept, maxlen=self._history.maxlen)
                self._history_dirty = True
            self._findings_dirty |= bool(ids)
            self._pending |= bool(ids) or self._history_dirty
            self._flush_if_due()
            return len(ids)

    def flush(self) -> None:
        """Write what changed to the files now (no-op in memory or when nothing changed).

        Raises:
            OSError: the folder is not writable.
        """
        with self._lock:
            self._write()

    def close(self) -> None:
        """Flush (see :meth:`flush`); the store stays usable."""
        self.flush()

    # -- internals (called under the lock) ----------------------------------------------

    def _report(self, job: str, key: tuple, f: Finding, now: int,
                seen: set[str]) -> list[Change]:
        latest = self._by_id.get(self._latest.get(key, ""))
        if latest is not None and latest.state == "open":
            seen.add(latest.id)
            changed = f != latest.finding
            t = replace(latest, last_seen_ns=max(now, latest.last_seen_ns), finding=f,
                        updates=latest.updates + changed)
            if f.until_step is not None:  # the analyzer says it ended
                t = self._put(replace(t, state="resolved", resolved_ns=now))
                return [Change("resolved", t, now)]
            self._put(t)
            return [Change("updated", t, now)] if changed else []
        if f.until_step is not None and latest is not None \
                and _same_episode(latest.finding, f):
            return []  # an ended episode already resolved
        n, self._next_n = self._next_n, self._next_n + 1
        t = self._put(TrackedFinding(id=f"{job}:{f.kind}:{self._run}-{n}", job=job,
                                     state="open",
                                     opened_ns=now, last_seen_ns=now, resolved_ns=None,
                                     updates=0, finding=f))
        self._latest[key] = t.id
        seen.add(t.id)
        out = [Change("opened", t, now)]
        if f.until_step is not None:
            out.append(Change("resolved", self._put(replace(t, state="resolved",
                                                            resolved_ns=now)), now))
        return out

    def _expire(self, job: str, now: int, seen: set[str]) -> list[Change]:
        out = []
        for i in self._job_ids.get(job, ()):
            t = self._by_id[i]
            if t.state == "open" and i not in seen \
                    and now - t.last_seen_ns >= self._resolve_after_ns:
                t = self._put(replace(t, state="resolved", resolved_ns=now))
                out.append(Change("resolved", t, now))
        return out

    def _put(self, t: TrackedFinding) -> TrackedFinding:
        self._by_id[t.id] = t
        self._job_ids.setdefault(t.job, {})[t.id] = None
        return t

    def _record(self, changes: list[Change]) -> None:
        if not changes:
            return
        self._history.extend(changes)
        self._pending = self._findings_dirty = self._history_dirty = True
        for job in {c.tracked.job for c in changes if c.what == "resolved"}:
            self._trim(job)

    def _trim(self, job: str) -> None:
        ids = self._job_ids.get(job, {})
        resolved = [self._by_id[i] for i in ids if self._by_id[i].state == "resolved"]
        if len(resolved) <= self._max_resolved:
            return
        resolved.sort(key=lambda t: (t.resolved_ns or 0, _number(t.id)))
        for t in resolved[:len(resolved) - self._max_resolved]:
            del self._by_id[t.id], ids[t.id]
            if self._latest.get(identity_key(t.job, t.finding)) == t.id:
                del self._latest[identity_key(t.job, t.finding)]

    def _flush_if_due(self) -> None:
        if self._dir is None or not self._pending:
            return
        mono = self._mono_ns()
        if self._last_write_ns is not None \
                and mono - self._last_write_ns < self._flush_interval_ns:
            return  # written by a later round, flush() or close()
        try:
            self._write()
        except (OSError, pl.exceptions.PolarsError) as e:
            self._last_write_ns = mono  # retry at the next interval, not every round
            if not self._write_warned:
                self._write_warned = True
                log.warning("ringwatch store: cannot write %s (%s); keeping findings in "
                            "memory and retrying", self._dir, e)

    def _write(self) -> None:
        if self._dir is None:
            return
        self._last_write_ns = self._mono_ns()
        if self._findings_dirty:
            io.write_atomic(self._dir / io.FINDINGS_FILE,
                            [t.to_row() for t in self._by_id.values()], io.FINDINGS_SCHEMA)
            self._findings_dirty = False
        if self._history_dirty:
            io.write_atomic(self._dir / io.HISTORY_FILE,
                            [{"what": c.what, "at_ns": c.at_ns, **c.tracked.to_row()}
                             for c in self._history], io.HISTORY_SCHEMA)
            self._history_dirty = False
        self._pending = False

    def _load(self) -> None:
        assert self._dir is not None
        now = self._clock.wall_ns()
        tracked = io.load(self._dir / io.FINDINGS_FILE, io.FINDINGS_SCHEMA,
                          TrackedFinding.from_row, now)
        changes = io.load(self._dir / io.HISTORY_FILE, io.HISTORY_SCHEMA, Change.from_row, now)
        for t in sorted(tracked, key=lambda t: (t.opened_ns, _number(t.id))):
            self._put(t)
            self._latest[identity_key(t.job, t.finding)] = t.id  # the newest one wins
        self._history.extend(changes)
        self._next_n = 1 + max((_number(i) for i in [*self._by_id,
                                                     *(c.tracked.id for c in changes)]),
                               default=0)
        for job in list(self._job_ids):
            self._trim(job)

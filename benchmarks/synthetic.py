"""Synthetic collective logs with ringwatch's schema, for scale tests.

It stays a generator for scale tests: what the analyzers *find* is claimed from real runs
(``scenarios.py``), never from these rows.

The job: ``ranks`` ranks on hosts of ``ranks_per_host``. Every step, each tensor-parallel group
(``tp_size`` consecutive ranks) runs ``tp_slots`` all-gathers, then the world group runs
``buckets`` all-reduces (DDP's gradient buckets). Collectives are blocking: a rank arrives at
one after its own previous collective plus some compute (with jitter; a longer gap before a
step's first collective: forward pass, data loading), and every member leaves once the last
has arrived plus the transfer time (plus a few µs each). So a late rank has the shortest
duration and its peers wait for it. Each host has its own monotonic clock (its own origin)
and a wall clock a little off the others (NTP-grade skew); within a row
``duration_ns == mono_end_ns - mono_start_ns == t_end_ns - t_start_ns``.

Faults, both optional:

* straggler: from step ``straggler_step`` on, rank ``straggler`` computes ``straggler_ms``
  longer before each of its collectives (it arrives late; its peers wait for it);
* hang: rank ``hang`` never enters the first all-reduce of step ``hang_step``; every other
  rank enters it and stays there (a ``pending`` row, no end), and nothing is recorded after.

Everything is vectorised over ranks (one numpy pass per collective slot), so ten million rows
take seconds. :func:`write_logs` lays a job out on disk as the agent does
(``ringwatch.agent.capture._writer``): ``<log_dir>/<job_id>/rank-NNNNN/`` with compacted segment
files, ``pending.parquet`` for the rows in flight and ``meta.json`` with the heartbeat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ringwatch._logs import META_FILE, PENDING_FILE
from ringwatch._schema import SCHEMA_VERSION, format_ranks, polars_schema
from ringwatch._version import __version__

# The writer's own helpers, so the files are byte-for-byte what an agent writes (zstd, the
# schema-version key in the Parquet metadata, the rank folder's name).
from ringwatch.agent.capture._writer import _write_atomic, rank_dir

MS = 1_000_000
WORLD, TP = 0, 1  # slot kinds
T0_NS = 1_795_424_400 * 10**9  # 2026-11-23 09:00 UTC: wall clock of the job's start
COMPACT = 32  # flushes per compacted segment file, as the agent's default


@dataclass(frozen=True, kw_only=True)
class SyntheticJob:
    """Shape, timing and faults of one synthetic job (times in ms unless named otherwise).

    Attributes:
        ranks: World size.
        steps: Training steps.
        buckets: World all-reduces per step.
        tp_size: Ranks per tensor-parallel group (0: no such groups); divides ``ranks``.
        tp_slots: All-gathers per step in each tensor-parallel group.
        ranks_per_host: Ranks per host (``host``, ``local_rank``).
        bucket_bytes: Bytes of one all-reduce.
        tp_bytes: Output bytes of one all-gather.
        compute_ms: Compute before each collective.
        step_gap_ms: Compute before a step's first collective.
        jitter_ms: Standard deviation of each compute time.
        gbytes_per_s: Transfer rate: a collective takes ``latency_us`` + bytes / rate.
        latency_us: Fixed cost of a collective.
        straggler: Rank made late, or None.
        straggler_step: First step it is late in.
        straggler_ms: Extra compute before each of its collectives.
        hang: Rank that never enters a collective, or None.
        hang_step: Step whose first all-reduce it never enters.
        seed: Random seed.
        job_id: The ``job_id`` column and the job's folder name.
    """

    ranks: int = 64
    steps: int = 20
    buckets: int = 4
    tp_size: int = 8
    tp_slots: int = 1
    ranks_per_host: int = 8
    bucket_bytes: int = 25 * 2**20
    tp_bytes: int = 8 * 2**20
    compute_ms: float = 3.0
    step_gap_ms: float = 40.0
    jitter_ms: float = 0.3
    gbytes_per_s: float = 20.0
    latency_us: float = 30.0
    straggler: int | None = None
    straggler_step: int = 0
    straggler_ms: float = 5.0
    hang: int | None = None
    hang_step: int = 0
    seed: int = 0
    job_id: str = "synthetic"

    def __post_init__(self) -> None:
        if self.ranks < 2 or self.steps < 1 or self.buckets < 1:
            raise ValueError("need at least 2 ranks, 1 step and 1 bucket")
        if self.tp_size and (self.tp_size < 2 or self.ranks % self.tp_size):
            raise ValueError(f"tp_size {self.tp_size} must be >= 2 and divide {self.ranks}")
        for name in ("straggler", "hang"):
            r = getattr(self, name)
            if r is not None and not 0 <= r < self.ranks:
                raise ValueError(f"{name} rank {r} outside 0..{self.ranks - 1}")

    @property
    def slots_per_step(self) -> int:
        return self.buckets + (self.tp_slots if self.tp_size else 0)

    @property
    def slots(self) -> int:
        """Collectives each rank issues in the whole job (without a hang)."""
        return self.steps * self.slots_per_step


@dataclass(frozen=True)
class Timeline:
    """When each rank was in each collective slot (ns since the job's start).

    Attributes:
        kind: Per slot, ``WORLD`` or ``TP``.
        step: Per slot, the training step.
        seq: Per slot, the collective's number in its group (1-based).
        start: ``(slots, ranks)`` arrival times.
        end: ``(slots, ranks)`` leave times; -1 where the rank is still in it (pending).
        rows: Per rank, how many slots it recorded (all of them unless a hang cut it short).
    """

    kind: np.ndarray
    step: np.ndarray
    seq: np.ndarray
    start: np.ndarray
    end: np.ndarray
    rows: np.ndarray


def timeline(job: SyntheticJob) -> Timeline:
    """Arrival and leave times of every rank at every collective slot."""
    rng = np.random.default_rng(job.seed)
    n, per = job.ranks, job.slots_per_step
    tp = job.tp_slots if job.tp_size else 0
    kind = np.tile(np.array([TP] * tp + [WORLD] * job.buckets, dtype=np.int8), job.steps)
    step = np.repeat(np.arange(job.steps, dtype=np.int64), per)
    seq = np.empty(kind.size, dtype=np.int64)
    for k in (WORLD, TP):
        seq[kind == k] = np.arange(1, int((kind == k).sum()) + 1)
    hang_slot = job.hang_step * per + tp if job.hang is not None else kind.size
    if hang_slot >= kind.size:
        hang_slot = kind.size  # hang after the last step: none in the log
    used = min(kind.size, hang_slot + 1)
    start = np.empty((used, n), dtype=np.int64)
    end = np.empty((used, n), dtype=np.int64)
    xfer = {WORLD: int(job.latency_us * 1e3 + 2 * job.bucket_bytes / job.gbytes_per_s),
            TP: int(job.latency_us * 1e3 + job.tp_bytes / job.gbytes_per_s)}
    prev = np.zeros(n, dtype=np.int64)
    for k in range(used):
        gap = (job.step_gap_ms if k % per == 0 else job.compute_ms) * MS
        compute = np.maximum(gap + job.jitter_ms * MS * rng.standard_normal(n), 0.1 * gap)
        arrive = prev + compute.astype(np.int64)
        if job.straggler is not None and step[k] >= job.straggler_step:
            arrive[job.straggler] += int(job.straggler_ms * MS)
        start[k] = arrive
        if k == hang_slot:
            start[k, job.hang] = -1  # never entered
            end[k] = -1  # everyone else waits in it for good
            break
        if kind[k] == WORLD:
            done = np.full(n, arrive.max())
        else:
            done = np.repeat(arrive.reshape(-1, job.tp_size).max(axis=1), job.tp_size)
        end[k] = done + xfer[int(kind[k])] + rng.integers(2_000, 30_000, n)
        prev = end[k]
    rows = np.full(n, used, dtype=np.int64)
    if hang_slot < kind.size:
        rows[job.hang] = hang_slot
    return Timeline(kind[:used], step[:used], seq[:used], start, end, rows)


def _clocks(job: SyntheticJob) -> tuple[np.ndarray, np.ndarray]:
    """Per host: the monotonic clock at the job's start, and the wall clock's skew (ns)."""
    rng = np.random.default_rng(job.seed + 1)
    hosts = -(-job.ranks // job.ranks_per_host)
    boot = rng.integers(10**12, 10**15, hosts)  # up to ~12 days of uptime
    skew = rng.integers(-50_000, 50_000, hosts)  # within 50 µs of each other
    return boot, skew


def _per_rank_kind(job: SyntheticJob) -> pl.DataFrame:
    """What depends only on (rank, slot kind): row ``2 * rank + kind``."""
    n, per_host = job.ranks, job.ranks_per_host
    tp = max(job.tp_size, 1)
    world = format_ranks(range(n))
    rows = []
    for r in range(n):
        g = r // tp
        common = {"host": f"node{r // per_host:05d}", "local_rank": r % per_host,
                  "pid": 10_000 + r % per_host}
        rows.append({**common, "pg": "0", "pg_desc": "default_pg", "pg_ranks": world,
                     "pg_size": n, "group_rank": r, "op": "all_reduce", "api": "ddp",
                     "async_op": True, "end_source": "future", "nbytes": job.bucket_bytes,
                     "nbytes_in": job.bucket_bytes})
        rows.append({**common, "pg": str(g + 1), "pg_desc": "tp",
                     "pg_ranks": format_ranks(range(g * tp, g * tp + tp)), "pg_size": tp,
                     "group_rank": r % tp, "op": "all_gather_into_tensor",
                     "api": "dist.all_gather_into_tensor", "async_op": False,
                     "end_source": "wait", "nbytes": job.tp_bytes,
                     "nbytes_in": job.tp_bytes // tp})
    return pl.DataFrame(rows)


def job_frame(job: SyntheticJob, tl: Timeline | None = None, ranks=None,
              table: pl.DataFrame | None = None) -> pl.DataFrame:
    """The job's rows (or those of ``ranks``), in the schema's columns and types, by rank
    then ``idx``.

    Args:
        job: The job.
        tl: Its :func:`timeline` (computed when not given; pass it for several slices).
        ranks: Ascending ranks to include; None means all.
        table: Its per-(rank, kind) columns (computed when not given).
    """
    tl = timeline(job) if tl is None else tl
    table = _per_rank_kind(job) if table is None else table
    rs = np.arange(job.ranks) if ranks is None else np.asarray(ranks, dtype=np.int64)
    counts = tl.rows[rs]
    rank = np.repeat(rs, counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    slot = np.arange(rank.size, dtype=np.int64) - offsets
    host = rank // job.ranks_per_host
    boot, skew = _clocks(job)
    start = tl.start[slot, rank]
    end = tl.end[slot, rank]
    pending = end < 0
    mono_start = start + boot[host]
    mono_end = np.where(pending, 0, end + boot[host])
    wall = T0_NS + skew[host] - boot[host]  # wall - mono, per row's host
    df = table[2 * rank + tl.kind[slot]].with_columns(
        pl.Series("rank", rank, dtype=pl.Int32), pl.Series("idx", slot),
        pl.Series("seq", tl.seq[slot]), pl.Series("step", tl.step[slot]),
        pl.Series("_pending", pending), pl.Series("mono_start_ns", mono_start),
        pl.Series("_mono_end", mono_end), pl.Series("_wall", wall))
    pend = pl.col("_pending")
    df = df.with_columns(pl.when(pend).then(None).otherwise(pl.col("_mono_end"))
                         .alias("mono_end_ns"))
    out = df.with_columns(
        pl.lit(job.job_id).alias("job_id"),
        pl.lit(job.ranks).alias("world_size"),
        pl.lit("nccl").alias("backend"),
        pl.lit(False).alias("is_p2p"),
        pl.lit(None).alias("peer"), pl.lit(None).alias("root"),
        pl.lit("bfloat16").alias("dtype"),
        (pl.col("nbytes") // 2).alias("numel"),
        pl.col("nbytes").alias("nbytes_out"),
        pl.when(pend).then(pl.lit("pending")).otherwise(pl.lit("ok")).alias("status"),
        pl.lit(None).alias("error"),
        (pl.col("mono_start_ns") + pl.col("_wall")).alias("t_issue_ns"),
        (pl.col("mono_start_ns") + pl.col("_wall")).alias("t_start_ns"),
        (pl.col("mono_end_ns") + pl.col("_wall")).alias("t_end_ns"),
        (pl.col("mono_end_ns") - pl.col("mono_start_ns")).alias("duration_ns"),
        pl.lit(None).alias("device_duration_ns"),
        pl.when(pend).then(pl.lit("none")).otherwise(pl.col("end_source")).alias("end_source"),
    )
    return out.select([pl.col(c).cast(t) for c, t in polars_schema().items()])


def newest_wall_ns(job: SyntheticJob, tl: Timeline) -> int:
    """The latest wall-clock time in the job's rows (a start or an end)."""
    boot, skew = _clocks(job)
    host = np.arange(job.ranks) // job.ranks_per_host
    last = np.maximum(tl.start.max(axis=0), tl.end.max(axis=0))
    return int((T0_NS + skew[host] + last).max())


def write_logs(job: SyntheticJob, log_dir: str | Path, *, segment_rows: int = 2048,
               chunk_ranks: int = 256, written_ns: int | None = None) -> Path:
    """Write the job's logs as the agent lays them out; returns the job's folder.

    Each rank's finished rows go to compacted segment files of ``segment_rows`` rows
    (``seg-00000001-00000032.parquet``, ...), its rows in flight to ``pending.parquet``,
    and ``meta.json`` holds identity, groups, counters and the heartbeat ``written_ns``
    (default: a minute after the newest row: the agents kept flushing that long).

    Args:
        job: The job.
        log_dir: The agent's log root.
        segment_rows: Rows per segment file.
        chunk_ranks: Ranks generated at a time (bounds memory).
        written_ns: Every rank's heartbeat.
    """
    tl = timeline(job)
    if written_ns is None:
        written_ns = newest_wall_ns(job, tl) + 60 * 10**9
    boot, skew = _clocks(job)
    table = _per_rank_kind(job)
    for lo in range(0, job.ranks, chunk_ranks):
        part = job_frame(job, tl, range(lo, min(job.ranks, lo + chunk_ranks)), table)
        for (rank,), rows in part.partition_by("rank", as_dict=True,
                                               maintain_order=True).items():
            host = rank // job.ranks_per_host
            write_rank_logs(rows, log_dir, job.job_id, job.ranks, segment_rows=segment_rows,
                            written_ns=written_ns,
                            wall_minus_mono=int(T0_NS + skew[host] - boot[host]))
    return Path(log_dir) / job.job_id


def write_rank_logs(rows: pl.DataFrame, log_dir: str | Path, job_id: str, world: int, *,
                    written_ns: int, wall_minus_mono: int, segment_rows: int = 2048) -> None:
    """One rank's rows (every column of the schema) as its agent lays them out: compacted
    segment files of ``segment_rows`` finished rows, ``pending.parquet`` for the rows in
    flight, and ``meta.json`` (identity, groups, counters, the heartbeat ``written_ns``)."""
    rank = int(rows["rank"][0])
    d = rank_dir(Path(log_dir), job_id, rank)
    d.mkdir(parents=True, exist_ok=True)
    done = rows.filter(pl.col("status") != "pending")
    for i, a in enumerate(range(0, done.height, segment_rows)):
        first = 1 + i * COMPACT
        _write_atomic(done.slice(a, segment_rows),
                      d / f"seg-{first:08d}-{first + COMPACT - 1:08d}.parquet")
    pending = rows.filter(pl.col("status") == "pending")
    if not pending.is_empty():
        _write_atomic(pending, d / PENDING_FILE)
    first = rows.row(0, named=True)
    groups = (rows.group_by("pg", maintain_order=True)
              .agg(pl.col("pg_desc", "backend", "pg_ranks", "pg_size", "group_rank").first(),
                   pl.col("seq").max().alias("last_seq")))
    n_pending = pending.height
    meta = {
        "schema_version": SCHEMA_VERSION, "ringwatch_version": __version__,
        "job_id": job_id, "rank": rank, "local_rank": first["local_rank"],
        "world_size": world, "host": first["host"], "pid": first["pid"],
        "rows_written": rows.height - n_pending, "wall_minus_mono_ns": wall_minus_mono,
        "groups": [{**g, "nccl_hook": False} for g in groups.iter_rows(named=True)],
        "counters": {"recorded": rows.height, "dropped": 0, "pending": n_pending,
                     "backfilled": 0, "unrecovered": 0},
        "write_failures": 0, "warnings": {}, "final": False, "written_ns": written_ns,
        "synthetic": True,
    }
    path = d / META_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(path)


__all__ = ["SyntheticJob", "Timeline", "job_frame", "newest_wall_ns", "timeline",
           "write_logs", "write_rank_logs"]

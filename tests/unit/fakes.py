"""Small stand-ins shared by the unit tests: groups, process groups, NCCL work infos, frames."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from typing import Any

from ringwatch._clock import FakeClock
from ringwatch.agent.capture._recorder import Event, GroupInfo, RankIdentity, Recorder

JOB = "job-unit"


def identity(rank: int = 0, world_size: int = 2, *, job_id: str = JOB) -> RankIdentity:
    return RankIdentity(job_id=job_id, rank=rank, local_rank=rank, world_size=world_size,
                        host="host-a", pid=4242)


def recorder(*, rank: int = 0, world_size: int = 2, buffer_events: int = 1000,
             clock: FakeClock | None = None) -> Recorder:
    return Recorder(identity(rank, world_size), buffer_events=buffer_events,
                    clock=clock or FakeClock())


class FakePG:
    """A process group reduced to what the agent reads: the backend's sequence counter."""

    def __init__(self, seq: int = 0, *, name: str = "0", ranks=(0, 1), rank: int = 0):
        self.seq = seq
        self.group_name = name
        self._ranks = list(ranks)
        self._rank = rank

    def _get_sequence_number_for_group(self) -> int:
        return self.seq

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return len(self._ranks)


class FakeNcclPG(FakePG):
    """An NCCL group as far as timing and the completion hook go, with PyTorch's rules: a
    work is CUDA-timed if timing was on when it was created (``timed_from_creation``, or
    ``_enable_collectives_timing()`` before it); the hook can be registered once; and once it
    is, every work that finishes is handed to it with its duration, which for an untimed work
    throws and aborts the group (``aborted`` holds why)."""

    def __init__(self, *args, timed_from_creation: bool = False, **kwargs):
        self.timing = timed_from_creation
        self.in_flight: list[tuple[int, bool]] = []  # (seq, timed)
        self._seq = 0
        super().__init__(*args, **kwargs)
        self.hook = None
        self.registrations = 0
        self.aborted: str | None = None

    @property
    def seq(self) -> int:
        return self._seq

    @seq.setter
    def seq(self, value: int) -> None:  # each step of the counter is a work created now
        self.in_flight += [(n, self.timing) for n in range(self._seq + 1, value + 1)]
        self._seq = value

    def _enable_collectives_timing(self) -> None:
        self.timing = True

    def _register_on_completion_hook(self, hook) -> None:
        if self.hook is not None:
            raise RuntimeError("ProcessGroupNCCL OnCompletion hook already registered")
        self.hook = hook
        self.registrations += 1

    def issue(self) -> int:
        """A collective nobody recorded (issued from C++, or while detached)."""
        self.seq += 1
        return self.seq

    def finish_all(self) -> None:
        """The watchdog notices every work in flight finished."""
        done, self.in_flight = self.in_flight, []
        for seq, timed in done:
            if self.hook is None:
                continue
            if not timed:
                self.aborted = "getDuration only works if timing was enabled"
                return
            self.hook(FakeWorkInfo(op_type=FakeOpType.ALLREDUCE, seq=seq,
                                   time_started=us(1_000_000 + seq),
                                   time_finished=us(1_000_010 + seq), active_duration=us(3)))


def group(rec: Recorder | None = None, *, name: str = "0", ranks=(0, 1), group_rank: int = 0,
          backend: str = "gloo", desc: str | None = "default_pg", handle: Any = None,
          key: Any = None) -> GroupInfo:
    """A ``GroupInfo`` built the way ``_pg_hooks.group_info`` builds one (keyed by its handle),
    registered with ``rec`` when given."""
    handle = handle if handle is not None else FakePG(name=name, ranks=ranks, rank=group_rank)
    info = GroupInfo(key=key if key is not None else handle, name=name, desc=desc,
                     backend=backend, global_ranks=list(ranks), group_rank=group_rank,
                     handle=handle)
    return rec.add_group(info) if rec is not None else info


def issue_collective(rec: Recorder, g: GroupInfo, op: str = "all_reduce", *,
                     pg: FakePG | None = None, nbytes: int | None = 400,
                     api: str = "dist.all_reduce", steps: int = 1,
                     backend: bool = True) -> Event:
    """Issue one collective the way ``_pg_hooks._issue`` does; the fake backend counter moves
    by ``steps`` during the call (``backend=False``: a backend without a counter)."""
    pg = pg if pg is not None else g.handle
    ev = rec.new_event(g, op, api)
    ev.nbytes_in = ev.nbytes_out = nbytes
    ev.numel = None if nbytes is None else nbytes // 4
    ev.dtype = "float32"
    with rec.lock:
        rec.issue(ev, pg.seq if backend else None)
        pg.seq += steps
        rec.assign_collective_seq(g, ev, pg.seq if backend else None)
    return ev


def issue_p2p(rec: Recorder, g: GroupInfo, op: str, peer: int, *, pg: FakePG | None = None,
              nbytes: int = 64, steps: int = 1) -> Event:
    """Issue one send/recv on ``g`` with global ``peer`` (``steps``: Gloo counts p2p, NCCL
    does not)."""
    pg = pg if pg is not None else g.handle
    ev = rec.new_event(g, op, f"dist.{op}")
    ev.is_p2p = True
    ev.peer = peer
    ev.nbytes_in, ev.nbytes_out = (nbytes, 0) if op == "send" else (0, nbytes)
    me = g.my_global_rank
    src, dst = (me, peer) if op == "send" else (peer, me)
    with rec.lock:
        before = pg.seq
        rec.issue(ev, before)
        pg.seq += steps
        rec.assign_p2p_seq(g, ev, src, dst, before, pg.seq)
    return ev


# ---- NCCL completion hook ------------------------------------------------------------------


class FakeOpType(enum.Enum):
    """Enum-like op type with ``.name`` as PyTorch's ``OpType``."""

    ALLREDUCE = 1
    BROADCAST = 2
    SEND = 12
    RECV = 13
    COALESCED = 17


def us(n_us: int) -> datetime.timedelta:
    """A steady-clock reading (or a duration) of ``n_us`` microseconds, as the hook gives."""
    return datetime.timedelta(microseconds=n_us)


@dataclass
class FakeWorkInfo:
    op_type: Any
    seq: int
    time_started: Any
    time_finished: Any
    active_duration: Any


class FakeWork:
    """A ``Work`` for the poller."""

    def __init__(self, *, completed: bool = True, duration_ms: float | None = 1.5,
                 success: bool = True):
        self.completed = completed
        self.duration_ms = duration_ms
        self.success = success

    def is_completed(self) -> bool:
        return self.completed

    def _get_duration(self) -> float:
        if self.duration_ms is None:
            raise RuntimeError("timing not enabled")
        return self.duration_ms

    def is_success(self) -> bool:
        return self.success


# ---- event frames ------------------------------------------------------------------------------


def row(rank: int, idx: int, seq: int | None, op: str = "all_reduce", *, pg: str = "0",
        pg_ranks: str = "0-1", nbytes: int | None = 400, nbytes_in: int | None = None,
        nbytes_out: int | None = None, is_p2p: bool = False, peer: int | None = None,
        status: str = "ok", step: int | None = None, mono_start_ns: int | None = None,
        mono_end_ns: int | None = None, root: int | None = None) -> dict:
    """One schema row with sensible defaults for everything the analyzers do not look at."""
    nin = nbytes if nbytes_in is None else nbytes_in
    nout = nbytes if nbytes_out is None else nbytes_out
    dur = None if mono_start_ns is None or mono_end_ns is None else mono_end_ns - mono_start_ns
    from ringwatch._schema import parse_ranks

    members = parse_ranks(pg_ranks)
    return {
        "job_id": JOB, "rank": rank, "local_rank": rank, "world_size": 2, "host": "h",
        "pid": 100 + rank, "idx": idx, "backend": "gloo", "pg": pg, "pg_desc": None,
        "pg_ranks": pg_ranks, "pg_size": len(members),
        "group_rank": members.index(rank) if rank in members else 0, "seq": seq, "op": op,
        "is_p2p": is_p2p, "peer": peer, "root": root, "dtype": "float32",
        "numel": None if nbytes is None else nbytes // 4, "nbytes_in": nin, "nbytes_out": nout,
        "nbytes": None if nin is None and nout is None else max(nin or 0, nout or 0),
        "async_op": False, "api": "dist.all_reduce", "status": status, "error": None,
        "t_issue_ns": mono_start_ns, "t_start_ns": mono_start_ns, "t_end_ns": mono_end_ns,
        "mono_start_ns": mono_start_ns, "mono_end_ns": mono_end_ns, "duration_ns": dur,
        "device_duration_ns": None, "end_source": "wait", "step": step,
    }


def frame(rows: list[dict]):
    import polars as pl

    from ringwatch._schema import polars_schema

    return pl.DataFrame(rows, schema=polars_schema())


def uniform(ranks=(0, 1), seqs=(1, 2, 3), **kw) -> list[dict]:
    """The same collectives, in the same order, on every rank."""
    return [row(r, i, s, **kw) for r in ranks for i, s in enumerate(seqs)]


def fr_entry(record_id: int, seq: int, profiling_name: str = "gloo:all_reduce", *,
             pg: str = "0", desc: str = "default_pg", sizes=((100,),), dtype: str = "Float",
             is_p2p: bool = False, p2p_seq: int = 0, state: str = "completed",
             out_sizes=None) -> dict:
    """One Flight Recorder entry as PyTorch dumps it."""
    sizes = [list(s) for s in sizes]
    out = sizes if out_sizes is None else [list(s) for s in out_sizes]
    return {
        "record_id": record_id, "pg_id": 0, "process_group": [pg, desc],
        "collective_seq_id": seq, "p2p_seq_id": p2p_seq, "op_id": record_id + 1,
        "is_p2p": is_p2p, "profiling_name": profiling_name, "input_sizes": sizes,
        "input_dtypes": [dtype] * len(sizes), "output_sizes": out,
        "output_dtypes": [dtype] * len(out), "state": state, "retired": True,
        "time_created_ns": 1_700_000_000_000_000_000 + record_id * 1000,
        "time_discovered_started_ns": 0, "time_discovered_completed_ns": 0,
    }


def dump(entries: list[dict]) -> dict:
    return {"version": "2.10", "pg_config": {}, "pg_status": {}, "entries": entries}


def gpu_shaped(ev, *, seed: int = 0, device: bool = True, first_lead_ms: float = 20):
    """Rows of a real CPU run re-timed as a GPU job reports them: each op's exact duration
    becomes its device duration (CUDA events; none with ``device=False``), a collective's
    from where the group's previous one on the rank ended where that is later (one group's
    kernels run one after another on its stream: DDP's buckets, in flight together on the
    host, queue up there), its host start
    moves 0-20 ms earlier (launched ahead of the device) and its host end 10-100 ms later (the
    NCCL watchdog's poll, ``end_source`` "watchdog"). Each rank's first launch of a step moves
    0-``first_lead_ms`` earlier: a job whose host waits for the device once a step (the loss,
    the optimizer) launches it close to the device."""
    import numpy as np
    import polars as pl

    ms = 1_000_000
    rng = np.random.default_rng(seed)
    first = ev.select((pl.col("idx") == pl.col("idx").min().over("rank", "step")).alias("f"))
    lead = pl.Series(np.where(first["f"].fill_null(False).to_numpy(),
                              rng.integers(0, max(1, int(first_lead_ms * ms)), ev.height),
                              rng.integers(0, 20 * ms, ev.height)))
    late = pl.Series(rng.integers(10 * ms, 100 * ms, ev.height))
    prev_end = (pl.col("mono_end_ns").cum_max().shift(1)
                .over("rank", "pg", "is_p2p", order_by=["mono_start_ns", "idx"]))
    queued = pl.col("mono_end_ns") - pl.max_horizontal(pl.col("mono_start_ns"),
                                                       prev_end.fill_null(0))
    collective = ~pl.col("is_p2p").fill_null(False)
    out = ev.with_columns(
        (pl.when(collective).then(pl.min_horizontal(pl.col("duration_ns"),
                                                    queued.clip(lower_bound=0)))
         .otherwise(pl.col("duration_ns")) if device
         else pl.lit(None, pl.Int64)).alias("device_duration_ns"),
        pl.lit("watchdog").alias("end_source"),
        (pl.col("t_start_ns") - lead).alias("t_start_ns"),
        (pl.col("t_end_ns") + late).alias("t_end_ns"),
        (pl.col("mono_start_ns") - lead).alias("mono_start_ns"),
        (pl.col("mono_end_ns") + late).alias("mono_end_ns"))
    return out.with_columns((pl.col("t_end_ns") - pl.col("t_start_ns")).alias("duration_ns"))


def sidecar_steps(ev) -> dict[int, list]:
    """Per rank, what the sidecar makes of its rows read in time order
    (:func:`ringwatch.agent.sidecar._step_work.finished_work`: step, step and blocked ns,
    receives per sender), every step but its last."""
    from ringwatch.agent.sidecar._step_work import add_row, finished_work, fold_before

    out = {}
    for (rank,), rows in ev.sort("t_start_ns").partition_by("rank", as_dict=True).items():
        work: dict = {}
        for r in rows.iter_rows(named=True):
            if r["step"] is not None:
                add_row(work, r["step"], r)
                fold_before(work, r["step"])
        fold_before(work, max(work) + 2)
        out[rank] = finished_work(work, 10_000)
    return out

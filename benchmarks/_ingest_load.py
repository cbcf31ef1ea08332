"""Load of `serve_ingest.py`: a simulated job's layout and its agents' pushes, encoded ahead
of the timed span."""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from dataclasses import dataclass

import numpy as np

from ringwatch._schema import format_ranks
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._otlp_export import metrics_data
from ringwatch.agent.sidecar._points import PUSH_STEPS, collect_points
from ringwatch.agent.sidecar._rank_tail import OpTotals, RankSummary, StepTotals

JOB = "bench-job"
STEP0 = 100_000  # first step of the simulated job; labels stay 6 digits wide
DIGITS = 6
_STEP_KEY = re.compile(rb"\x0a\x0eringwatch\.step\x12\x08\x0a\x06(?=\d{6})")
_POW10 = 10 ** np.arange(DIGITS - 1, -1, -1, dtype=np.int64)

TP_OPS = (("all_gather", 2), ("reduce_scatter", 2))  # per step: op, calls
DP_OPS = (("all_reduce", 4),)
TP_BYTES = 16 << 20
DP_BYTES = 25 << 20


# --- the simulated job -------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    nodes: int
    ranks_per_node: int = 8

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def tp(self, rank: int) -> tuple[str, str, int, int]:
        """(pg name, members, size, rank in group) of the rank's tensor-parallel group."""
        node, local = divmod(rank, self.ranks_per_node)
        first = node * self.ranks_per_node
        return (str(1 + node), format_ranks(range(first, first + self.ranks_per_node)),
                self.ranks_per_node, local)

    def dp(self, rank: int) -> tuple[str, str, int, int]:
        """(pg name, members, size, rank in group) of the rank's data-parallel group."""
        node, local = divmod(rank, self.ranks_per_node)
        members = range(local, self.world, self.ranks_per_node)
        return str(1 + self.nodes + local), format_ranks(members), self.nodes, node


def _jitter(rank: int, step: int, scale_s: float) -> int:
    """Same value for the same (rank, step) on every push, ns."""
    return int(random.Random(step * 1_000_003 + rank).random() * scale_s * 1e9)


def _step_totals(t0_ns: int, step: int, rank: int, step_s: float) -> dict[str, tuple]:
    """Per phase (tp, dp): (count, nbytes, busy ns, first start ns, last end ns)."""
    begin = t0_ns + int((step - STEP0) * step_s * 1e9)
    j = _jitter(rank, step, 0.02 * step_s)
    tp_start = begin + int(0.05 * step_s * 1e9) + j
    tp_busy = int(0.10 * step_s * 1e9)
    dp_start = begin + int(0.70 * step_s * 1e9) + j
    dp_busy = int(0.25 * step_s * 1e9) - j  # a late rank waits less in the all-reduce
    return {"tp": (sum(n for _, n in TP_OPS), TP_BYTES * sum(n for _, n in TP_OPS), tp_busy,
                   tp_start, tp_start + tp_busy + int(0.05 * step_s * 1e9)),
            "dp": (sum(n for _, n in DP_OPS), DP_BYTES * sum(n for _, n in DP_OPS), dp_busy,
                   dp_start, dp_start + dp_busy)}


def rank_summary(layout: Layout, rank: int, *, last_done: int, t0_ns: int, step_s: float,
                 now_ns: int, host: str) -> RankSummary:
    """One rank as the agent's log tail would hold it once ``last_done`` is finished."""
    node, local = divmod(rank, layout.ranks_per_node)
    s = RankSummary(job=JOB, rank=rank, local_rank=local, host=host)
    groups = {"tp": layout.tp(rank), "dp": layout.dp(rank)}
    for pg, members, size, grank in groups.values():
        s.groups[pg] = (members, size, grank)
    done = last_done - STEP0 + 1  # steps finished since the job (as the demo job) started
    for phase, ops in (("tp", TP_OPS), ("dp", DP_OPS)):
        pg = groups[phase][0]
        calls = sum(n for _, n in ops)
        for op, n in ops:
            s.ops[(pg, op)] = OpTotals(
                count=done * n, nbytes=done * n * (TP_BYTES if phase == "tp" else DP_BYTES),
                busy_ns=int(done * n * step_s * 0.04e9), gap_ns=int(done * n * step_s * 0.2e9))
        s.last_started_seq[pg] = s.last_completed_seq[pg] = done * calls
    for step in range(last_done - PUSH_STEPS, last_done + 1):
        per = {}
        for phase, (count, nbytes, busy, first, last) in _step_totals(
                t0_ns, step, rank, step_s).items():
            per[groups[phase][0]] = StepTotals(count=count, nbytes=nbytes, closed_ns=busy,
                                               first_start_ns=first, last_end_ns=last)
        s.steps[step] = per
    s.step = last_done + 1
    s.written_ns = now_ns - int(0.5e9)
    s.last_end_ns = now_ns - int(0.1e9)
    return s


def _gpu_readings(state: NodeState, gpus: int, t_s: float) -> None:
    from ringwatch.collectors._synthetic import synthetic_gpus
    from ringwatch.collectors._types import (
        FastReading,
        HostReading,
        NicReading,
        NvLinkReading,
        SlowReading,
    )

    if gpus:
        state.set_devices(synthetic_gpus(gpus))
    for i in range(gpus):
        g = state.gpus[i]
        g.samples = int(t_s * 20)
        mono = int(t_s * 1e9)
        for k in range(5):  # a few power samples in the window: peak and min
            state.record_fast(i, FastReading(
                energy_mj=int(1e9 + t_s * 415_000), power_instant_mw=600_000 + 10_000 * k,
                power_average_mw=415_000, sm_clock_mhz=1755, memory_clock_mhz=2619),
                mono + k * 50_000_000)
        links = tuple(NvLinkReading(link=j, remote_pci_bus_id="00000000:05:00.0",
                                    tx_bytes=int(t_s * 9e9), rx_bytes=int(t_s * 9e9),
                                    crc_errors=0, replay_errors=0, recovery_errors=0)
                      for j in range(2))
        state.record_slow(i, SlowReading(
            power_limit_enforced_mw=700_000, gpu_utilization_pct=92, memory_utilization_pct=41,
            memory_used_bytes=61 << 30, memory_total_bytes=80 << 30, temperature_c=62,
            throttle_reasons_mask=0, throttle_time_ns={"power": int(t_s * 4e7), "thermal": 0},
            ecc_corrected_total=0, ecc_uncorrected_total=0, pcie_replay_total=0, nvlinks=links,
            xid_total={}))
    nic = int(t_s * 1.2e9)
    state.host_reading = HostReading(
        nics=(NicReading(name="ib0", rx_bytes=nic, tx_bytes=nic, rx_packets=nic // 4096,
                         tx_packets=nic // 4096, rx_errors=0, tx_errors=0, rx_dropped=0,
                         tx_dropped=0, up=True, speed_mbps=400_000),),
        cpu_seconds={"user": 100.0 + t_s * 12, "system": 10.0 + t_s, "idle": 1e4},
        load1=12.0, memory_total_bytes=2 << 40, memory_available_bytes=1 << 40)


@dataclass(frozen=True)
class Push:
    body: bytes
    points: int  # all of the node's points
    step_points: int  # the ringwatch.step.collective.* gauges among them


def encode_push(layout: Layout, node: int, *, last_done: int, new_steps: int, t0_ns: int,
                step_s: float, gpus: int) -> Push:
    """One node's push once ``last_done`` is finished, carrying the ``new_steps`` finished steps
    not delivered before (as ``OtlpPusher`` does: ``steps_after``)."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    host = f"node{node:04d}"
    now_ns = t0_ns + int((last_done + 1 - STEP0) * step_s * 1e9)
    state = NodeState(host=host, job=JOB, source="replay:synthetic")
    _gpu_readings(state, gpus, (now_ns - t0_ns) / 1e9 + 3600)
    sent = {}
    for local in range(layout.ranks_per_node):
        rank = node * layout.ranks_per_node + local
        state.ranks[(JOB, rank)] = rank_summary(layout, rank, last_done=last_done, t0_ns=t0_ns,
                                                step_s=step_s, now_ns=now_ns, host=host)
        sent[(JOB, rank)] = last_done - new_steps
    points = collect_points(state, now_wall_ns=now_ns, steps_after=sent)
    data = metrics_data(points, start_ns=t0_ns, now_ns=now_ns, source=state.source)
    body = encode_metrics(data).SerializeToString()
    return Push(body, len(points), sum(1 for p in points if p.spec.entity == "rank_step"))


@dataclass
class Entry:
    """One pre-encoded push and where its step labels are."""

    body: bytes
    positions: np.ndarray  # offset of each label's first digit
    steps: np.ndarray  # the label's step

    @classmethod
    def of(cls, body: bytes) -> Entry:
        pos = np.array([m.end() for m in _STEP_KEY.finditer(body)], dtype=np.int64)
        steps = np.array([int(body[p:p + DIGITS]) for p in pos], dtype=np.int64)
        return cls(body, pos, steps)

    def moved(self, shift: int) -> bytes:
        """The body with every step label ``shift`` steps on (same width)."""
        if shift == 0 or not len(self.positions):
            return self.body
        new = self.steps + shift
        if new.max() >= 10 ** DIGITS or new.min() < 10 ** (DIGITS - 1):
            raise OverflowError("step labels out of 6 digits: lower --seconds")
        buf = np.frombuffer(self.body, dtype=np.uint8).copy()
        digits = (new[:, None] // _POW10[None, :]) % 10 + 48
        buf[self.positions[:, None] + np.arange(DIGITS)[None, :]] = digits.astype(np.uint8)
        return buf.tobytes()


@dataclass
class Pool:
    """Every node's pushes for one job size."""

    layout: Layout
    pool: list[list[Entry]]  # [node][i]: finished steps up to first + i * steps_per_push
    steps_per_push: int
    catch_up: list[Entry]  # [node]: a push of PUSH_STEPS new steps, moved for the prefill
    prefill_shifts: list[int]
    points_per_push: float  # per node, median over the pool
    step_points_per_push: float
    body_bytes: float
    build_s: float

    @property
    def period(self) -> int:
        return len(self.pool[0]) * self.steps_per_push

    def body(self, node: int, round_: int) -> bytes:
        """Round ``round_`` (0-based, after the prefill) of ``node``."""
        k = len(self.pool[node])
        return self.pool[node][round_ % k].moved((round_ // k) * self.period)

    def prefill_body(self, node: int, i: int) -> bytes:
        return self.catch_up[node].moved(self.prefill_shifts[i])

    def points_per_rank(self, new_steps: float) -> float:
        """P: points a rank sends in a push carrying ``new_steps`` new steps (its share of
        the node's GPU, host and agent series included)."""
        rpn = self.layout.ranks_per_node
        fixed = (self.points_per_push - self.step_points_per_push) / rpn
        per_step = self.step_points_per_push / rpn / self.steps_per_push
        return fixed + min(new_steps, PUSH_STEPS) * per_step


def build_pool(layout: Layout, *, pool: int, steps_per_push: int, prefill_steps: int,
               step_s: float, gpus: int, max_bytes: int) -> Pool:
    """Encode every node's pushes (the slow part: the agent's own encoding, 10-100 ms a push).

    Entry ``i`` of a node's pool has the steps up to ``first + i * steps_per_push`` finished
    and carries the last ``steps_per_push`` of them; the prefill moves one push of 32 new steps
    back, so that before the pool the service has seen ``prefill_steps`` steps of every rank.
    """
    t_build = time.perf_counter()
    t0_ns = time.time_ns() - int(3600e9)
    n_pre = max(1, math.ceil(prefill_steps / PUSH_STEPS))
    base = STEP0 + n_pre * PUSH_STEPS - 1  # last step of the prefill (its first: STEP0)
    first = base + steps_per_push  # last finished step of pool entry 0
    shifts = [-PUSH_STEPS * (n_pre - 1 - j) for j in range(n_pre)]
    common = {"t0_ns": t0_ns, "step_s": step_s, "gpus": gpus}
    probe = encode_push(layout, 0, last_done=first, new_steps=steps_per_push, **common)
    k = max(1, min(pool, max_bytes // max(1, layout.nodes * len(probe.body))))
    main, catch_up, pushes = [], [], []
    for node in range(layout.nodes):
        push = encode_push(layout, node, last_done=base, new_steps=PUSH_STEPS, **common)
        catch_up.append(Entry.of(push.body))
        main.append([])
        for i in range(k):
            push = encode_push(layout, node, last_done=first + i * steps_per_push,
                               new_steps=steps_per_push, **common)
            main[-1].append(Entry.of(push.body))
            pushes.append(push)
    return Pool(layout, main, steps_per_push, catch_up, shifts,
                statistics.median(p.points for p in pushes),
                statistics.median(p.step_points for p in pushes),
                statistics.median(len(p.body) for p in pushes), time.perf_counter() - t_build)


# --- the service ---------------------------------------------------------------------------

"""The node's state as data points of :data:`ringwatch._metrics.METRICS`.

Both exporters start here, so ``/metrics`` and OTLP always carry the same series. A point is
``(spec, resource labels, point labels, value in base units)``; labels are tuples of
``(prometheus name, value)`` pairs. A reading that is ``None`` gives no point.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import NamedTuple

from ringwatch._metrics import METRICS, MetricSpec
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._power_window import phase_figures, window_figures
from ringwatch.agent.sidecar._rank_tail import KEEP_STEPS, completed_steps
from ringwatch.agent.sidecar._step_work import finished_work

#: Finished steps of each rank a push may carry: the ones not yet sent, up to this many (a
#: collector down for fewer steps than this loses none of them). The agent pushes early when
#: :data:`EARLY_PUSH_STEPS` wait (``_otlp_export.OtlpPusher.due``), at most once a second, so
#: that a job of up to ~60 steps a second (its logs read every 2 s) loses none either.
PUSH_STEPS = KEEP_STEPS // 2
#: Finished steps of one rank waiting to be sent that make the next push come early.
EARLY_PUSH_STEPS = 32


class Point(NamedTuple):
    spec: MetricSpec
    resource: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    value: float


_BY_ENTITY: dict[str, list[MetricSpec]] = defaultdict(list)
for _spec in METRICS:
    _BY_ENTITY[_spec.entity].append(_spec)


def _fields(obj) -> dict:
    return {} if obj is None else {f: getattr(obj, f) for f in obj.__slots__}


def _emit(out: list, entity: str, resource: tuple, labels: dict, values: dict) -> None:
    for spec in _BY_ENTITY[entity]:
        v = values.get(spec.field)
        if v is None:
            continue
        base = {**{k: labels.get(k, "") for k in spec.labels}, **spec.const_labels}
        if isinstance(v, dict):
            for key, item in v.items():
                if item is not None:
                    lab = tuple(sorted({**base, spec.key_label: str(key)}.items()))
                    out.append(Point(spec, resource, lab, float(item) * spec.scale))
        else:
            out.append(Point(spec, resource, tuple(sorted(base.items())),
                             float(v) * spec.scale))


def unsent_steps(state: NodeState, steps_after: dict) -> int:
    """The most finished steps any rank has that no push delivered yet (``steps_after`` as
    :func:`collect_points` takes it)."""
    most = 0
    for s in list(state.ranks.values()):
        if s.step is None:
            continue
        done = steps_after.get((s.job, s.rank), -1)
        most = max(most, sum(1 for k in list(s.steps) if done < k < s.step))
    return most


def _gpu_rank(state: NodeState) -> dict[int, tuple[str, int]]:
    """GPU index -> (job, rank) where exactly one live rank has that local rank. Where some
    ranks' logs name this host, only those count: the others ran on other hosts sharing the
    log folder (their local ranks are other machines' GPUs)."""
    by_local: dict[int, list] = defaultdict(list)
    here = [s for s in state.ranks.values() if s.host == state.host]
    for s in here or state.ranks.values():
        if s.local_rank is not None:
            by_local[s.local_rank].append((s.job, s.rank))
    return {k: v[0] for k, v in by_local.items() if len(v) == 1}


def collect_points(state: NodeState, *, now_wall_ns: int | None = None,
                   steps_after: dict | None = None) -> list[Point]:
    """Every point of the node now.

    Args:
        state: The node's state.
        now_wall_ns: Wall clock the ages are measured to.
        steps_after: ``(job, rank) -> step`` already delivered: only later finished steps
            are given (the OTLP stream); None gives no per-step points (``/metrics``).
    """
    now = time.time_ns() if now_wall_ns is None else now_wall_ns
    out: list[Point] = []
    host = state.host
    with state.lock:
        gpus = list(state.gpus.values())
        ranks = list(state.ranks.values())
        errors = dict(state.errors)
        late = state.late_ticks
    gpu_rank = _gpu_rank(state)
    with state.lock:  # the ranks that have a GPU here: their collectives split its power
        mapped = {gpu_rank[g.identity.index] for g in gpus if g.identity.index in gpu_rank}
        rank_comm = {(s.job, s.rank): s.recent.array() for s in ranks
                     if (s.job, s.rank) in mapped}
    source = state.source
    for g in gpus:
        ident = g.identity
        job, rank = gpu_rank.get(ident.index, (state.job, None))
        res = (("gpu", str(ident.index)), ("host", host), ("job", job),
               ("rank", "" if rank is None else str(rank)), ("uuid", ident.uuid))
        peak, low = g.power_extremes_mw()
        values = {**_fields(ident), **_fields(g.slow), **_fields(g.fast),
                  "power_peak_mw": peak, "power_min_mw": low, "samples": g.samples, "info": 1,
                  **window_figures(g.window, g.slow.power_limit_enforced_mw if g.slow
                                   else None)}
        if rank is not None and (job, rank) in rank_comm:
            values.update(phase_figures(g.energy, rank_comm[(job, rank)]))
        info = {"name": ident.name, "pci_bus_id": ident.pci_bus_id or "",
                "driver": ident.driver_version or "",
                "mig": "" if ident.mig_enabled is None else str(ident.mig_enabled).lower(),
                "source": source}
        _emit(out, "gpu", res, info, values)
        for link in (g.slow.nvlinks if g.slow else ()):
            _emit(out, "nvlink", res, {"link": str(link.link),
                                       "remote": link.remote_pci_bus_id or ""}, _fields(link))
    node_res = (("host", host), ("job", state.job))
    h = state.host_reading
    if h is not None:
        _emit(out, "host", node_res, {}, _fields(h))
        for nic in h.nics:
            _emit(out, "nic", node_res, {"device": nic.name}, _fields(nic))
        for port in h.ib_ports:
            values = {**_fields(port), "active": None if port.state is None
                      else port.state.upper() == "ACTIVE"}
            _emit(out, "ib", node_res, {"device": port.device, "port": str(port.port)}, values)
    for s in ranks:  # a rank's host is the one its log names (RINGWATCH_HOST, or the machine)
        res = (("host", s.host or host), ("job", s.job), ("rank", str(s.rank)))
        for (pg, op), t in s.ops.items():
            _emit(out, "rank_op", res, {"pg": pg, "op": op}, _fields(t))
        first_op = "" if s.first_p2p is None else s.first_p2p[1]
        for peer, n in list(s.p2p.items()):  # the tail thread may add one meanwhile
            _emit(out, "rank_p2p", res, {"peer": str(peer), "first_op": first_op},
                  {"count": n})
        for pg in s.last_started_seq.keys() | s.last_completed_seq.keys():
            _emit(out, "rank_pg", res, {"pg": pg},
                  {"last_started_seq": s.last_started_seq.get(pg),
                   "last_completed_seq": s.last_completed_seq.get(pg)})
        done = -1 if steps_after is None else steps_after.get((s.job, s.rank), -1)
        named = set()  # a group's member list rides on its first point of the push only
        for step, pg, t in completed_steps(s, PUSH_STEPS) if steps_after is not None else ():
            if step <= done:
                continue
            members, size, grank = s.groups.get(pg, ("", 0, 0))
            if pg in named:
                members = ""
            named.add(pg)
            _emit(out, "rank_step", res, {"pg": pg, "step": str(step), "pg_ranks": members,
                                          "pg_size": str(size), "group_rank": str(grank)},
                  {"count": t.count, "nbytes": t.nbytes, "busy_ns": t.busy_ns,
                   "first_start_ns": t.first_start_ns, "last_end_ns": t.last_end_ns})
        done = -1 if steps_after is None else steps_after.get((s.job, s.rank, "work"), -1)
        for step, step_ns, blocked, recv in finished_work(dict(s.work), PUSH_STEPS) \
                if steps_after is not None else ():
            if step > done:
                _emit(out, "rank_work", res, {"step": str(step)},
                      {"step_ns": step_ns, "blocked_ns": blocked})
                for peer, (n, nbytes, ns) in list(recv.items()):
                    _emit(out, "rank_recv", res, {"step": str(step), "peer": str(peer)},
                          {"count": n, "nbytes": nbytes, "duration_ns": ns})
        pg, op, since = s.pending or ("", "", now)
        _emit(out, "rank", res, {"pg": pg, "pending_op": op},
              {"pending_ns": max(0, now - since), "step": s.step,
               "log_age_ns": None if s.written_ns is None else max(0, now - s.written_ns)})
    cpu = os.times()
    _emit(out, "agent", node_res, {}, {"errors": errors, "late_ticks": late,
                                       "cpu_ns": int((cpu.user + cpu.system) * 1e9)})
    return out

"""GPU-shaped pipeline rows, and rows that do not say which ops were asynchronous.

The rows are real 8-rank dp x tp x pp runs (``tests/data/pipeline/``: 1F1B over send/recv on
Gloo, faults injected), re-timed as a GPU job reports them (:func:`fakes.gpu_shaped`: device
durations, host ends 10-100 ms late from the NCCL watchdog, launches ahead of the device), or
stripped of ``async_op`` as profiler traces and Flight Recorder dumps give them. A pipeline's
verdicts come from each rank's unblocked time (``analyzers/_work.py``); read through the
watchdog's ends it was noise, and a stage with no unblocked time at all crashed the analysis.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_events
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._timing import HOST_TIMED, with_analysis_durations

from fakes import gpu_shaped

DATA = Path(__file__).resolve().parents[1] / "data" / "pipeline"
RUNS = ["healthy", "laststage", "varyseq", "strag-mid", "strag-0", "strag-ends", "pp4-strag",
        "pp4-varyseq", "pp4-loaded", "loaded-burst"]
FAULTS = ("straggler", "hang", "slow_link")


def _verdict(ev: pl.DataFrame, now: int) -> list[tuple]:
    return [(f.kind, f.cls, f.ranks, f.since_step)
            for f in split_hiccups(analyze_events(ev, now_ns=now))[0]]


def _same(got: list[tuple], want: list[tuple]) -> bool:
    """The same findings (kind, class, ranks), onsets within a step."""
    return len(got) == len(want) and all(
        g[:3] == w[:3] and abs(g[3] - w[3]) <= 1 for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module", params=RUNS)
def run(request):
    ev = pl.read_parquet(DATA / f"{request.param}.parquet")
    now = int(ev["t_end_ns"].max()) + 200_000_000
    return ev, now, _verdict(ev, now)


@pytest.mark.parametrize("seed", [0, 1])
def test_watchdog_late_ends_with_device_durations_give_the_same_verdicts(run, seed):
    # a host that waits for the device once a step (the loss, the optimizer) launches the
    # step's first op close to it; the rest run up to 20 ms ahead
    ev, now, exact = run
    gpu = with_analysis_durations(gpu_shaped(ev, seed=seed, first_lead_ms=1))
    assert _same(_verdict(gpu, now), exact), (_verdict(gpu, now), exact)


def test_launches_far_ahead_still_name_the_same_faults(run):
    # every launch up to 20 ms ahead of the device, the step's first too: the step's edges
    # blur by as much; a workload imbalance may be lost in that, never a fault named wrong
    ev, now, exact = run
    got = _verdict(with_analysis_durations(gpu_shaped(ev, seed=2)), now)
    assert [f[:3] for f in got if f[0] in FAULTS] == [f[:3] for f in exact if f[0] in FAULTS]


def test_rows_that_do_not_say_what_was_asynchronous_give_the_same_verdicts(run):
    # a receive or a collective blocks, a send does not: what the job did here
    ev, now, exact = run
    assert _verdict(ev.drop("async_op"), now) == exact
    assert _verdict(ev.with_columns(pl.lit(None, pl.Boolean).alias("async_op")), now) == exact


def test_watchdog_ends_alone_give_no_unblocked_time_to_misread():
    # no device timing: no blocked time can be told, so every rank's work is its step, alike
    # on every rank of a stage: no straggler, no imbalance, and no crash
    ev = pl.read_parquet(DATA / "strag-mid.parquet")
    blind = with_analysis_durations(gpu_shaped(ev, device=False))
    now = int(ev["t_end_ns"].max()) + 200_000_000
    assert [v for v in _verdict(blind, now) if v[0] in ("straggler", "imbalance")] == []


def test_only_rows_not_timed_by_the_host_are_marked():
    ev = pl.read_parquet(DATA / "healthy.parquet")
    exact = with_analysis_durations(ev.with_columns(
        pl.lit(None, pl.Int64).alias("device_duration_ns"), pl.lit("wait").alias("end_source")))
    assert HOST_TIMED not in exact.columns  # every row timed by the host: no column
    gpu = with_analysis_durations(gpu_shaped(ev))
    assert gpu[HOST_TIMED].sum() == 0


def test_the_what_if_replay_stands_aside_on_device_timed_rows():
    # the replay runs on host intervals; launches ahead and watchdog ends are none
    ev = pl.read_parquet(DATA / "strag-mid.parquet")
    now = int(ev["t_end_ns"].max()) + 200_000_000
    (f,) = split_hiccups(analyze_events(with_analysis_durations(
        gpu_shaped(ev, first_lead_ms=1)), now_ns=now))[0]
    line = next(e for e in f.evidence if "with this rank working like its peers" in e)
    assert "replay" not in line and "if every rank waits for all of it" in line


def _as_nccl_traces(ev: pl.DataFrame, folder: Path) -> Path:
    """The run written as the profiler writes an NCCL job: per rank, one trace of its NCCL
    kernels (the rows' times as device times, with the collective's metadata), the launches
    (``record_param_comms``) just before them and ``ProfilerStep#N`` spans. Nothing says
    which ops were asynchronous."""
    import gzip
    import json

    base = int(ev["t_start_ns"].min())
    groups = ev.select("pg", "pg_ranks").unique().sort("pg")

    def ranks(spec: str) -> list[int]:
        out = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
        return out

    pg_config = [{"pg_name": pg, "pg_desc": f"pg{pg}", "backend_config": "cuda:nccl",
                  "pg_size": len(ranks(spec)), "ranks": ranks(spec)}
                 for pg, spec in groups.iter_rows()]
    folder.mkdir(parents=True)
    for (rank,), mine in ev.sort("idx").partition_by("rank", as_dict=True).items():
        us = lambda ns: (ns - base) / 1e3
        events = []
        firsts = mine.group_by("step").agg(pl.col("t_start_ns").min()).sort("step").rows()
        for (step, t0), (_, t1) in zip(firsts, firsts[1:], strict=False):
            events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{step}",
                           "pid": 1, "tid": 1, "ts": us(t0) - 0.5, "dur": us(t1) - us(t0),
                           "args": {}})
        for i, r in enumerate(mine.iter_rows(named=True)):
            op = {"all_reduce": "allreduce"}.get(r["op"], r["op"])
            meta = {"Collective name": op, "Process Group Name": r["pg"],
                    "Process Group Ranks": str(ranks(r["pg_ranks"])),
                    "Group size": r["pg_size"], "Seq": r["seq"], "dtype": "Float",
                    "In msg nelems": (r["nbytes"] or 0) // 4,
                    "Out msg nelems": (r["nbytes"] or 0) // 4}
            if op == "send":
                meta["Dst Rank"] = r["peer"]
            elif op == "recv":
                meta["Src Rank"] = r["peer"]
            start, dur = us(r["t_start_ns"]), (r["t_end_ns"] - r["t_start_ns"]) / 1e3
            events += [{"ph": "X", "cat": "cpu_op", "name": "record_param_comms", "pid": 1,
                        "tid": 1, "ts": start - 0.2, "dur": 0.1,
                        "args": {"External id": i + 1, **meta}},
                       {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_Generic(x)",
                        "pid": 0, "tid": 7, "ts": start, "dur": dur,
                        "args": {"External id": i + 1, "correlation": i + 1}}]
        doc = {"schemaVersion": 1, "baseTimeNanoseconds": base,
               "host_name": mine["host"][0], "traceName": "x",
               "distributedInfo": {"backend": "nccl", "rank": int(rank),
                                   "world_size": ev["rank"].n_unique(),
                                   "pg_count": len(pg_config), "pg_config": pg_config},
               "traceEvents": events}
        (folder / f"rank{rank}.pt.trace.json.gz").write_bytes(
            gzip.compress(json.dumps(doc).encode()))
    return folder


@pytest.mark.parametrize("name", ["strag-mid", "laststage", "healthy"])
def test_a_pipeline_jobs_nccl_profiler_traces_give_the_logs_verdict(tmp_path, name):
    # the same run as an NCCL job's profiler traces: device times, no async flag
    from ringwatch._analyze import analyze_job
    from ringwatch.inputs import open_sources

    ev = pl.read_parquet(DATA / f"{name}.parquet")
    opened = open_sources([str(_as_nccl_traces(ev, tmp_path / "traces"))])
    (src,) = opened.sources
    report = analyze_job(src)
    assert report["layout"]["text"].startswith("dp=2 x tp=2 x pp=2"), report["layout"]
    got = [(f.kind, f.cls, f.ranks, f.since_step) for f in report["_findings"]]
    want = _verdict(ev, int(ev["t_end_ns"].max()))
    assert _same(got, want), (got, want)

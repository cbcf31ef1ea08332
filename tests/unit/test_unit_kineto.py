"""Profiler traces as input of ``ringwatch analyze``: real Gloo traces (tests/data/kineto)
and hand-written NCCL traces for what only a GPU writes (kernels with collective metadata,
ranks lists cut to 30, ids past int64) and damaged files."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import ANALYZED_COLUMNS, analyze_job
from ringwatch._schema import OPS, polars_schema
from ringwatch.inputs import HEAD_BYTES, open_sources
from ringwatch.inputs._gloo_groups import Unmapped, resolve, thread_runs
from ringwatch.inputs._kineto import READER, op_of, parse_ranks_arg, read_rank_trace, sniff
from ringwatch.inputs._trace_scan import scan_trace

DATA = Path(__file__).resolve().parents[1] / "data" / "kineto"
BASE_NS = 1_790_000_000_000_000_000


def _only(paths) -> object:
    opened = open_sources([str(p) for p in paths])
    assert len(opened.sources) == 1, (opened.sources, opened.unreadable)
    return opened.sources[0]


def test_real_ddp_traces_read_as_the_schema():
    src = _only([DATA / "gloo-ddp-2ranks"])
    assert src.kind == "profiler traces" and sorted(src.ranks) == [0, 1]
    assert src.problems == []
    ev = src.events()
    assert ev.schema == pl.Schema(polars_schema())
    assert set(ev["op"]) <= set(OPS) and set(ev["backend"]) == {"gloo"}
    # the same collectives, in the same order, on both ranks (seq agrees)
    per_rank = [ev.filter(pl.col("rank") == r).sort("idx") for r in (0, 1)]
    assert per_rank[0]["seq"].to_list() == per_rank[1]["seq"].to_list() == list(range(1, 7))
    assert per_rank[0]["op"].to_list() == per_rank[1]["op"].to_list()
    # steps from ProfilerStep#0-3: one gradient all-reduce in each
    ar = ev.filter(pl.col("op") == "all_reduce")
    assert sorted(ar.filter(pl.col("rank") == 0)["step"].to_list()) == [0, 1, 2, 3]
    # host issue before the worker thread's start, which is before the end; wall clock
    assert (ev["t_issue_ns"] <= ev["t_start_ns"]).all()
    assert (ev["t_start_ns"] < ev["t_end_ns"]).all()
    assert (ev["t_start_ns"] > BASE_NS).all()
    assert (ev["duration_ns"] == ev["t_end_ns"] - ev["t_start_ns"]).all()
    # the model's 2 layers of 32x32 + 32: the gradient bucket's floats, as recorded shapes
    assert set(ar["numel"]) == {2 * (32 * 32 + 32)} and set(ar["nbytes"]) == {8448}
    assert set(ev["pg_ranks"]) == {"0-1"} and set(ev["pg_desc"]) == {"default_pg"}
    assert src.last_write_ns()[0] >= ev.filter(pl.col("rank") == 0)["t_end_ns"].max()


def test_two_gloo_groups_are_told_apart_by_their_worker_threads():
    ev = _only([DATA / "gloo-2groups-2ranks"]).events()
    for rank in (0, 1):
        mine = ev.filter(pl.col("rank") == rank).sort("idx")
        assert mine.filter(pl.col("pg") == "1")["op"].to_list() == ["all_reduce"] * 3
        assert mine.filter(pl.col("pg") == "0")["op"].to_list() == [
            "all_reduce", "all_gather"] * 3
        assert mine.filter(pl.col("pg") == "1")["pg_desc"].to_list() == ["other"] * 3
    # all_gather of 10 floats from 2 ranks: 40 bytes in, 80 out
    ag = ev.filter(pl.col("op") == "all_gather")
    assert set(ag["nbytes_in"]) == {40} and set(ag["nbytes_out"]) == {80}


def test_gloo_groups_of_a_dp_by_tp_job_are_told_apart_across_ranks():
    """dp x tp on 4 ranks: each rank has the world, a tp and a dp group, but only two groups'
    worker threads in its trace (the world was idle): the ranks' traces together say so."""
    src = _only([DATA / "gloo-tp2-4ranks"])
    assert src.problems == []
    ev = src.events()
    got = {(r, pg): (desc, ranks, ops, n) for r, pg, desc, ranks, ops, n in ev.group_by(
        "rank", "pg", "pg_desc", "pg_ranks").agg(pl.col("op").unique().sort(), pl.len())
        .iter_rows()}
    for rank in range(4):
        tp, dp = rank // 2, rank % 2
        assert got[(rank, str(1 + tp))] == (f"tp{tp}", f"{2 * tp}-{2 * tp + 1}",
                                            ["all_reduce"], 3)
        assert got[(rank, str(3 + dp))] == (f"dp{dp}", f"{dp},{dp + 2}",
                                            ["all_reduce", "broadcast"], 5)
    assert len(got) == 8  # nothing on the world group
    # the members of each group agree on what they did, in order
    for pg in ("1", "2", "3", "4"):
        per = [g.sort("seq")["op"].to_list() for _, g in ev.filter(pl.col("pg") == pg)
               .group_by("rank")]
        assert len(per) == 2 and per[0] == per[1]


def test_gloo_threads_that_no_answer_maps_are_a_problem_not_rows():
    a = Counter({("all_reduce", 4): 3})
    b = Counter({("all_reduce", 8): 3})
    world = {"pg_name": "0", "ranks": [0, 1]}
    g1 = {"pg_name": "1", "ranks": [0, 1]}
    g2 = {"pg_name": "2", "ranks": [0, 1]}
    one = [Unmapped(r, [(10, 11)], [world, g1, g2], [a]) for r in (0, 1)]
    assert resolve(one, set()) is None  # any of the three could be the busy one
    assert resolve(one, {"1"}) == {r: {10: g1, 11: g1} for r in (0, 1)}  # busy elsewhere: 1
    two = [Unmapped(r, [(10, 11), (20, 21)], [world, g1, g2], [a, b]) for r in (0, 1)]
    assert resolve(two, set()) is None  # the idle one could be any of the three
    # dp x tp: only the world left idle gives every rank as many groups as thread runs
    world4 = {"pg_name": "0", "ranks": [0, 1, 2, 3]}
    tp = [{"pg_name": f"tp{i}", "ranks": [2 * i, 2 * i + 1]} for i in (0, 1)]
    dp = [{"pg_name": f"dp{i}", "ranks": [i, i + 2]} for i in (0, 1)]
    four = [Unmapped(r, [(10 * r, 10 * r + 1), (10 * r + 5, 10 * r + 6)],
                     [world4, tp[r // 2], dp[r % 2]], [a, b]) for r in range(4)]
    maps = resolve(four, set())
    assert {r: sorted({g["pg_name"] for g in m.values()}) for r, m in maps.items()} == {
        0: ["dp0", "tp0"], 1: ["dp1", "tp0"], 2: ["dp0", "tp1"], 3: ["dp1", "tp1"]}
    assert maps[3][30] is tp[1] and maps[3][35] is dp[1]
    disagree = four[:3] + [Unmapped(3, four[3].runs, four[3].groups, [b, a])]
    assert resolve(disagree, set()) is None
    assert thread_runs([4853, 4816, 4814, 4854, 4816]) == [(4814, 4816), (4853, 4854)]


def test_gloo_spans_without_an_answer_are_named_in_problems(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    shutil.copy(DATA / "gloo-tp2-4ranks" / "rank-0.json.gz", folder)
    # one rank alone: world idle, or tp0, or dp0? its trace cannot say
    src = open_sources([str(folder)]).sources[0]
    assert src.events().height == 0 and src.ranks == {}
    assert len(src.problems) == 1 and "cannot be told apart" in src.problems[0], src.problems
    assert analyze_job(src)["findings"] == []


def test_analyze_runs_on_real_traces_without_findings():
    report = analyze_job(_only([DATA / "gloo-ddp-2ranks"]))
    assert report["kind"] == "profiler traces" and report["ranks"] == [0, 1]
    assert report["collectives"] == 12 and report["findings"] == []


def test_events_serves_columns_as_the_logs_do():
    src = _only([DATA / "gloo-ddp-2ranks"])
    ev = src.events(columns=list(ANALYZED_COLUMNS), categorical=True)
    assert ev.columns == [c for c in polars_schema() if c in {"rank", "idx", *ANALYZED_COLUMNS}]
    assert ev.schema["op"] == pl.Categorical
    with pytest.raises(ValueError, match="not columns"):
        src.events(columns=["nope"])


# --- hand-written traces: what NCCL on a GPU writes ---------------------------------------


def _kernel(ts_us: float, dur_us: float, ext: int, **args) -> dict:
    return {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL(x)",
            "pid": 0, "tid": 7, "ts": ts_us, "dur": dur_us,
            "args": {"External id": ext, "correlation": ext, **args}}


def _rpc(ts_us: float, ext: int, **args) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": "record_param_comms", "pid": 100, "tid": 100,
            "ts": ts_us, "dur": 5.0, "args": {"External id": ext, **args}}


def _meta(n: int, ranks: str, size: int, seq: int, **extra) -> dict:
    return {"Collective name": "allreduce", "In msg nelems": n, "Out msg nelems": n,
            "Group size": size, "dtype": "Float", "Process Group Name": "0",
            "Process Group Description": "default_pg", "Process Group Ranks": ranks,
            "Seq": seq, **extra}


def _trace(rank: int | None, events: list[dict], *, world: int = 2,
           pg_ranks: list[int] | None = None) -> dict:
    doc = {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "NVIDIA H200"}]}
    if rank is not None:
        doc["distributedInfo"] = {
            "backend": "nccl", "rank": rank, "world_size": world, "pg_count": 1,
            "pg_config": [{"pg_name": "0", "pg_desc": "default_pg", "backend_config":
                           "cuda:nccl", "pg_size": world,
                           "ranks": pg_ranks if pg_ranks is not None else list(range(world))}]}
    doc.update({"host_name": f"node{rank}", "baseTimeNanoseconds": BASE_NS,
                "traceEvents": events, "traceName": "x"})
    return doc


def _write(path: Path, doc: dict, *, gz: bool = True, text: str | None = None) -> Path:
    data = (text if text is not None else json.dumps(doc, indent=1)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _nccl_job(tmp_path: Path, world: int = 2, steps: int = 3, late: int | None = None,
              ranks_arg=None, pg_ranks=None, huge: bool = False) -> Path:
    """``world`` ranks, one all-reduce of 1M floats per step; from the middle step on, rank
    ``late`` launches its kernel 30 ms after the others, who wait (their kernels last 30 ms
    longer)."""
    folder = tmp_path / "job"
    ranks_arg = ranks_arg or str(list(range(world)))
    for r in range(world):
        events = []
        for s in range(steps):
            t0 = 1_000_000.0 + s * 100_000.0
            slow = r == late and s >= steps // 2
            events.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{s}",
                           "pid": 100, "tid": 100, "ts": t0, "dur": 99_000.0,
                           "args": {"External id": s}})
            ext = (1 << 70) + s if huge else 1000 + s  # ids past int64 (seen in the wild)
            issue = t0 + 40_000.0 + (30_000.0 if slow else 0.0)
            end = t0 + 40_000.0 + 30_000.0 + 1_000.0
            events.append(_rpc(issue, ext, **_meta(1 << 20, ranks_arg, world, s + 1)))
            events.append(_kernel(issue + 10.0, end - issue - 10.0, ext,
                                  **_meta(1 << 20, ranks_arg, world, s + 1)))
        _write(folder / f"rank{r}.pt.trace.json.gz", _trace(r, events, world=world,
                                                             pg_ranks=pg_ranks))
    return folder


def test_nccl_kernels_with_their_metadata(tmp_path):
    src = _only([_nccl_job(tmp_path)])
    ev = src.events().sort("rank", "idx")
    assert src.problems == []
    assert ev.height == 6 and set(ev["backend"]) == {"nccl"} and set(ev["op"]) == {"all_reduce"}
    assert ev.filter(pl.col("rank") == 0)["seq"].to_list() == [1, 2, 3]
    assert ev.filter(pl.col("rank") == 0)["step"].to_list() == [0, 1, 2]
    assert set(ev["nbytes"]) == {4 << 20} and set(ev["dtype"]) == {"float32"}
    first = ev.row(0, named=True)
    # the kernel's device times; the launch (record_param_comms) as the host issue
    assert first["t_start_ns"] == BASE_NS + 1_040_010_000
    assert first["t_issue_ns"] == BASE_NS + 1_040_000_000
    # 71 ms - 40 ms - 10 µs
    assert first["device_duration_ns"] == first["duration_ns"] == 30_990_000
    assert set(ev["host"]) == {"node0", "node1"}


def test_ids_past_int64_are_read_and_kept_out_of_the_columns(tmp_path):
    ev = _only([_nccl_job(tmp_path, huge=True)]).events()
    assert ev.height == 6 and ev["t_issue_ns"].min() == BASE_NS + 1_040_000_000


def test_a_late_rank_is_the_straggler_from_kernels(tmp_path):
    report = analyze_job(_only([_nccl_job(tmp_path, world=4, steps=30, late=2)]))
    stragglers = [f for f in report["_findings"] if f.kind == "straggler"]
    assert [f.ranks for f in stragglers] == [(2,)], report["findings"]


def test_ranks_cut_to_30_are_rebuilt_from_distributed_info(tmp_path):
    world = 40
    cut = "[" + ", ".join(str(r) for r in range(30)) + ", ...]"
    ev = _only([_nccl_job(tmp_path, world=world, steps=1, ranks_arg=cut)]).events()
    assert ev.height == world and set(ev["pg_ranks"]) == {"0-39"}
    assert set(ev["pg_size"]) == {40}
    assert sorted(ev["group_rank"]) == list(range(40))


def test_ranks_cut_and_not_listed_use_start_and_stride_or_are_a_problem(tmp_path):
    cut = "[" + ", ".join(str(2 * r) for r in range(30)) + ", ...]"
    with_stride = _meta(8, cut, 40, 1, **{"Global rank start": 0, "Global rank stride": 2})
    k = _kernel(10.0, 5.0, 1, **with_stride)
    _write(tmp_path / "a" / "rank4.json.gz", _trace(4, [k], world=80, pg_ranks=[4, 5]))
    ev = _only([tmp_path / "a"]).events()
    assert ev["pg_ranks"].to_list() == ["0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32,34,36,"
                                        "38,40,42,44,46,48,50,52,54,56,58,60,62,64,66,68,70,"
                                        "72,74,76,78"]
    assert ev["group_rank"].to_list() == [2]
    odd = "[0, 1, 5, 6, ...]"
    k = _kernel(10.0, 5.0, 1, **_meta(8, odd, 40, 1))
    _write(tmp_path / "b" / "rank5.json.gz", _trace(5, [k], world=80, pg_ranks=[5, 6]))
    src = open_sources([str(tmp_path / "b")]).sources[0]
    assert src.events().height == 0
    assert any("cut short" in p for p in src.problems), src.problems


def test_parse_ranks_arg():
    assert parse_ranks_arg("[0, 1, 2]") == ([0, 1, 2], False)
    assert parse_ranks_arg([3, 4]) == ([3, 4], False)
    assert parse_ranks_arg("[0, 1, ...]") == ([0, 1], True)
    assert parse_ranks_arg("[0, x]") == (None, False)
    assert parse_ranks_arg(None) == (None, False)


def test_op_names():
    assert op_of("allreduce") == "all_reduce" and op_of("gloo:all_reduce") == "all_reduce"
    assert op_of("c10d::_allgather_base_") == "all_gather_into_tensor"
    assert op_of("_reduce_scatter_base") == "reduce_scatter_tensor"
    assert op_of("c10d::recv_any_source_") == "recv" and op_of("what") == "unknown"


# --- damaged and foreign files --------------------------------------------------------------


def test_missing_fields_are_counted_not_fatal(tmp_path):
    good = _kernel(10.0, 5.0, 1, **_meta(8, "[0, 1]", 2, 1))
    no_ts = _kernel(20.0, 5.0, 2, **_meta(8, "[0, 1]", 2, 2))
    del no_ts["ts"]
    no_meta = _kernel(30.0, 5.0, 3)  # a kernel named nccl* with no collective metadata
    bad_dur = _kernel(40.0, -1.0, 4, **_meta(8, "[0, 1]", 2, 3))
    no_args = {"ph": "X", "cat": "kernel", "name": "nccl_x", "ts": 50.0, "dur": 1.0}
    _write(tmp_path / "j" / "rank0.json.gz", _trace(0, [good, no_ts, no_meta, bad_dur,
                                                       no_args]))
    src = _only([tmp_path / "j"])
    assert src.events().height == 1
    assert any("2 collective event(s) without a usable ts/dur" in p for p in src.problems)


def test_rank_from_the_file_name_without_distributed_info(tmp_path):
    k = _kernel(10.0, 5.0, 1, **_meta(8, "[0, 1, 2, 3]", 4, 1))
    _write(tmp_path / "j" / "trace_rank-3.json", _trace(None, [k]), gz=False)
    src = _only([tmp_path / "j"])
    assert list(src.ranks) == [3] and src.events()["group_rank"].to_list() == [3]
    _write(tmp_path / "k" / "trace.json", _trace(None, [k]), gz=False)
    src = open_sources([str(tmp_path / "k")]).sources[0]
    assert src.ranks == {} and "no rank" in src.problems[0]


def test_a_rank_twice_is_read_once(tmp_path):
    k = _kernel(10.0, 5.0, 1, **_meta(8, "[0, 1]", 2, 1))
    _write(tmp_path / "j" / "a.json.gz", _trace(0, [k]))
    _write(tmp_path / "j" / "b.json.gz", _trace(0, [k]))
    src = _only([tmp_path / "j"])
    assert src.events().height == 1 and any("rank 0 again" in p for p in src.problems)


def test_corrupted_and_truncated_files_are_problems_with_what_came_before(tmp_path):
    folder = tmp_path / "j"
    shutil.copytree(DATA / "gloo-ddp-2ranks", folder)
    whole = (folder / "rank-1.json.gz").read_bytes()
    (folder / "rank-1.json.gz").write_bytes(whole[: len(whole) // 2])  # gzip cut short
    src = _only([folder])
    assert any("rank-1.json.gz: damaged" in p for p in src.problems), src.problems
    assert 0 in src.ranks
    text = gzip.decompress(whole)
    (folder / "rank-1.json.gz").write_bytes(gzip.compress(text[: len(text) * 3 // 4]))
    src = _only([folder])
    assert any("cut short" in p for p in src.problems), src.problems
    garbage = bytearray(whole)
    garbage[200:260] = b"\x00" * 60  # damaged deflate data
    (folder / "rank-1.json.gz").write_bytes(bytes(garbage))
    src = _only([folder])
    assert any("rank-1.json.gz" in p for p in src.problems), src.problems
    assert src.events().filter(pl.col("rank") == 0).height == 6


def test_scan_finds_the_same_events_whatever_the_chunk(tmp_path):
    text = gzip.decompress((DATA / "gloo-2groups-2ranks" / "rank-0.json.gz").read_bytes())
    plain = tmp_path / "t.json"
    plain.write_bytes(text)
    names = ("gloo:", "c10d::", "ProfilerStep#")
    want = [e for e in json.loads(text)["traceEvents"]
            if any(str(e.get("name", "")).startswith(n) for n in names)]
    for chunk in (61, 997, 1 << 20):
        scan = scan_trace(plain, names, ("distributedInfo",), chunk_chars=chunk)
        assert scan.events == want and scan.problems == []
        assert scan.top["distributedInfo"]["rank"] == 0
    # minified, keys in another order: found all the same
    mini = {k: v for k, v in json.loads(text).items()}
    mini["traceEvents"] = [dict(reversed(list(e.items()))) for e in mini["traceEvents"]]
    plain.write_text(json.dumps(mini, separators=(",", ":")))
    scan = scan_trace(plain, names, chunk_chars=4096)
    assert len(scan.events) == len(want)


def test_sniff_claims_traces_only(tmp_path):
    trace = DATA / "gloo-ddp-2ranks" / "rank-0.json.gz"
    assert sniff(trace, trace.read_bytes()[:HEAD_BYTES])
    assert READER.kind == "profiler traces"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"rank": 0, "written_ns": 1}))
    assert not sniff(meta, meta.read_bytes())
    other = tmp_path / "x.csv"
    other.write_text('{"traceEvents": []}')
    assert not sniff(other, other.read_bytes())


def test_read_rank_trace_of_a_trace_without_collectives(tmp_path):
    path = _write(tmp_path / "rank0.json.gz", _trace(0, [{"ph": "X", "name": "aten::mm",
                                                           "ts": 1.0, "dur": 1.0}]))
    assert read_rank_trace(path).rows == []
    src = open_sources([str(tmp_path)]).sources[0]
    assert any("no collective" in p for p in src.problems)


def test_a_plain_json_trace_is_a_trace_not_a_flight_recorder_dump(tmp_path):
    """A CPU trace's head holds distributedInfo.pg_config, a Flight Recorder key too."""
    text = gzip.decompress((DATA / "gloo-ddp-2ranks" / "rank-0.json.gz").read_bytes())
    assert b'"pg_config"' in text[:HEAD_BYTES]
    (tmp_path / "rank-0.json").write_bytes(text)
    opened = open_sources([str(tmp_path)])
    assert [s.kind for s in opened.sources] == ["profiler traces"], opened
    assert opened.sources[0].events().height == 6

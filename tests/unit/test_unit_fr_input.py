"""Flight Recorder dumps as an input of ``ringwatch analyze`` (ringwatch.inputs._fr)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from fr_dumps import GAP_NS, T0, as_json, dump, entry, write

from ringwatch.inputs import open_sources
from ringwatch.inputs._fr import open_dumps, read_dump, sniff

REPO = Path(__file__).resolve().parents[2]


def gloo_job(n: int = 4, last: int = 5, behind: int | None = None) -> dict[int, dict]:
    out = {}
    for r in range(n):
        top = last - 1 if r == behind else last
        out[r] = dump([entry(s, done=s < last) for s in range(1, top + 1)])
    return out


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_gloo_dumps_become_schema_rows(tmp_path, fmt):
    folder = write(tmp_path / "job7", gloo_job(behind=2), fmt=fmt)
    opened = open_sources([folder])
    assert opened.unreadable == []
    (src,) = opened.sources
    assert (src.kind, src.job_id, sorted(src.ranks)) == ("flight recorder dumps", "job7",
                                                         [0, 1, 2, 3])
    ev = src.events()
    assert ev.height == 4 * 5 - 1
    r0 = ev.filter(pl.col("rank") == 0).sort("idx")
    assert r0["seq"].to_list() == [1, 2, 3, 4, 5]
    assert r0["status"].to_list() == ["ok"] * 4 + ["pending"]
    assert r0["op"].unique().to_list() == ["all_reduce"]
    assert r0["t_issue_ns"][0] == T0 + GAP_NS and r0["t_start_ns"][0] == T0 + GAP_NS
    assert r0["t_end_ns"].is_null().all()  # Gloo records no completion time
    assert set(ev["pg_ranks"]) == {"0-3"} and set(ev["pg_size"]) == {4}
    assert (r0["dtype"][0], r0["nbytes"][0], r0["backend"][0]) == ("float32", 16, "gloo")
    assert ev.filter(pl.col("rank") == 2)["status"].to_list() == ["ok"] * 4
    assert ev.filter(pl.col("status") == "pending").height == 3
    assert not src.events(include_pending=False).filter(pl.col("status") == "pending").height


def test_pickle_and_json_of_one_dump_read_the_same(tmp_path):
    d = {r: dump([entry(s, backend="nccl", done=s < 3) for s in (1, 2, 3)],
                 pg_config={"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1]"}})
         for r in (0, 1)}
    a = open_dumps(sorted(write(tmp_path / "p", d).iterdir()))[0].events()
    b = open_dumps(sorted(write(tmp_path / "j", d, fmt="json").iterdir()))[0].events()
    cols = [c for c in a.columns if c != "job_id"]
    assert a.select(cols).equals(b.select(cols))
    # NCCL states: completed -> ok with the discovered times, started -> pending
    assert a["status"].to_list() == ["ok", "ok", "pending"] * 2
    assert a["t_end_ns"][0] == T0 + GAP_NS + 2000 and a["end_source"][0] == "watchdog"
    assert a["t_start_ns"][2] == T0 + 3 * GAP_NS + 1000 and a["t_end_ns"][2] is None


def test_nccl_retired_without_completing_is_an_error(tmp_path):
    e = entry(1, backend="nccl", done=False)
    e["retired"] = True
    ev = open_dumps(sorted(write(tmp_path, {0: dump([e])}).iterdir()))[0].events()
    assert ev["status"].to_list() == ["error"]


def test_json_without_entries_and_pg_status_strings(tmp_path):
    d = as_json(dump([]))
    assert "entries" not in d
    (tmp_path / "nccl_trace_rank_0").write_text(json.dumps(d))
    src = open_dumps([tmp_path / "nccl_trace_rank_0"])[0]
    assert src.problems == [] and sorted(src.ranks) == [0] and src.events().height == 0


def test_members_from_pg_config_else_from_the_dumps(tmp_path):
    cfg = {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2, 3]"},
           "1": {"name": "1", "desc": "tp0", "ranks": [0, 1]}}
    d = {r: dump([entry(1), entry(1, pg="1", desc="tp0")] if r < 2 else [entry(1)],
                 pg_config=cfg) for r in (0, 1, 3)}
    src = open_dumps(sorted(write(tmp_path / "a", d).iterdir()))[0]
    assert src.members() == {"0": [0, 1, 2, 3], "1": [0, 1]}
    # Gloo: no pg_config; the world group is 0..highest, a subgroup those that show it
    g = {r: dump([entry(1), entry(1, pg="2", desc="dp1")] if r in (1, 3) else [entry(1)])
         for r in (0, 1, 3)}
    src = open_dumps(sorted(write(tmp_path / "b", g).iterdir()))[0]
    assert src.members() == {"0": [0, 1, 2, 3], "2": [1, 3]}
    # older layout: name -> (desc, ranks)
    old = {0: dump([entry(1, pg="5", desc="x")], pg_config={"5": ("x", "[0, 4]")})}
    assert open_dumps(sorted(write(tmp_path / "c", old).iterdir()))[0].members()["5"] == [0, 4]
    # Gloo's one entry named "": its ranks widen the world (a missing highest rank is seen)
    gl = {r: dump([entry(1)], pg_config={"": {"name": "", "desc": "", "ranks": "[0, 1, 2, 3]"}})
          for r in (0, 1, 2)}
    assert open_dumps(sorted(write(tmp_path / "d", gl).iterdir()))[0].members() == {
        "0": [0, 1, 2, 3]}


def test_rank_from_the_dump_else_the_name_and_times(tmp_path):
    (tmp_path / "trace-weird.bin").write_bytes(pickle.dumps(dump([entry(1)], rank=6,
                                                                 dump_time_ns=T0 + 5)))
    write(tmp_path, {2: dump([entry(1)])}, prefix="host_a_", mtime_ns={2: T0 + 9})
    src = open_dumps(sorted(tmp_path.iterdir()))
    ranks = {r: d.dumped_ns for s in src for r, d in s.ranks.items()}
    assert ranks == {6: T0 + 5, 2: T0 + 9}


def test_sniff():
    pk = pickle.dumps(dump([entry(1)]), protocol=2)
    assert sniff(Path("x"), pk[:4096])
    assert sniff(Path("x.json"), json.dumps(as_json(dump([entry(1)]))).encode()[:4096])
    assert sniff(Path("nccl_trace_rank_12"), b"garbage")  # named as PyTorch names dumps
    assert not sniff(Path("trace.json"), b'{"traceEvents": [{"name": "x"}]}')
    assert not sniff(Path("README"), b"hello")
    assert not sniff(Path("t.csv"), b"rank,seq\n0,1\n")


def test_unusable_files_are_named_with_the_reason(tmp_path):
    write(tmp_path, {0: dump([entry(1)]), 1: dump([entry(1)])})
    (tmp_path / "nccl_trace_rank_7").write_bytes(b"\x00not a dump")
    (tmp_path / "nccl_trace_rank_8").write_text(json.dumps({"version": "3.0", "entries": []}))
    (tmp_path / "nccl_trace_rank_9").write_text(json.dumps({"version": "2.10",
                                                            "entries": [{"x": 1}]}))
    (tmp_path / "other_dump").write_bytes(pickle.dumps(dump([entry(1)])))  # no rank
    opened = open_sources([tmp_path])
    (src,) = opened.sources
    assert sorted(src.ranks) == [0, 1]
    text = "\n".join(src.problems)
    assert "nccl_trace_rank_7: not a Flight Recorder dump" in text
    assert "nccl_trace_rank_8: format version 3.0" in text
    assert "nccl_trace_rank_9: an entry lacks" in text
    assert "other_dump: no rank" in text
    assert len(src.problems) == 4


def test_a_second_dump_of_a_rank_keeps_the_newer(tmp_path):
    write(tmp_path, {0: dump([entry(1)])}, mtime_ns={0: T0})
    write(tmp_path, {0: dump([entry(1), entry(2)])}, prefix="nccl_trace_rank_0", mtime_ns={
        0: T0 + 1})  # nccl_trace_rank_00: rank 0 again
    (src,) = open_dumps(sorted(tmp_path.iterdir()))
    assert src.ranks[0].path.name == "nccl_trace_rank_00"
    assert "a second dump of rank 0" in src.problems[0]


def test_several_jobs_in_one_folder(tmp_path):
    write(tmp_path, {0: dump([entry(1)]), 1: dump([entry(1)])}, prefix="jobA_rank_")
    write(tmp_path, {0: dump([entry(1)])}, prefix="jobB_rank_")
    (tmp_path / "x_0").write_bytes(pickle.dumps(dump([entry(1)], job_id="j42")))
    srcs = open_sources([tmp_path]).sources
    got = sorted((s.job_id, sorted(s.ranks)) for s in srcs)
    name = tmp_path.name
    assert got == [("j42", [0]), (f"{name}/jobA_rank", [0, 1]), (f"{name}/jobB_rank", [0])]
    only = open_dumps(sorted(tmp_path.iterdir()), "j42")
    assert [s.job_id for s in only] == ["j42"]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_runs_no_code_and_is_named(tmp_path):
    folder = write(tmp_path / "dumps", gloo_job())
    marker = tmp_path / "pwned"
    evil = folder / "nccl_trace_rank_4"
    evil.write_bytes(pickle.dumps({"version": "2.10", "entries": [_Evil(marker)]}, protocol=2))
    (folder / "also_evil.pkl").write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(ValueError, match="refused"):
        read_dump(evil)
    p = subprocess.run([sys.executable, "-m", "ringwatch._cli", "analyze", str(folder)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not marker.exists()
    assert f"{evil}: not a Flight Recorder dump" in p.stdout and "refused" in p.stdout
    assert "also_evil.pkl" in p.stdout and "posix.system" in p.stdout
    assert "4 rank(s)" in p.stdout


def test_logs_check_reads_a_planted_flight_recorder_copy_safely(tmp_path, capsys):
    """``ringwatch logs --check`` reads each rank's FR copy through the same safe loader."""
    from test_unit_writer_logs import Rank

    from ringwatch._cli import main

    marker = tmp_path / "pwned"
    r = Rank(tmp_path / "logs")
    r.run(2)
    r.flush()
    (r.dir / "flight_recorder.json").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    assert main(["logs", str(tmp_path / "logs"), "--check"]) == 1
    out = capsys.readouterr().out
    assert not marker.exists()
    assert "flight_recorder.json: unreadable" in out and "refused" in out, out


def test_point_to_point_entries_name_the_peer_by_global_rank(tmp_path):
    cfg = {"3": {"name": "3", "desc": "pp", "ranks": "[4, 6]"}}
    send = entry(1, pg="3", desc="pp", op="send 0->1", backend="nccl")
    recv = entry(1, pg="3", desc="pp", op="recv 1<-0", backend="nccl")
    for e in (send, recv):
        e["is_p2p"], e["p2p_seq_id"], e["collective_seq_id"] = True, 7, 0
    d = {4: dump([send], pg_config=cfg), 6: dump([recv], pg_config=cfg)}
    ev = open_dumps(sorted(write(tmp_path, d).iterdir()))[0].events().sort("rank")
    assert ev.select("rank", "op", "peer", "seq", "is_p2p").rows() == [
        (4, "send", 6, 7, True), (6, "recv", 4, 7, True)]


def test_an_entry_without_state_or_retired_is_unknown_not_pending(tmp_path):
    e = entry(1)
    del e["state"], e["retired"], e["time_discovered_started_ns"]
    del e["time_discovered_completed_ns"], e["input_dtypes"], e["output_dtypes"]
    ev = open_dumps(sorted(write(tmp_path, {0: dump([e])}).iterdir()))[0].events()
    assert ev.select("status", "dtype", "t_start_ns").rows() == [("unknown", None,
                                                                  T0 + GAP_NS)]

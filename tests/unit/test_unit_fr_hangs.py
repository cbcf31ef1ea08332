"""Hang attribution from Flight Recorder dumps alone (ringwatch.analyzers._fr_hangs)."""

from __future__ import annotations

import pytest
from fr_dumps import GAP_NS, T0, dump, entry, write

from ringwatch.analyzers._fr_hangs import (
    DumpHangThresholds,
    compute_mismatches,
    compute_usual_pause_ns,
    detect_dump_hangs,
)
from ringwatch.inputs._fr import open_dumps

N = 20  # collectives every rank finished before the trouble


def history(pg="0", desc="default_pg", upto=N, **kw) -> list[dict]:
    return [entry(s, pg=pg, desc=desc, **kw) for s in range(1, upto + 1)]


def analyse(tmp_path, dumps: dict[int, dict], *, dumped_after_s: float = 5.0, **kw):
    """Write the dumps, read them back, attribute; every dump taken ``dumped_after_s`` after
    the last collective anyone issued."""
    last = max(e["time_created_ns"] for d in dumps.values() for e in d["entries"])
    t = last + int(dumped_after_s * 1e9)
    src = open_dumps(sorted(write(tmp_path, dumps, mtime_ns={r: t for r in dumps}).iterdir()))[0]
    return detect_dump_hangs(src.events(), dumped_ns=src.last_write_ns(), **kw), src


def top(findings) -> set[int]:
    best = max(f.confidence for f in findings)
    return {r for f in findings if f.confidence == best for r in f.ranks}


def test_a_rank_behind_in_no_collective_is_the_root_cause(tmp_path):
    dumps = {r: dump(history() + ([] if r == 2 else [entry(N + 1, done=False)]))
             for r in range(4)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.pg, f.seq, f.confidence) == ("never arrived", (2,), "0", N + 1,
                                                           1.0)
    assert f.since_ns == T0 + (N + 1) * GAP_NS
    assert any("rank 2 last entered #20 here and is in no collective" in e for e in f.evidence)


def test_a_collective_in_flight_for_less_than_the_usual_pauses_is_no_hang(tmp_path):
    dumps = {r: dump(history() + ([] if r == 2 else [entry(N + 1, done=False)]))
             for r in range(4)}
    # 10 ms between collectives: 10 pauses is 100 ms; 50 ms in flight is a healthy dump
    assert analyse(tmp_path / "a", dumps, dumped_after_s=0.05)[0] == ()
    assert len(analyse(tmp_path / "b", dumps, dumped_after_s=0.2)[0]) == 1
    loose = DumpHangThresholds(stall_pauses=50)
    assert analyse(tmp_path / "c", dumps, dumped_after_s=0.2, thresholds=loose)[0] == ()


def test_usual_pause_ignores_the_start_up_half_of_the_record(tmp_path):
    es = history()
    es[1]["time_created_ns"] -= 500 * GAP_NS  # a long start-up gap early on
    for i, e in enumerate(es[2:], 2):
        e["time_created_ns"] = es[1]["time_created_ns"] + i * GAP_NS
    _, src = analyse(tmp_path, {0: dump(es), 1: dump(es)})
    assert compute_usual_pause_ns(src.events()) == GAP_NS


def test_stuck_inside_while_the_peers_finished(tmp_path):
    dumps = {r: dump(history() + [entry(N + 1, op="broadcast", done=r != 3)]
                     + ([entry(N + 2, done=False)] if r != 3 else [])) for r in range(4)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.seq, f.confidence) == ("stuck in the collective", (3,), N + 1,
                                                     1.0)
    assert any("rank(s) 0,1,2 finished #21" in e for e in f.evidence)


def test_every_member_inside_none_finished_names_all_at_lower_confidence(tmp_path):
    dumps = {r: dump(history() + [entry(N + 1, done=False)]) for r in range(4)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.confidence) == ("stuck in the collective", (0, 1, 2, 3), 0.5)


@pytest.mark.parametrize("odd", [{"op": "broadcast"}, {"sizes": ((8,),)}, {"dtype": "Double"}])
def test_a_mismatched_collective_names_the_minority(tmp_path, odd):
    dumps = {r: dump(history() + [entry(N + 1, done=False, **(odd if r == 2 else {}))])
             for r in range(4)}
    (f,), src = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.seq, f.confidence) == ("mismatched collective", (2,), N + 1, 1.0)
    mm = compute_mismatches(src.events())
    assert sorted(mm["rank"].to_list()) == [0, 1, 2, 3] and set(mm["seq"]) == {N + 1}


def test_a_mismatch_with_no_majority_names_both_sides_at_lower_confidence(tmp_path):
    dumps = {r: dump(history() + [entry(N + 1, done=False, op="broadcast" if r < 2
                                        else "all_reduce")]) for r in range(4)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.confidence) == ("mismatched collective", (0, 1, 2, 3), 0.5)


def test_a_mismatch_that_completed_is_still_reported(tmp_path):
    dumps = {r: dump(history()[:10] + [entry(11, sizes=((8,),) if r == 1 else ((4,),))]
                     + [entry(s) for s in range(12, N + 1)]) for r in range(3)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.seq) == ("mismatched collective", (1,), 11)


def tp_dp(blocked: set[int]) -> dict[int, dict]:
    """4 ranks, tp groups {0,1} {2,3}, dp groups {0,2} {1,3} (NCCL-style pg_config). Each
    step: a tp collective then a dp one. ``blocked`` ranks stop before step N+1; the others
    enter it and wait where their partners are missing."""
    cfg = {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2, 3]"},
           "1": {"name": "1", "desc": "tp0", "ranks": "[0, 1]"},
           "2": {"name": "2", "desc": "tp1", "ranks": "[2, 3]"},
           "3": {"name": "3", "desc": "dp0", "ranks": "[0, 2]"},
           "4": {"name": "4", "desc": "dp1", "ranks": "[1, 3]"}}
    tp = {0: "1", 1: "1", 2: "2", 3: "2"}
    dp = {0: "3", 1: "4", 2: "3", 3: "4"}
    out = {}
    for r in range(4):
        es, rid = [], 0
        for s in range(1, N + 2):
            t = T0 + s * 2 * GAP_NS
            if s == N + 1 and r in blocked:
                break
            mates_tp = [m for m in range(4) if tp[m] == tp[r]]
            tp_done = s <= N or not (set(mates_tp) & blocked)
            es.append(entry(s, pg=tp[r], desc=cfg[tp[r]]["desc"], backend="nccl",
                            done=s <= N, t_ns=t, record_id=rid))
            rid += 1
            if not tp_done:
                break  # waits in its tp collective
            es.append(entry(s, pg=dp[r], desc=cfg[dp[r]]["desc"], backend="nccl",
                            done=s <= N, t_ns=t + GAP_NS, record_id=rid))
            rid += 1
        out[r] = dump(es, pg_config=cfg)
    return out


def test_knock_on_hangs_are_consequences_below_the_root_cause(tmp_path):
    fs, _ = analyse(tmp_path, tp_dp({1}))
    by = {(f.pg, f.ranks): f for f in fs}
    assert by[("1", (1,))].confidence == 1.0 and by[("1", (1,))].cls == "never arrived"
    assert by[("4", (1,))].confidence == 1.0  # dp1: rank 3 waits for rank 1 too
    knock = by[("3", (0,))]  # dp0: rank 2 waits for rank 0, itself waiting in tp0
    assert knock.confidence == 0.5
    assert any("waiting in pg 1 #21" in e for e in knock.evidence)
    assert top(fs) == {1}
    assert fs[0].confidence == 1.0 and fs[-1].confidence == 0.5  # roots first


def test_two_ranks_blocked_in_different_groups_are_both_root_causes(tmp_path):
    fs, _ = analyse(tmp_path, tp_dp({1, 2}))
    assert top(fs) == {1, 2}
    assert {(f.pg, f.ranks) for f in fs if f.confidence == 1.0} >= {("1", (1,)), ("2", (2,))}


def test_a_rank_without_a_dump_is_not_running(tmp_path):
    cfg = {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2, 3]"}}
    # its peers' collectives failed when it died: retired, nothing pending
    dumps = {r: dump(history(backend="gloo"), pg_config=cfg) for r in (0, 1, 3)}
    (f,), _ = analyse(tmp_path, dumps)
    assert (f.cls, f.ranks, f.confidence, f.pg, f.seq) == ("rank not running", (2,), 1.0, "0",
                                                           N)
    # the same with the others still waiting: one finding for the group, naming it
    dumps = {r: dump(history() + [entry(N + 1, done=False)], pg_config=cfg) for r in (0, 1, 3)}
    (f,), _ = analyse(tmp_path / "b", dumps)
    assert (f.cls, f.ranks, f.seq) == ("rank not running", (2,), N + 1)
    # Gloo dumps (no pg_config): a gap in the ranks is seen, as the world is 0..highest
    dumps = {r: dump(history()) for r in (0, 1, 3)}
    (f,), _ = analyse(tmp_path / "c", dumps)
    assert f.ranks == (2,)


def test_a_healthy_set_of_dumps_has_no_finding(tmp_path):
    assert analyse(tmp_path, {r: dump(history()) for r in range(4)})[0] == ()

"""The local cluster's serving workloads (``cluster/_serving.py``): real 4-rank Gloo jobs under
torchrun with ringwatch attached. Tensor-parallel decode with continuous batching (two
all-reduces per layer per step, their size following the active requests), an expert-parallel
MoE stack whose hot expert's rank receives the most tokens and keeps the others waiting, and a
compute straggler injected into a decode job by the cluster runner."""

from __future__ import annotations

import argparse
import bisect
import statistics
from pathlib import Path

import polars as pl

from ringwatch._logs import open_job
from ringwatch.cluster import leftovers, read_steps, run_cluster
from ringwatch.cluster._cli import add_cluster_flags, fault_from_args, spec_from_args
from ringwatch.cluster._run import read_slowed_step

from jobtools import read_json_line, run_job, torchrun_cmd

WIDTH = 64  # features: a token's row is WIDTH * 4 bytes of float32


def _serve(tmp_path: Path, *args: str) -> tuple[pl.DataFrame, dict, Path]:
    """Run ``_job`` on 4 ranks with ``args``; its rows, rank 0's result and its step log."""
    rc, out = run_job(torchrun_cmd(4, [
        "-m", "ringwatch.cluster._job", "--width", str(WIDTH), "--attach", "logs",
        "--step-log", "steps", "--result", "result.json", *args]), cwd=tmp_path, timeout=120)
    assert rc == 0, out
    return (open_job(tmp_path / "logs").events(), read_json_line(tmp_path / "result.json"),
            tmp_path / "steps")


def _side_lines(steps_dir: Path, rank: int) -> list[str]:
    """The step log's lines that are not ``pid`` or ``step<TAB>wall_ns``."""
    return [ln for ln in (steps_dir / f"rank-{rank}.tsv").read_text().splitlines()
            if not ln.startswith("pid\t") and not ln.split("\t")[0].isdigit()]


def test_decode_has_two_all_reduces_per_layer_sized_by_the_active_batch(tmp_path):
    layers, steps, first, batch = 3, 20, 100, 16
    ev, result, steps_dir = _serve(
        tmp_path, "--workload", "decode", "--tp", "2", "--layers", str(layers),
        "--steps", str(steps), "--batch", str(batch), "--first-step", str(first))
    assert (result["workload"], result["steps"], result["tp"]) == ("decode", steps, 2)
    assert result["median_step_s"] > 0
    # nothing but the tp groups' all-reduces: replicas are independent servers
    assert ev["op"].unique().to_list() == ["all_reduce"]
    groups = ev.group_by("rank").agg(pl.col("pg_desc").unique()).sort("rank").rows()
    assert groups == [(0, ["tp0"]), (1, ["tp0"]), (2, ["tp1"]), (3, ["tp1"])]
    # --first-step marks every decode step; each has 2 all-reduces per layer on every rank
    per_step = ev.group_by("rank", "step").agg(pl.len(), pl.col("nbytes").n_unique().alias("u"),
                                              pl.col("nbytes").first())
    assert per_step.height == 4 * steps
    assert sorted(per_step["step"].unique()) == list(range(first, first + steps))
    assert per_step["len"].unique().to_list() == [2 * layers]
    assert per_step["u"].unique().to_list() == [1]  # one batch through every layer of a step
    # (active, WIDTH) float32 with 1 <= active <= --batch, moving from step to step
    active = per_step["nbytes"] // (WIDTH * 4)
    assert (per_step["nbytes"] % (WIDTH * 4) == 0).all()
    assert active.min() >= 1 and active.max() <= batch
    for rank in range(4):
        sizes = per_step.filter(pl.col("rank") == rank).sort("step")["nbytes"].to_list()
        assert len(set(sizes)) >= 4, sizes
        assert sum(a != b for a, b in zip(sizes[:-1], sizes[1:], strict=True)) >= steps // 3, sizes
    # the members of a tp group agree on the batch; the two replicas do not follow one script
    seq = {r: per_step.filter(pl.col("rank") == r).sort("step")["nbytes"].to_list()
           for r in range(4)}
    assert seq[0] == seq[1] and seq[2] == seq[3] and seq[0] != seq[2], seq
    assert _side_lines(steps_dir, 0) == []


def test_moe_hot_expert_rank_receives_most_tokens_and_is_waited_for(tmp_path):
    layers, steps, hot_from, batch = 2, 20, 10, 64
    ev, result, steps_dir = _serve(
        tmp_path, "--workload", "moe", "--layers", str(layers), "--steps", str(steps),
        "--batch", str(batch), "--step-sleep-ms", "20", "--first-step", "0",
        "--hot-expert", "2", "--hot-share", "0.5", "--hot-from-step", str(hot_from))
    assert (result["workload"], result["experts"]) == ("moe", 4)
    for rank in range(4):  # the ground truth: the first hot step, in every rank's log
        assert _side_lines(steps_dir, rank) == [f"hot\t{hot_from}"]
    assert ev["op"].unique().to_list() == ["all_to_all_single"]
    assert ev["pg_desc"].unique().to_list() == ["default_pg"]
    ev = ev.sort("rank", "idx")
    # per layer: the counts (int64, one per expert), the dispatch, the combine
    counts = ev.filter(pl.col("dtype") == "int64")
    assert counts.height == 4 * steps * layers and (counts["nbytes"] == 4 * 8).all()
    moved = ev.filter(pl.col("dtype") == "float32").with_columns(
        dispatch=pl.int_range(pl.len()).over("rank") % 2 == 0)
    assert moved.height == 4 * steps * layers * 2
    disp = moved.filter("dispatch").with_columns(
        tokens=pl.col("nbytes_out") // (WIDTH * 4), hot=pl.col("step") >= hot_from)
    # every token dispatched is received somewhere, layer by layer
    flow = disp.group_by("seq").agg(pl.col("nbytes_in").sum(), pl.col("nbytes_out").sum())
    assert flow.height == steps * layers and (flow["nbytes_in"] == flow["nbytes_out"]).all()
    got = {(hot, r): t for hot, r, t in disp.group_by("hot", "rank").agg(
        pl.col("tokens").mean()).rows()}
    before = [got[(False, r)] for r in range(4)]
    assert max(before) < 1.3 * min(before), got  # uniform routing: no rank stands out
    # from the hot step on: rank 2 gets half of everyone's tokens plus its uniform share,
    # ~2.5 batches, the others ~0.5 batch each
    assert all(got[(True, 2)] > 3 * got[(True, r)] for r in (0, 1, 3)), got
    assert 2 * batch < got[(True, 2)] < 3 * batch, got
    # the hot rank computes longest and arrives last at the combine: its peers wait there
    comb = moved.filter(~pl.col("dispatch") & (pl.col("step") >= hot_from + 1))
    wait_ms = {r: w / 1e6 for r, w in comb.group_by("rank").agg(
        pl.col("duration_ns").median()).rows()}
    assert all(wait_ms[r] > wait_ms[2] + 5 for r in (0, 1, 3)), wait_ms


def _step_ms(marks: list[tuple[int, int]], lo: int, hi: int) -> float:
    """Median duration (ms) of the steps in [lo, hi), from the step log's start times."""
    t = dict(marks)
    return statistics.median((t[s + 1] - t[s]) / 1e6 for s in range(lo, hi))


def test_cluster_straggler_slows_a_decode_rank_and_its_tp_peer_waits(tmp_path):
    victim, layers, steps = 1, 4, 30
    p = argparse.ArgumentParser()
    add_cluster_flags(p, nproc=4, hosts=2, steps=60, fault="none", at_step=20)
    args = p.parse_args(["--nproc", "4", "--hosts", "2", "--netns", "off", "--tp", "2",
                         "--steps", str(steps), "--fault", "straggler",
                         "--straggler-mode", "work", "--victim-rank", str(victim),
                         "--at-step", "10", "--factor", "3"])
    job = ("--workload", "decode", "--layers", str(layers), "--width", str(WIDTH),
           "--step-sleep-ms", "30")
    result = run_cluster(spec_from_args(args, tmp_path / "run", job), fault_from_args(args))
    assert result.ok, result
    assert leftovers() == {}
    steps_dir = result.run_dir / "steps"
    onset, slowed = result.ground_truth["onset_step"], read_slowed_step(steps_dir, victim)
    assert slowed is not None and onset <= slowed <= onset + 3, (onset, slowed)
    assert result.ground_truth["effect_step"] == slowed
    assert all(read_slowed_step(steps_dir, r) is None for r in (0, 2, 3))
    assert slowed + 8 <= steps  # enough slowed steps to compare
    ev = open_job(result.log_dir, result.job_id).events()
    # no optimizer step, no marks: the step counter never moves
    assert ev["step"].unique().to_list() == [0]
    assert ev.group_by("rank").len().sort("rank")["len"].to_list() == [steps * 2 * layers] * 4
    marks = {r: m for r, (_pid, m) in read_steps(steps_dir).items()}
    # the victim does 3x the work and its tp peer keeps its pace; the other replica is not held
    # by them. On 2 shared cores the victim's work also takes CPU from the other replica, so its
    # steps may slow somewhat, but by much less than the pair's (tied to them, they would slow
    # as much), and it does not wait in its all-reduces (below)
    ratio = {r: _step_ms(marks[r], slowed + 1, steps) / _step_ms(marks[r], 1, slowed)
             for r in range(4)}
    assert ratio[victim] > 1.6 and ratio[0] > 1.6, ratio
    assert all(ratio[r] - 1 < 0.5 * (ratio[victim] - 1) for r in (2, 3)), ratio
    # in the rows: after the onset the peer waits in the all-reduces, the victim and the other
    # replica do not
    wait_ms = {}
    for r in range(4):
        starts = [t for _s, t in marks[r]]
        rows = ev.filter(pl.col("rank") == r)
        step = [bisect.bisect_right(starts, t) - 1 for t in rows["t_start_ns"]]
        late = rows.filter(pl.Series(step) > slowed)
        wait_ms[r] = late["duration_ns"].median() / 1e6
    assert all(wait_ms[0] > wait_ms[r] + 4 for r in (victim, 2, 3)), wait_ms

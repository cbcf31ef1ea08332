"""The local cluster: real Gloo DDP jobs under torchrun on emulated hosts (network namespaces,
a bridge, veth pairs), faults injected from outside, and nothing left behind.

Emulated hosts need root. The CI machine is root, so there these tests always run; elsewhere
without root they are skipped (and in CI a missing root fails them instead).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest

from ringwatch._logs import open_job
from ringwatch._reading import interpret
from ringwatch._schema import parse_ranks
from ringwatch._summary import check_job
from ringwatch.analyzers import (
    compute_phase_comm,
    compute_step_comm,
    compute_step_wait,
    detect_hangs,
    phase_masks,
)
from ringwatch.cluster import Cluster, ClusterSpec, FaultSpec, leftovers, read_steps, run_cluster
from ringwatch.cluster._netns import list_links, list_netns

from jobtools import PY, REPO, job_env, need_netns, ringwatch_cmd, run_job

JOB = ("--batch", "64", "--step-sleep-ms", "60")


@pytest.fixture(autouse=True)
def nothing_left_over():
    """After every test: no namespace, link, process or lock file of a finished run."""
    yield
    assert leftovers() == {}
    assert not [n for n in list_netns() + list_links() if n.startswith("rw")]


def _phases(result) -> pl.DataFrame:
    sc = compute_step_comm(open_job(result.log_dir, result.job_id).events())
    truth = result.ground_truth  # imbalance has no onset to compare across
    return compute_phase_comm(sc, truth["onset_step"] if truth["is_fault"] else None)


def test_sixteen_ranks_on_four_hosts_complete_with_consistent_logs(tmp_path):
    need_netns()
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=16, hosts=4, steps=12, netns="on")
    result = run_cluster(spec)
    assert result.ok and result.reason == "completed", result
    assert result.mode == "netns" and result.leftovers == []
    job = open_job(result.log_dir, result.job_id)
    report = check_job(job)
    assert report["ok"], report["lines"]
    ev = job.events()
    hosts = ev.group_by("host").agg(pl.col("rank").unique().sort()).sort("host")
    assert hosts.rows() == [(f"host{h}", list(range(4 * h, 4 * h + 4))) for h in range(4)]
    layout = json.loads((result.run_dir / "cluster.json").read_text())
    assert [h["addr"] for h in layout["hosts"]] == [f"10.77.0.{i}" for i in (1, 2, 3, 4)]
    assert len(read_steps(result.run_dir / "steps")) == 16
    truth = result.ground_truth
    assert truth["kind"] == "none" and truth["is_fault"] is False
    assert truth["outcome"]["reason"] == "completed"


def test_dp_by_tp_groups_on_two_hosts(tmp_path):
    need_netns()
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=8, hosts=2, tp=2, steps=8, netns="on")
    result = run_cluster(spec)
    assert result.ok, result
    job = open_job(result.log_dir, result.job_id)
    assert check_job(job)["ok"], check_job(job)["lines"]
    groups = (job.events().group_by("pg_desc").agg(pl.col("pg_ranks").first())
              .sort("pg_desc").rows())
    got = {d: list(parse_ranks(r)) for d, r in groups}
    for d in range(4):
        assert got[f"tp{d}"] == [2 * d, 2 * d + 1]
    assert got["dp0"] == [0, 2, 4, 6] and got["dp1"] == [1, 3, 5, 7]


def test_rate_limited_link_raises_every_collective(tmp_path):
    need_netns()
    seen = []

    def tick(cluster):
        if cluster.injector is not None and not seen:
            veth = cluster.hosts[1].veth
            seen.append(subprocess.run(["tc", "qdisc", "show", "dev", veth],
                                       capture_output=True, text=True).stdout)

    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=35, netns="on",
                       job_args=JOB)
    fault = FaultSpec(kind="link", host=1, at_step=12, rate_mbit=50)
    with Cluster(spec, fault, on_tick=tick) as cluster:
        result = cluster.run()
    assert result.ok, result
    assert seen and "tbf" in seen[0] and "50Mbit" in seen[0]
    truth = result.ground_truth
    assert truth["host"] == "host1" and truth["ranks_on_host"] == [2, 3]
    assert truth["onset_step"] >= 12 and truth["params"]["rate_mbit"] == 50
    ph = _phases(result)
    assert ph.height == 4 and ph.null_count().sum_horizontal().item() == 0, ph
    # every rank's collectives slow down, not only the limited host's
    assert (ph["after_ns"] > 2 * ph["before_ns"]).all(), ph


def test_packet_loss_slows_collectives(tmp_path):
    need_netns()
    rules = []

    def tick(cluster):
        if cluster.injector is not None and not rules:
            rules.append(cluster.hosts[0].run("nft", "list", "ruleset"))

    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=18, netns="on",
                       job_args=JOB)
    # (5% made TCP recover fast enough in some runs for only a +10..20% change)
    fault = FaultSpec(kind="link", host=0, at_step=6, rate_mbit=None, loss_pct=10)
    with Cluster(spec, fault, on_tick=tick) as cluster:
        result = cluster.run()
    assert result.ok, result
    assert rules and rules[0].count("numgen random mod 10000 < 1000 drop") == 2, rules
    assert "hook output" in rules[0] and "hook input" in rules[0]
    ph = _phases(result)
    assert ph.height == 4 and ph.null_count().sum_horizontal().item() == 0, ph
    assert (ph["after_ns"] > 1.5 * ph["before_ns"]).all(), ph


def test_straggler_waits_least_on_loopback(tmp_path):
    """The duty-cycle victim arrives last, so it waits for no one while its peers wait for it.
    Run on loopback (hosts as labels), the path taken without root."""
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=60, netns="off",
                       job_args=JOB)
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=1, at_step=20, severity=0.6))
    assert result.ok and result.mode == "loopback", result
    assert result.ground_truth["host"] == "host0" and result.ground_truth["local_rank"] == 1
    onset = result.ground_truth["onset_step"]
    events = open_job(result.log_dir, result.job_id).events(include_pending=True)
    sw = compute_step_wait(events)
    ph = compute_phase_comm(sw, onset, value="wait_ns").sort("rank")
    after = dict(ph.select("rank", "after_ns").iter_rows())
    peers = [r for r in after if r != 1]
    assert all(after[1] < 0.5 * after[r] for r in peers), ph
    _, late = phase_masks(onset)
    last = sw.filter(late).group_by("rank").agg(
        pl.col("last_arrivals").sum() / pl.col("collectives").sum())
    share = dict(last.iter_rows())
    assert share[1] > 0.5 and all(share[r] < share[1] / 2 for r in peers), share
    seen = open_job(result.log_dir, result.job_id).last_write_ns()
    reading = interpret(events, 4, onset_step=onset, last_seen_ns=seen)
    assert (reading.verdict, reading.rank) == ("straggler", 1), reading.lines


@pytest.mark.parametrize("mode", ["block", "stop"])
def test_hang_leaves_the_victim_behind(tmp_path, mode):
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=200,
                       job_args=JOB)
    # The agents flush every 2 s: a blocked rank's agent keeps flushing, a stopped one's goes
    # silent for the whole hold. ``silent_s`` sits between the two with room on both sides on a
    # loaded 2-core machine (a flush can come a few seconds late there).
    fault = FaultSpec(kind="hang", rank=3, at_step=10, hang_mode=mode, hold_s=9)
    result = run_cluster(spec, fault)
    assert result.ok and result.reason == "hang held", result
    assert result.leftovers == []
    ev = open_job(result.log_dir, result.job_id).events(include_pending=True)
    last = dict(ev.group_by("rank").agg(pl.col("seq").max()).iter_rows())
    pending = dict(ev.filter(pl.col("status") == "pending").group_by("rank").len().iter_rows())
    if mode == "block":  # blocked before its next collective: behind every peer
        assert all(last[3] < last[r] for r in (0, 1, 2)), last
    else:  # stopped anywhere: maybe after issuing every bucket of its step (DDP's are
        # asynchronous), so that it entered as far as its peers, and, where its peers wait in
        # those same buckets, finished as many (a clean-clone run: entered 66, finished 60,
        # on every rank): never ahead of them. The frontier cannot name it then; its agent's
        # silence does (below)
        done = dict(ev.filter(pl.col("status") != "pending").group_by("rank").agg(
            pl.col("seq").max()).iter_rows())
        assert all(last[3] <= last[r] and done[3] <= done[r] for r in (0, 1, 2)), (last, done)
    if mode == "block":  # the agent of the blocked rank still flushed at the end
        assert 3 not in pending and all(pending.get(r) for r in (0, 1, 2)), pending
    marks = read_steps(result.run_dir / "steps")
    assert max(s for s, _ in marks[3][1]) < 200
    truth = result.ground_truth
    assert truth["rank"] == 3 and truth["host"] == "host1" and truth["params"]["hang_mode"] == mode
    assert truth["onset_wall_ns"] > marks[3][1][10][1]
    # The hang analyzer names the victim, post-mortem, from the logs alone: a blocked rank
    # never arrived at the collective its peers wait in; a stopped one's agent went silent.
    job = open_job(result.log_dir, result.job_id)
    seen = job.last_write_ns()
    (f,) = detect_hangs(ev, now_ns=max(seen.values()), last_seen_ns=seen, min_stall_s=3,
                        silent_s=5)
    assert (f.kind, f.ranks, f.hosts, f.pg) == ("hang", (3,), ("host1",), "0"), f
    assert f.cls == ("never arrived" if mode == "block" else "rank not running"), f
    assert f.seq == last[3] + 1 or mode == "stop", (f, last)
    assert f.since_ns >= truth["onset_wall_ns"] - 1e9, (f.since_ns, truth["onset_wall_ns"])


def test_a_rank_slow_from_the_start_is_a_straggler_from_its_first_step(tmp_path):
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=1, steps=30, job_args=JOB)
    result = run_cluster(spec, FaultSpec(kind="imbalance", rank=0, factor=2))
    assert result.ok, result
    truth = result.ground_truth
    assert truth["is_fault"] is False and truth["onset_step"] == 0 and truth["applied"]
    ph = _phases(result)
    before = dict(ph.select("rank", "before_ns").iter_rows())
    # rank 0 arrives last at every step, from the start: the others wait for it
    assert all(before[0] < 0.5 * before[r] for r in (1, 2, 3)), ph
    # its replicas do the same work by construction: a straggler from the first steps
    (f,) = _findings(result)
    assert (f.kind, f.cls, f.ranks, f.until_step) == ("straggler", "compute straggler", (0,),
                                                      None), f
    assert f.since_step <= 3, f  # the first steps after the warm-up


def _findings(result):
    from ringwatch._analyze import analyze_job

    return analyze_job(open_job(result.log_dir, result.job_id))["_findings"]


def test_analyzers_name_a_compute_straggler_within_a_few_steps(tmp_path):
    # The victim does twice the work per step from step 26; the first 20 steps after the
    # warm-up are the baseline.
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=45, netns="off",
                       job_args=JOB)
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=3, at_step=26,
                                         straggler_mode="work", factor=2.0))
    assert result.ok, result
    onset = result.ground_truth["onset_step"]
    # the victim takes the signal at its next step boundary: its first slowed step is after
    # the step the runner saw
    effect = result.ground_truth["effect_step"]
    assert onset <= effect <= onset + 3 and result.ground_truth["effect_wall_ns"] > 0, \
        result.ground_truth
    (f,) = _findings(result)
    assert (f.kind, f.cls, f.ranks, f.hosts) == ("straggler", "compute straggler", (3,),
                                                  ("host1",)), f
    # the excess may start a step early on a noisy machine; the run itself is after the onset
    assert onset - 2 <= f.since_step <= onset + 2 and onset < f.detected_step <= onset + 5, \
        (onset, f)
    assert f.until_step is None and f.gain_s_per_step > 0.02, f  # still late at the end


def test_analyzers_name_the_host_behind_a_slow_link(tmp_path):
    # 4 hosts of one rank; tp groups {0,1} {2,3} and dp groups {0,2} {1,3} cross different
    # host sets, so the slow groups have one host in common.
    need_netns()
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=4, tp=2, steps=40,
                       netns="on", job_args=JOB)
    result = run_cluster(spec, FaultSpec(kind="link", host=2, at_step=26, rate_mbit=50))
    assert result.ok, result
    onset = result.ground_truth["onset_step"]
    links = [f for f in _findings(result) if f.kind == "slow_link"]
    assert len(links) == 1, links
    (f,) = links
    assert f.cls == "slow communication" and f.hosts == ("host2",), f.evidence
    # found within a few steps; on a loaded machine a burst of load just before the onset
    # can run into the fault's slowdown, so the run may start a few steps early
    assert onset - 4 <= f.since_step and f.detected_step <= onset + 5, (onset, f)
    # rank 2 comes late to both its groups (both cross the link): folded into the link's
    # evidence, not a straggler
    assert not [x for x in _findings(result) if x.kind == "straggler"], _findings(result)


def _wait_for_steps(run_dir, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marks = read_steps(run_dir / "steps") if (run_dir / "steps").is_dir() else {}
        if marks and all(m and m[-1][0] >= n for _p, m in marks.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {n}")


def test_ctrl_c_ends_the_run_cleanly(tmp_path):
    need_netns()
    run = tmp_path / "run"
    proc = subprocess.Popen(ringwatch_cmd("cluster", "--run-dir", str(run), "--nproc", "4",
                                          "--hosts", "2", "--steps", "100000"),
                            env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for_steps(run, 3)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    truth = json.loads((run / "ground_truth.json").read_text())
    assert truth["outcome"]["reason"] == "interrupted"
    # the ranks flushed their logs on the way out
    assert open_job(run / "logs").events().height > 0


def test_a_run_after_a_crash_starts_clean(tmp_path):
    need_netns()
    run = tmp_path / "crashed"
    proc = subprocess.Popen(ringwatch_cmd("cluster", "--run-dir", str(run), "--nproc", "4",
                                          "--hosts", "2", "--steps", "100000"),
                            env=job_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_steps(run, 2)
    proc.kill()  # the owner dies without cleaning up: namespaces and ranks stay
    proc.wait()
    left = leftovers()
    assert len(left) == 1, left
    (rid, what), = left.items()
    assert sum(w.startswith("process") for w in what) >= 4, what
    assert sum(w.startswith("namespace/link") for w in what) >= 3, what
    # the next run sweeps them before it starts, and then runs normally
    spec = ClusterSpec(run_dir=tmp_path / "next", nproc=2, hosts=2, steps=3, netns="on")
    messages = []
    result = run_cluster(spec, log=messages.append)
    assert result.ok, result
    assert any(f"cleaned up after dead run {rid}" in m for m in messages), messages


def test_without_root_it_falls_back_to_loopback(tmp_path, monkeypatch):
    from ringwatch.cluster import _netns

    monkeypatch.setattr(_netns, "netns_unavailable_reason", lambda: "not root")
    messages = []
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=2, hosts=2, steps=3)
    result = run_cluster(spec, log=messages.append)
    assert result.ok and result.mode == "loopback", result
    assert any("running every rank on loopback" in m and "not root" in m for m in messages)
    with pytest.raises(PermissionError, match="link fault needs emulated hosts"):
        run_cluster(spec, FaultSpec(kind="link", host=1, rate_mbit=10))
    with pytest.raises(PermissionError, match="not root"):
        run_cluster(ClusterSpec(run_dir=tmp_path / "r2", nproc=2, hosts=2, netns="on"))


def test_scenario_runner_keeps_each_run_with_its_ground_truth(tmp_path):
    """The benchmark's scenario runner, on a small matrix: one folder per run with its logs and
    ground truth, one line per run in runs.jsonl, and a summary table."""
    need_netns()
    out = tmp_path / "sc"
    rc, text = run_job([PY, str(REPO / "benchmarks" / "scenarios.py"), "--out", str(out),
                        "--worlds", "4", "--faults", "straggler,link", "--reps", "1",
                        "--steps", "30", "--at-step", "12", "--seed", "3"],
                       cwd=tmp_path, env=job_env(), timeout=400)
    assert rc == 0, text
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["straggler-w4-r0", "link-w4-r0"], text
    for rec in records:
        truth = json.loads((out / rec["name"] / "ground_truth.json").read_text())
        assert truth["kind"] == rec["fault"] and truth["world_size"] == 4
        assert truth["outcome"]["reason"] == "completed" and truth["applied"], truth
        assert (truth["rank"], truth["host"]) == (
            (rec["rank"], f"host{rec['rank'] // 2}") if rec["fault"] == "straggler"
            else (None, f"host{rec['host']}")), (truth, rec)
        # link runs: 4 hosts with groups over different host sets (--link-layout layered)
        assert rec["mode"] == "netns" and rec["onset_step"] >= 12
        assert rec["hosts"] == (4 if rec["fault"] == "link" else 2), rec
        assert sorted(rec["after_ms"]) == sorted(rec["wait_after_ms"]) == ["0", "1", "2", "3"]
        # The demo's reading, from the logs alone: the straggler run names its victim. On the
        # layered link layout the rank behind the slow host comes late, mostly only to the
        # groups crossing it; under load, now and then to all of them, as a straggler would
        # (twice in 25 runs, once a little late already before the onset), where the link
        # analyzer naming its host alone keeps it the network. The analyzers' own verdicts
        # are tested above.
        want = ("straggler", rec["rank"]) if rec["fault"] == "straggler" else ("network", None)
        assert (rec["reading"], rec["reading_rank"]) == want, rec
        assert rec["reading_ok"] is True, rec
        job = open_job(out / rec["name"] / "logs", truth["job_id"])
        checked = check_job(job)
        assert checked["ok"], (rec["name"], checked["lines"])
    assert "reading right in 2 of 2 run(s)" in text, text
    assert "straggler-w4" in text and "link-w4" in text, text
    # A resumed run skips what is done
    rc, text = run_job([PY, str(REPO / "benchmarks" / "scenarios.py"), "--out", str(out),
                        "--worlds", "4", "--faults", "straggler,link", "--reps", "1",
                        "--resume"], cwd=tmp_path, env=job_env(), timeout=60)
    assert rc == 0 and text.count("done before, skipped") == 2, text


def test_a_pipeline_job_reads_as_one_and_its_straggler_is_named_against_its_stage(tmp_path):
    """dp x tp x pp = 2 x 2 x 2 over 1F1B send/recv: the layout is found from the groups and
    the send/recv chains, and a rank of stage 1 doing twice the work from step 12 is the one
    straggler (its pipeline neighbours, blocked in their receives, are not)."""
    need_netns()
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=8, hosts=2, tp=2, pp=2, steps=36,
                       netns="on", job_args=("--step-sleep-ms", "40"))
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=6, straggler_mode="work",
                                         at_step=12, factor=2))
    assert result.ok, result
    assert result.ground_truth["role"] == {"stage": 1, "replica": 1, "tp_index": 0, "dp": 2,
                                           "tp": 2, "pp": 2}
    from ringwatch._analyze import analyze_job

    report = analyze_job(open_job(result.log_dir, result.job_id))
    assert (report["layout"]["dp"], report["layout"]["tp"], report["layout"]["pp"]) == (2, 2, 2)
    from ringwatch.cluster._run import read_slowed_step

    slowed = read_slowed_step(result.run_dir / "steps", 6)
    (f,) = [f for f in report["_findings"] if f.kind in ("straggler", "hang", "slow_link")]
    assert (f.kind, f.ranks) == ("straggler", (6,)), report["findings"]
    assert abs(f.since_step - slowed) <= 3

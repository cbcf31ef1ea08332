"""The local cluster's pure parts and process plumbing: specs, tbf settings, step marks, run
ownership and sweeping, the duty cycle and process ending (on real child processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from ringwatch.analyzers import compute_phase_comm
from ringwatch.cluster import ClusterSpec, FaultSpec, _owner, _procs, leftovers, read_steps, sweep
from ringwatch.cluster._faults import DutyCycle, tbf_args


@pytest.mark.parametrize("kw, msg", [
    ({"kind": "fire"}, "fault kind 'fire'"),
    ({"kind": "straggler"}, "victim rank"),
    ({"kind": "link"}, "victim host"),
    ({"kind": "straggler", "rank": 0, "severity": 1.0}, "severity"),
    ({"kind": "link", "host": 0, "rate_mbit": None}, "rate limit, a loss"),
    ({"kind": "link", "host": 0, "loss_pct": 100}, "loss 100"),
    ({"kind": "hang", "rank": 0, "hang_mode": "nap"}, "hang mode"),
    ({"kind": "hang", "rank": 0, "at_step": None}, "at_step or at_s"),
    ({"kind": "imbalance", "rank": 0, "factor": 0.5}, "factor"),
])
def test_bad_faults_fail_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FaultSpec(**kw)


def test_fault_params_keep_what_matters_for_the_kind():
    assert FaultSpec(kind="straggler", rank=1, severity=0.3).params() == \
        {"straggler_mode": "stop", "severity": 0.3, "period_s": 0.1}
    assert FaultSpec(kind="straggler", rank=1, straggler_mode="work", factor=1.5).params() == \
        {"straggler_mode": "work", "factor": 1.5}
    with pytest.raises(ValueError, match="factor"):
        FaultSpec(kind="straggler", rank=1, straggler_mode="work", factor=1.0)
    with pytest.raises(ValueError, match="straggler mode"):
        FaultSpec(kind="straggler", rank=1, straggler_mode="pause")
    assert FaultSpec(kind="link", host=0, rate_mbit=None, loss_pct=2).params() == \
        {"rate_mbit": None, "loss_pct": 2, "direction": "both"}
    assert FaultSpec().params() == {}


def test_cluster_spec_layout(tmp_path):
    spec = ClusterSpec(run_dir=tmp_path, nproc=16, hosts=4, tp=2)
    assert spec.per_host == 4 and [spec.host_of(r) for r in (0, 3, 4, 15)] == [0, 0, 1, 3]
    for kw, msg in [({"nproc": 6, "hosts": 4}, "split evenly"), ({"tp": 3}, "tp 3"),
                    ({"netns": "maybe"}, "netns"), ({"steps": 0}, "steps")]:
        with pytest.raises(ValueError, match=msg):
            ClusterSpec(run_dir=tmp_path, **kw)


def test_tbf_burst_is_20_ms_of_traffic_and_never_below_16_kib():
    args = tbf_args(100)
    assert args[:3] == ["tbf", "rate", "100mbit"]
    assert int(args[args.index("burst") + 1]) == 250_000  # 100 Mbit/s * 20 ms / 8
    slow = tbf_args(1)
    assert int(slow[slow.index("burst") + 1]) == 16 * 1024


def test_read_steps(tmp_path):
    (tmp_path / "rank-0.tsv").write_text("pid\t42\n0\t100\n1\t250\n")
    (tmp_path / "rank-1.tsv").write_text("pid\t43\n0\t101\n1\t2")  # a line being written
    assert read_steps(tmp_path) == {0: (42, [(0, 100), (1, 250)]), 1: (43, [(0, 101), (1, 2)])}


def test_run_lock_marks_a_run_alive_until_released():
    lock = _owner.RunLock()
    try:
        assert _owner.ID_RE.match(lock.id) and len(lock.id) == 10
        assert _owner.is_alive(lock.id)
        other = _owner.RunLock()
        assert other.id != lock.id
        other.release()
    finally:
        lock.release()
    assert not _owner.is_alive(lock.id)


def _child(marker: str | None, code: str = "import time; time.sleep(60)", **kw):
    env = dict(os.environ)
    if marker:
        env[_owner.ENV_MARK] = marker
    return subprocess.Popen([sys.executable, "-c", code], env=env, **kw)


def test_sweep_removes_processes_and_locks_of_a_dead_run_only():
    dead = "rw0fffff0a"
    _owner.lock_dir().mkdir(parents=True, exist_ok=True)
    (_owner.lock_dir() / f"{dead}.lock").write_text("")  # nobody holds it
    live = _owner.RunLock()
    orphan, mine = _child(dead), _child(live.id)
    try:
        time.sleep(0.3)
        left = leftovers()
        assert set(left) == {dead}, left
        assert left[dead] == [f"process {orphan.pid}", "lock file"]
        assert sweep() == [dead]
        assert orphan.wait(timeout=5) == -signal.SIGTERM
        assert mine.poll() is None  # a live run is never touched
        assert leftovers() == {}
    finally:
        for p in (orphan, mine):
            p.kill()
            p.wait()
        live.release()


def test_end_processes_kills_what_ignores_sigterm():
    stubborn = _child(None, "import signal, time; signal.signal(signal.SIGTERM, "
                      "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
                      stdout=subprocess.PIPE, text=True)
    polite = _child(None)
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    time.sleep(0.2)
    killed = _procs.end_processes([stubborn.pid, polite.pid], grace_s=0.5)
    assert killed == [stubborn.pid]
    assert stubborn.wait(timeout=5) == -signal.SIGKILL and polite.wait(timeout=5) < 0


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_duty_cycle_stops_the_process_for_its_share_and_leaves_it_running():
    p = _child(None)
    try:
        duty = DutyCycle(p.pid, severity=0.7, period_s=0.05)
        duty.start()
        samples = []
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            samples.append(_state(p.pid) == "T")
            time.sleep(0.003)
        duty.stop()
        share = sum(samples) / len(samples)
        assert 0.5 < share < 0.9, share
        time.sleep(0.05)
        assert _state(p.pid) != "T"
    finally:
        p.kill()
        p.wait()
    with pytest.raises(ValueError):
        DutyCycle(1, 0)


def test_phase_comm_compares_medians_before_and_after_onset():
    rows = [{"rank": r, "step": s, "comm_ns": (10 if s < 5 or r == 1 else 30) * 1_000_000}
            for r in (0, 1) for s in range(10)]
    ph = compute_phase_comm(pl.DataFrame(rows), 5, warmup_steps=1, settle_steps=1)
    assert ph.rows() == [(0, 10e6, 30e6, 20e6, 4, 4), (1, 10e6, 10e6, 0.0, 4, 4)]
    none = compute_phase_comm(pl.DataFrame(rows), None, warmup_steps=0)
    assert none["after_ns"].is_null().all() and none["steps_before"].to_list() == [10, 10]


def test_in_job_faults_parse_and_bad_ones_fail():
    from ringwatch.cluster._fr_dump import parse_in_job_faults

    assert parse_in_job_faults(["block:1,2@8", "kill:3@9"]) == {
        8: {1: "block", 2: "block"}, 9: {3: "kill"}}
    assert parse_in_job_faults([]) == {}
    for bad in ("nap:1@3", "block:@3", "block:1", "block:x@3", "block:1@-2"):
        with pytest.raises(ValueError, match="MODE:RANKS@STEP"):
            parse_in_job_faults([bad])


@pytest.mark.parametrize("as_json", [False, True])
def test_fr_dumper_writes_pytorchs_dump_once_as_pytorch_names_it(tmp_path, as_json):
    from ringwatch._flight_recorder import load_dump
    from ringwatch.cluster._fr_dump import FrDumper

    d = FrDumper(str(tmp_path / "fr" / "nccl_trace_rank_"), 3, as_json=as_json, after_s=60)
    d.dump()
    path = tmp_path / "fr" / "nccl_trace_rank_3"
    head = path.read_bytes()[:1]
    assert head == (b"{" if as_json else b"\x80")
    assert load_dump(path)["version"].startswith("2.")
    path.unlink()
    d.dump()  # once only
    assert not path.exists() and list((tmp_path / "fr").iterdir()) == []

"""The detection benchmark's scoring (benchmarks/_scoring.py) and its handling of run folders
that cannot be scored (benchmarks/detection.py), on hand-made ground truths and findings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ringwatch.analyzers import Finding

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
S = 1_000_000_000
T0 = 1_800_000_000 * S  # wall clock of step 0
STEP_NS = 400_000_000  # every rank starts step k at T0 + k * STEP_NS (+ a rank offset)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # detection.py imports _scoring by name, as when run as a script
    spec.loader.exec_module(mod)
    return mod


sc = _load("_scoring")


def marks(world=4, steps=61, offset_ns=1_000_000):
    """Step marks: rank r starts step k at T0 + k * STEP_NS + r * offset_ns."""
    return {r: {k: T0 + k * STEP_NS + r * offset_ns for k in range(steps)} for r in range(world)}


def truth(kind, *, rank=None, host=None, onset_step=20, onset_ns=None, world=4, **params):
    fault = kind not in ("none", "imbalance")
    if kind == "none":
        onset_step = None
    elif onset_ns is None:
        onset_ns = T0 + onset_step * STEP_NS + 50_000_000  # 50 ms into the onset step
    return {"format": "ringwatch-ground-truth/1", "kind": kind, "is_fault": fault,
            "rank": rank, "host": host, "onset_step": onset_step, "onset_wall_ns": onset_ns,
            "world_size": world, "params": params, "applied": kind != "none",
            "outcome": {"reason": "hang held" if kind == "hang" else "completed"}}


def straggler(rank, detected, kind="straggler", host=None):
    return Finding(kind=kind, cls="compute straggler" if kind == "straggler"
                   else "structural imbalance", ranks=(rank,),
                   hosts=(host or f"host{rank // 2}",), since_step=detected - 2,
                   detected_step=detected)


def test_straggler_true_positive_and_its_latency():
    t = truth("straggler", rank=1)
    s = sc.score_run(t, [straggler(1, 23)], marks=marks())
    (f,) = s.findings
    assert f.verdict == sc.TP and s.detected and s.culprit_ok
    assert s.latency_steps == 3 and f.latency_steps == 3
    # end of step 23 = start of step 24 on the victim (rank 1), minus the onset
    end = T0 + 24 * STEP_NS + 1 * 1_000_000
    assert f.detect_wall_ns == end
    assert s.latency_s == pytest.approx((end - t["onset_wall_ns"]) / 1e9)
    assert s.latency_s == pytest.approx(4 * 0.4 - 0.05 + 0.001)  # 4 step starts later


def test_latency_counts_from_when_the_fault_took_effect_where_recorded():
    m = marks()
    t = {**truth("straggler", rank=1), "effect_step": 22,
         "effect_wall_ns": m[1][22]}  # the victim ran slowed from step 22
    s = sc.score_run(t, [straggler(1, 24)], marks=m)
    assert s.latency_steps == 2
    assert s.latency_s == pytest.approx(3 * 0.4)  # step 25 began 3 steps after step 22 did
    assert sc.score_run(t, [straggler(1, 24)], marks=m, from_trigger=True).latency_steps == 4
    # no record (older runs, other faults): the trigger
    assert sc.effective_onset({**t, "effect_step": None}) == {**t, "effect_step": None}


def test_the_victims_mark_or_else_rank_0s():
    m = marks()
    del m[1][24]
    s = sc.score_run(truth("straggler", rank=1), [straggler(1, 23)], marks=m)
    assert s.findings[0].detect_wall_ns == T0 + 24 * STEP_NS  # rank 0's
    s = sc.score_run(truth("straggler", rank=1), [straggler(1, 70)], marks=m)
    assert s.culprit_ok and s.latency_steps == 50 and s.latency_s is None  # no mark that late


def test_wrong_culprit_counts_against_culprit_accuracy_not_precision():
    s = sc.score_run(truth("straggler", rank=1), [straggler(2, 23)], marks=marks())
    assert s.findings[0].verdict == sc.WRONG
    assert s.detected and not s.culprit_ok and s.latency_steps is None
    tp = sc.score_run(truth("straggler", rank=3), [straggler(3, 22)], marks=marks())
    summary = sc.summarize([s, tp])
    assert (summary["tp"], summary["fp"], summary["wrong"]) == (1, 0, 1)
    assert summary["precision"] == 1.0
    assert summary["recall"] == 1.0 and summary["culprit_accuracy"] == 0.5
    assert summary["latency_steps"] == {"median": 2, "max": 2}


def test_every_finding_on_a_healthy_run_is_a_false_positive():
    quiet = sc.score_run(truth("none"), [], marks=marks())
    noisy = sc.score_run(truth("none"), [straggler(0, 30),
                                         straggler(2, 5, kind="imbalance")], marks=marks())
    assert [f.verdict for f in noisy.findings] == [sc.FP, sc.FP]
    assert not noisy.detected and noisy.latency_s is None
    summary = sc.summarize([quiet, noisy])
    assert summary["precision"] == 0.0 and summary["fp"] == 2
    assert summary["recall"] is None  # nothing to recall on healthy runs
    assert sc.summarize([quiet])["precision"] is None
    (crit,) = [a for a in sc.acceptance([quiet, noisy], {}) if a["fault"] == "none"]
    assert crit["status"] == "not met" and "1/2" in crit["detail"]
    (crit,) = [a for a in sc.acceptance([quiet], {}) if a["fault"] == "none"]
    assert crit["status"] == "met"


def test_a_rank_slow_from_the_start_reported_as_imbalance_is_a_false_positive():
    # data-parallel replicas do the same work: one slower from launch is a straggler
    t = truth("imbalance", rank=3, onset_step=0, onset_ns=T0 - 9 * S)  # recorded at launch
    wrong = sc.score_run(t, [straggler(3, 25, kind="imbalance")], marks=marks())
    assert wrong.findings[0].verdict == sc.FP and not wrong.detected
    right = sc.score_run(t, [straggler(3, 4)], marks=marks())
    assert right.culprit_ok and right.latency_steps == 4
    # onset: the start of step 0 on the victim, not the launch 9 s before it
    assert right.onset_ns == T0 + 3_000_000
    assert right.latency_s == pytest.approx(5 * 0.4)
    acc = {a["fault"]: a for a in sc.acceptance([wrong, right], {})}
    assert acc["imbalance"]["status"] == "not met"
    acc = {a["fault"]: a for a in sc.acceptance([right], {})}
    assert acc["imbalance"]["status"] == "met"
    both = sc.score_run(t, [straggler(3, 4), straggler(1, 30)], marks=marks())
    acc = {a["fault"]: a for a in sc.acceptance([both], {})}
    assert both.culprit_ok and acc["imbalance"]["status"] == "not met"
    assert "1 other finding(s)" in acc["imbalance"]["detail"]


def hang(ranks, since_ns, cls="never arrived"):
    return Finding(kind="hang", cls=cls, ranks=tuple(ranks), since_ns=since_ns, since_step=20)


def test_hang_latency_is_the_stall_reaching_the_threshold():
    t = truth("hang", rank=2, hang_mode="block")
    since = t["onset_wall_ns"] + 300_000_000
    s = sc.score_run(t, [hang([2], since)], min_stall_s=10.0)
    assert s.culprit_ok and s.latency_steps is None
    assert s.latency_s == pytest.approx(10.3)
    assert s.expected_cls == "never arrived" and s.cls_ok
    fast = sc.score_run(t, [hang([2], since)], min_stall_s=5.0)
    assert fast.latency_s == pytest.approx(5.3)
    acc = {a["fault"]: a for a in sc.acceptance([s, fast], {})}
    assert acc["hang"]["status"] == "not met" and "1/2" in acc["hang"]["detail"]
    # a stuck group naming several ranks is right when the victim is among them
    grp = sc.score_run(t, [hang([1, 2], since, cls="stuck in the collective")])
    assert grp.culprit_ok and grp.cls_ok is False
    other = sc.score_run(t, [hang([0], since)])
    assert other.findings[0].verdict == sc.WRONG and other.cls_ok is None


def test_stop_mode_expects_rank_not_running():
    t = truth("hang", rank=2, hang_mode="stop")
    s = sc.score_run(t, [hang([2], t["onset_wall_ns"], cls="rank not running")])
    assert s.expected_cls == "rank not running" and s.cls_ok
    s = sc.score_run(t, [hang([2], t["onset_wall_ns"])])
    assert s.culprit_ok and s.cls_ok is False  # still the right rank


def test_link_is_matched_by_host():
    t = truth("link", host="host1", world=8)
    link = lambda hosts: Finding(kind="slow_link", cls="slow link", ranks=(2, 3),
                                 hosts=hosts, since_step=20, detected_step=26)
    s = sc.score_run(t, [link(("host1",))], marks=marks(world=8))
    assert s.culprit_ok and s.latency_steps == 6
    # no victim rank: the end of the step is read on rank 0
    assert s.findings[0].detect_wall_ns == T0 + 27 * STEP_NS
    assert sc.score_run(t, [link(("host0",))]).findings[0].verdict == sc.WRONG
    missed = sc.score_run(t, [straggler(2, 25)], marks=marks(world=8))
    assert missed.findings[0].verdict == sc.FP
    summary = sc.summarize([s, missed])
    assert summary["recall"] == 0.5 and summary["precision"] == 0.5


def test_straggler_acceptance_bound_and_unscored_runs():
    at3 = sc.score_run(truth("straggler", rank=0), [straggler(0, 23)], marks=marks())
    at4 = sc.score_run(truth("straggler", rank=0), [straggler(0, 24)], marks=marks())
    acc = {a["fault"]: a for a in sc.acceptance([at3], {})}
    assert acc["straggler"]["status"] == "met"
    acc = {a["fault"]: a for a in sc.acceptance([at3, at4], {})}
    assert acc["straggler"]["status"] == "not met" and "3, 4" in acc["straggler"]["detail"]
    acc = {a["fault"]: a for a in sc.acceptance([at3], {"straggler": 1})}
    assert acc["straggler"]["status"] == "incomplete"
    assert acc["link"]["status"] == "incomplete"  # no link run at all
    assert sc.summarize([at3], unscored=1)["runs"] == 2


# ---- run folders -------------------------------------------------------------------------


def _run(root: Path, name: str, t: dict | None, logs: bool = False) -> None:
    d = root / name
    d.mkdir(parents=True)
    if t is not None:
        (d / "ground_truth.json").write_text(json.dumps({**t, "job_id": name}))
    if logs:
        (d / "logs").mkdir()


def test_runs_that_cannot_be_scored_are_reported(tmp_path):
    det = _load("detection")
    failed = {**truth("straggler", rank=1), "outcome": {"reason": "timeout"}}
    unapplied = {**truth("hang", rank=0), "applied": False}
    _run(tmp_path, "straggler-w4-r0", failed)
    _run(tmp_path, "hang-w4-r0", unapplied)
    _run(tmp_path, "none-w4-r0", truth("none"), logs=True)  # an empty log folder
    _run(tmp_path, "link-w8-r0", {**truth("link", host="host0", world=8), "outcome": None})
    _run(tmp_path, "imbalance-w4-r0", None)
    _run(tmp_path, "mystery-w4-r0", {**truth("none"), "kind": "mystery"})
    lines = [{"name": "gone-w4-r0", "fault": "hang", "world": 4},
             {"name": "straggler-w4-r0", "fault": "straggler", "world": 4, "ok": True},
             {"name": "imbalance-w4-r0", "fault": "imbalance", "world": 4}]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    runs = det.list_runs(tmp_path)
    # runs.jsonl's order, then the other run folders
    assert [r[0] for r in runs] == ["gone-w4-r0", "straggler-w4-r0", "imbalance-w4-r0",
                                    "hang-w4-r0", "link-w8-r0", "mystery-w4-r0",
                                    "none-w4-r0"]
    got = {name: det.score_folder_run(tmp_path, name, d, rec, None)
           for name, d, rec in runs}
    status = {n: r["status"] for n, r in got.items()}
    assert status["gone-w4-r0"] == "run folder missing"
    assert status["straggler-w4-r0"] == "run ended: timeout"
    assert status["hang-w4-r0"] == "fault not applied"
    assert status["none-w4-r0"].startswith("logs: ")
    assert status["link-w8-r0"].startswith("run not finished")
    assert status["imbalance-w4-r0"] == "no readable ground_truth.json"
    assert status["mystery-w4-r0"] == "unknown fault kind 'mystery'"
    assert (got["gone-w4-r0"]["fault"], got["gone-w4-r0"]["world"]) == ("hang", 4)
    assert (got["link-w8-r0"]["fault"], got["link-w8-r0"]["world"]) == ("link", 8)
    records = list(got.values())
    text = "\n".join(det.report(records, markdown=False, per_run=True))
    assert "7 run(s) not scored" in text
    assert "NOT SCORED: run ended: timeout" in text
    rows = dict(det.scenario_rows(records))
    assert rows["hang-w4"]["unscored"] == 2 and rows["hang-w4"]["scored"] == 0
    acc = {a["fault"]: a["status"] for a in det.accept(records)}
    assert acc["hang"] == "incomplete" and acc["none"] == "incomplete"
    assert det.main([str(tmp_path)]) == 2


def test_run_passes_the_matrix_flags_to_the_scenario_runner(tmp_path, monkeypatch):
    det = _load("detection")
    seen = []

    class FakeScenarios:  # stands in for benchmarks/scenarios.py: no cluster is started
        @staticmethod
        def main(argv):
            seen.append(argv)
            out = Path(argv[argv.index("--out") + 1])
            _run(out, "hang-w4-r0", {**truth("hang", rank=0), "outcome": {"reason": "failed"}})
            return 1

    monkeypatch.setitem(sys.modules, "scenarios", FakeScenarios)
    out = tmp_path / "s"
    rc = det.main(["--run", "--out", str(out), "--worlds", "4", "--reps", "1", "--faults",
                   "hang", "--seed", "3", "--json", str(tmp_path / "d.json")])
    assert seen == [["--out", str(out), "--worlds", "4", "--reps", "1", "--faults", "hang",
                     "--seed", "3"]]
    assert rc == 2  # the one run failed: reported, not dropped
    doc = json.loads((tmp_path / "d.json").read_text())
    assert [(r["name"], r["status"]) for r in doc["runs"]] == [("hang-w4-r0",
                                                                "run ended: failed")]
    assert det.main(["--run"]) == 1  # --run needs --out

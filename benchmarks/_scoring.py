"""Scoring of analyzer findings against a scenario run's ground truth (pure: no I/O).

Used by ``benchmarks/detection.py``; the rules are spelled out in its docstring and in
``benchmarks/README.md``. Inputs are the ground-truth record (``ringwatch-ground-truth/1``),
the findings (anything with the attributes of :class:`ringwatch.analyzers.Finding`) and the
job's step marks; outputs are frozen dataclasses and plain dicts.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

# The finding each scenario should produce (None: nothing at all).
# ``imbalance`` is the scenario of a rank doing more work from launch: among data-parallel
# replicas, which do the same work by construction, that is a straggler from the start.
EXPECTED_KIND = {"none": None, "straggler": "straggler", "hang": "hang", "link": "slow_link",
                 "imbalance": "straggler"}
FAULTS = ("straggler", "hang", "link")  # injected mid-run; none is healthy
SCENARIO_ORDER = ("none", "straggler", "hang", "link", "imbalance")
# Class of a hang finding per injection mode: ``block`` freezes the main thread while the
# agent's threads keep writing; ``stop`` SIGSTOPs the whole process, agent included, which the
# hang analyzer reports as not running once its peers' agents outlive it by ``silent_s``.
HANG_CLASS = {"block": "never arrived", "stop": "rank not running"}
# Acceptance bounds from the issue.
STRAGGLER_MAX_STEPS = 3
HANG_MAX_S = 10.0

TP, WRONG, FP = "tp", "wrong culprit", "fp"


@dataclass(frozen=True)
class FindingScore:
    """One finding held against the ground truth.

    Attributes:
        kind, cls, ranks, hosts, since_step, detected_step, since_ns: From the finding.
        verdict: ``tp`` (expected kind, right culprit), ``wrong culprit`` (expected kind,
            victim not named) or ``fp`` (any other finding).
        detect_wall_ns: Wall clock when the evidence was complete (see :func:`detect_wall_ns`),
            None when it cannot be placed.
        latency_steps: ``detected_step - onset_step``; None without a ``detected_step``.
        latency_s: ``(detect_wall_ns - onset) / 1e9``; None when either is unknown.
    """

    kind: str
    cls: str
    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    since_step: int | None
    detected_step: int | None
    since_ns: int | None
    verdict: str
    detect_wall_ns: int | None
    latency_steps: int | None
    latency_s: float | None


@dataclass(frozen=True)
class RunScore:
    """One scored run.

    Attributes:
        fault: The ground truth's kind (``none``, ``straggler``, ``hang``, ``link``,
            ``imbalance``).
        world: World size.
        expected_kind: The finding kind expected (None for a healthy run).
        findings: Every finding, scored.
        detected: A finding of the expected kind is there (right culprit or not).
        culprit_ok: One of them names the victim (a true positive).
        latency_steps, latency_s: Of the earliest true positive (each the smallest over the
            true positives); None without one.
        expected_cls, cls_ok: For hangs, the class the injection mode should give and whether a
            true positive has it (None for other kinds).
        onset_ns: The onset the seconds are counted from (see :func:`onset_wall_ns`).
    """

    fault: str
    world: int
    expected_kind: str | None
    findings: tuple[FindingScore, ...]
    detected: bool
    culprit_ok: bool
    latency_steps: int | None
    latency_s: float | None
    expected_cls: str | None
    cls_ok: bool | None
    onset_ns: int | None

    def count(self, verdict: str) -> int:
        return sum(f.verdict == verdict for f in self.findings)

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in d["findings"]:
            f["ranks"], f["hosts"] = list(f["ranks"]), list(f["hosts"])
        return d


def culprit_matches(finding, truth: Mapping) -> bool:
    """Whether a finding names the victim: the victim host for a link fault, else the victim
    rank among the finding's ranks."""
    if truth["kind"] == "link":
        # named: the one suspect; a host among several suspects is not a culprit found
        return truth.get("host") is not None and tuple(finding.hosts) == (truth["host"],)
    return truth.get("rank") is not None and truth["rank"] in tuple(finding.ranks)


def onset_wall_ns(truth: Mapping, marks: Mapping[int, Mapping[int, int]]) -> int | None:
    """When the fault took effect: the ground truth's ``onset_wall_ns``, or the start of
    ``onset_step`` on the victim rank (rank 0 when no victim rank) when that is later. A
    fault present from the start (imbalance) is recorded at launch, before the job's first
    step: its onset is then the start of step ``onset_step``."""
    onset = truth.get("onset_wall_ns")
    step = truth.get("onset_step")
    start = _mark(marks, truth.get("rank"), step) if step is not None else None
    if onset is None:
        return start
    return max(onset, start) if start is not None else onset


def _mark(marks: Mapping[int, Mapping[int, int]], rank: int | None, step: int) -> int | None:
    for r in (rank, 0):
        if r is not None and step in marks.get(r, {}):
            return marks[r][step]
    return None


def detect_wall_ns(finding, truth: Mapping, marks: Mapping[int, Mapping[int, int]], *,
                   min_stall_s: float) -> int | None:
    """Wall clock when a finding's evidence was complete.

    A finding with a ``detected_ns`` (a hang: when its stall reached the analyzer's threshold):
    that. A finding with a ``detected_step``: the end of that step, i.e. when step
    ``detected_step + 1`` began on the victim rank (rank 0 for a run without a victim rank,
    or when the victim has no such mark). A finding with only ``since_ns`` (a hang: when the
    oldest blocking collective was entered): ``since_ns + min_stall_s``, the moment the stall
    reached the analyzer's threshold.
    """
    if getattr(finding, "detected_ns", None) is not None:
        return finding.detected_ns
    if finding.detected_step is not None:
        return _mark(marks, truth.get("rank"), finding.detected_step + 1)
    if finding.since_ns is not None:
        return finding.since_ns + int(min_stall_s * 1e9)
    return None


def effective_onset(truth: Mapping, from_trigger: bool = False) -> Mapping:
    """``truth`` with its onset moved to when the fault took effect on the victim, where the
    run recorded it (``effect_step``: the first step a ``work`` straggler ran slowed; it takes
    the runner's signal at its next step boundary, a step or two after the runner saw
    ``onset_step``); unchanged with ``from_trigger`` or without the record."""
    if from_trigger or truth.get("effect_step") is None:
        return truth
    return {**truth, "onset_step": truth["effect_step"],
            "onset_wall_ns": truth.get("effect_wall_ns") or truth.get("onset_wall_ns")}


def score_run(truth: Mapping, findings: Iterable, *,
              marks: Mapping[int, Mapping[int, int]] | None = None,
              min_stall_s: float = 10.0, from_trigger: bool = False) -> RunScore:
    """Score one run's findings against its ground truth.

    Args:
        truth: The ground-truth record (``kind``, ``rank``, ``host``, ``onset_step``,
            ``onset_wall_ns``, ``world_size``, ``params``).
        findings: The analyzers' findings for the run.
        marks: ``{rank: {step: wall ns when the step began}}`` from ``steps/rank-N.tsv``.
        min_stall_s: The hang analyzer's threshold the findings were made with (s).
        from_trigger: Count latencies from the runner's trigger (``onset_step``) even where
            the run recorded when the fault took effect (:func:`effective_onset`).

    Returns:
        The :class:`RunScore`.
    """
    marks = marks or {}
    truth = effective_onset(truth, from_trigger)
    fault = truth["kind"]
    expected = EXPECTED_KIND[fault]
    onset = onset_wall_ns(truth, marks)
    onset_step = truth.get("onset_step")
    scored = []
    for f in findings:
        if expected is None or f.kind != expected:
            verdict = FP
        else:
            verdict = TP if culprit_matches(f, truth) else WRONG
        wall = detect_wall_ns(f, truth, marks, min_stall_s=min_stall_s)
        steps = (f.detected_step - onset_step
                 if f.detected_step is not None and onset_step is not None else None)
        secs = (wall - onset) / 1e9 if wall is not None and onset is not None else None
        scored.append(FindingScore(
            kind=f.kind, cls=f.cls, ranks=tuple(f.ranks), hosts=tuple(f.hosts),
            since_step=f.since_step, detected_step=f.detected_step, since_ns=f.since_ns,
            verdict=verdict, detect_wall_ns=wall, latency_steps=steps, latency_s=secs))
    tps = [f for f in scored if f.verdict == TP]
    expected_cls = cls_ok = None
    if fault == "hang":
        expected_cls = HANG_CLASS.get((truth.get("params") or {}).get("hang_mode", "block"))
        cls_ok = any(f.cls == expected_cls for f in tps) if tps else None
    return RunScore(
        fault=fault, world=int(truth.get("world_size") or 0), expected_kind=expected,
        findings=tuple(scored), detected=any(f.verdict in (TP, WRONG) for f in scored),
        culprit_ok=bool(tps),
        latency_steps=_least(f.latency_steps for f in tps),
        latency_s=_least(f.latency_s for f in tps),
        expected_cls=expected_cls, cls_ok=cls_ok, onset_ns=onset)


def _least(values):
    vs = [v for v in values if v is not None]
    return min(vs) if vs else None


# ---- aggregation -------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(scores: Sequence[RunScore], unscored: int = 0) -> dict:
    """Figures over a set of runs of one scenario (or of one fault, all worlds).

    Returns:
        ``runs`` (scored + unscored), ``scored``, ``unscored``, ``tp``, ``fp``, ``wrong``
        (findings), ``precision`` (TP / (TP + FP) over findings), ``detected`` and
        ``recall`` (runs with a finding of the expected kind / scored runs; None for healthy
        runs), ``right_culprit`` and ``culprit_accuracy`` (runs with a true positive / runs
        detected), ``latency_steps`` and ``latency_s`` (median and max over the runs' true
        positives, None when none), ``findings`` (all findings).
    """
    tp = sum(s.count(TP) for s in scores)
    fp = sum(s.count(FP) for s in scores)
    wrong = sum(s.count(WRONG) for s in scores)
    detected = sum(s.detected for s in scores)
    right = sum(s.culprit_ok for s in scores)
    healthy = bool(scores) and all(s.expected_kind is None for s in scores)

    def spread(values):
        vs = [v for v in values if v is not None]
        return {"median": statistics.median(vs), "max": max(vs)} if vs else None

    return {"runs": len(scores) + unscored, "scored": len(scores), "unscored": unscored,
            "findings": sum(len(s.findings) for s in scores),
            "tp": tp, "fp": fp, "wrong": wrong, "precision": _ratio(tp, tp + fp),
            "detected": detected,
            "recall": None if healthy else _ratio(detected, len(scores)),
            "right_culprit": right, "culprit_accuracy": _ratio(right, detected),
            "latency_steps": spread(s.latency_steps for s in scores),
            "latency_s": spread(s.latency_s for s in scores)}


def acceptance(scores: Sequence[RunScore], unscored: Mapping[str, int]) -> list[dict]:
    """The issue's acceptance criteria, each ``{"criterion", "status", "detail"}``.

    ``status`` is ``met``, ``not met``, or ``incomplete`` (every scored run passes but some
    runs of the scenario could not be scored, or there were none).
    """
    by = {k: [s for s in scores if s.fault == k] for k in SCENARIO_ORDER}
    checks = [
        ("straggler", f"every straggler found, right rank, within {STRAGGLER_MAX_STEPS} "
                      "iterations of onset",
         lambda s: s.culprit_ok and s.latency_steps is not None
         and s.latency_steps <= STRAGGLER_MAX_STEPS),
        ("hang", f"every hang found, right rank, within {HANG_MAX_S:g} s of onset",
         lambda s: s.culprit_ok and s.latency_s is not None and s.latency_s <= HANG_MAX_S),
        ("link", "every degraded link found, right host",
         lambda s: s.culprit_ok),
        ("none", "zero findings on the healthy runs",
         lambda s: not s.findings),
        ("imbalance", "every rank slow from the start (imbalance run) found as a straggler "
                      "(right rank), with no other finding",
         lambda s: s.culprit_ok and all(f.verdict == TP for f in s.findings)),
    ]
    out = []
    for fault, text, passes in checks:
        runs = by[fault]
        good = [s for s in runs if passes(s)]
        missing = unscored.get(fault, 0)
        detail = f"{len(good)}/{len(runs)} scored runs pass"
        if fault == "none":
            detail += f" ({sum(len(s.findings) for s in runs)} finding(s) in all)"
        elif fault == "straggler":
            detail += f"; latencies (iterations): {_values(s.latency_steps for s in runs)}"
        elif fault == "hang":
            detail += f"; latencies (s): {_values([s.latency_s for s in runs], '.3f')}"
        elif fault == "imbalance":
            other = sum(f.verdict != TP for s in runs for f in s.findings)
            detail += f"; {other} other finding(s)"
        if missing:
            detail += f"; {missing} run(s) not scored"
        if len(good) < len(runs):
            status = "not met"
        elif missing or not runs:
            status = "incomplete"
        else:
            status = "met"
        out.append({"criterion": text, "fault": fault, "status": status, "detail": detail})
    return out


def _values(values, fmt: str = "") -> str:
    return ", ".join("missed" if v is None else format(v, fmt) for v in values) or "-"

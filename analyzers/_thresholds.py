"""Every threshold of the job analyzers, in one frozen, documented object.

:class:`Thresholds` is what ``ringwatch analyze`` (``--threshold NAME=VALUE``,
``--thresholds FILE``), ``ringwatch serve`` (the same flags, and its control API
``POST /api/v1/control {"thresholds": {...}}``) and the Python API
(``analyze_events(..., thresholds=...)``) hand to the detectors. The detectors' own keyword
arguments default to :data:`DEFAULT_THRESHOLDS`, so there is one place where a default lives.

Counts of steps are steps *seen* (a job numbered 50000, 50010, ... has its tenth step at its
tenth row of steps); shares are of the job's typical step time (:func:`typical_step_s`), so that
a rule scales with the job: the absolute floors in ms only bind on slow jobs.

A config file is TOML with the names below at its top level or under ``[thresholds]``::

    [thresholds]
    cusum_threshold = 8.0     # less eager straggler detection
    min_stall_s = 120         # a hang is a group stuck for 2 minutes
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ThresholdError(ValueError):
    """An unknown threshold name, or a value of the wrong kind or out of range."""


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """The analyzers' thresholds. Field docs are the ``help`` of each field (:func:`describe`).

    Steps:
        warmup_steps: Leading steps (seen) left out of every baseline, at least.
        warmup_slow_ratio: Leading steps that took more than this many times the job's usual
            step are warm-up too (compilation, autotuning).
        baseline_steps: Steps (seen) after the warm-up that give a job's usual timings and
            noise, and show a rank behind from the start (imbalance).
        min_baseline_steps: Fewest baseline steps a detector needs before it judges.
        drift_steps: After the baseline, each rank's usual lateness follows slow drift as a
            mean with this time constant in steps, fed only by steps outside any late
            streak, so a fault is not absorbed (0: the baseline's usual is kept).

    Stragglers (who the others wait for at collectives):
        cusum_threshold: CUSUM of a rank's excess lateness (in noise units) that makes it a
            straggler.
        cusum_slack: Excess (in noise units) each step must pass to add to the CUSUM.
            On a pipeline's unblocked time, one step adds at most ``cusum_threshold /
            (2 persist_steps)`` (:func:`~ringwatch.analyzers._work.step_cap`): a burst of
            a few steps far behind is no straggler; ``persist_steps`` steps in a row each
            behind by ``cusum_threshold`` or more are one.
        persist_steps: Steps with excess a straggler needs among its last ``persist_steps +
            1``, and busy steps in a row (late while busier than its peers) that make one
            without the CUSUM; also the quiet steps (plus one) that end one.
        busier_ratio: Time outside collectives, as a multiple of the median rank's, that
            counts as "busier than its peers".
        noise_floor_ms: Least noise (ms) a job is judged on ...
        noise_floor_share: ... or this share of its step, where less (µs collectives).
        min_delay_ms: Least delay (ms) per step worth a finding ...
        min_delay_share: ... or this share of the step, where less.
        imbalance_noise: A rank late by this many noise units from the first steps (and by
            the least delay) is structural imbalance when its stage is late with it, a
            straggler from the start when it is late against its stage's other ranks. A
            rank on time in its first baseline steps that rose by this many noise units
            within them, for good, is neither: its baseline ends where it rose, and it is
            judged from there as any straggler.
        transient_steps: A straggler, or a slow link's episode (one that did not fall twice
            as far as its bar), that ended within this many steps is a hiccup, not a
            finding; live, a young one is held back until it has surely lasted this long
            (``persist_steps``, or ``link_persist_steps``, more: an open one may have been on
            time in its last few).
        min_gain_share: Least what-if gain of a straggler or a slow link, as a share of the
            step (0 keeps every one).

    Hangs:
        min_stall_s: A group stuck this long is hung (null: the larger of
            ``stall_floor_s`` and ``stall_steps`` steps).
        stall_floor_s: Least stall (s) when ``min_stall_s`` is null.
        stall_steps: Stall in steps when ``min_stall_s`` is null: the job's usual step, or
            its newest three steps' when longer (steps that all slowed raise the bar).
        silent_s: An agent silent this much longer than its peers' newest flush (s) is a
            rank that is not running.

    Slow links:
        link_ratio: A group whose bandwidth fell below its usual by this factor is slow.
            Its usual is the median of its baseline steps, or of those before a fall within
            them that lasts to their end, is itself slow by this ratio and ``link_noise``,
            and parts the steps (all but one after it slower than all but one before it: a
            link that goes bad a few steps into a job is judged against the steps before it,
            not absorbed by them).
        link_persist_steps: Slow steps in a row that make a slow link; as many steps in a
            row that are not slow end its episode.
        link_noise: ... and, where the group's bandwidth varies more than that from step to
            step, below its usual by this many of its own noise units (the robust spread of
            the log bandwidth over its baseline steps; 0: the ratio alone).

    Pipelines (unblocked time against the stage's):
        work_floor_ms: Least noise (ms) of unblocked time ...
        work_floor_share: ... or this share of the step, whichever is larger.
        work_start_share: A rank over its role's median (by ``cusum_threshold`` noise units)
            in this share of the baseline steps is behind from the start: a straggler.
        role_share: A role (stage) whose median work exceeds the others' by this share of
            the step is the bottleneck by design: structural imbalance.
        wander_share: Replicas of a role whose work spreads by this share of the step, with
            no replica on top more often than chance, are workload imbalance.

    Mixture of experts (all-to-all):
        a2a_skew_ratio: A rank whose all-to-all bytes are this many times its group's median
            member's is skewed in that step (its experts receive too many tokens).
        a2a_hot_share: A rank skewed in this share of its steps from an onset on is a hot
            expert.

    Episodes:
        grace_steps: A straggler (not a hiccup) that is on time for a while and conclusive
            again within this many steps of its last late step is the same episode (a
            disturbance hid it); so it ends only once this many steps have gone by without
            it. Live, an open straggler may also go unseen this long in the online window
            before it resolves. The same for a pipeline's stragglers, judged by their work
            (:func:`~ringwatch.analyzers._work.work_episodes`).
    """

    warmup_steps: int = 2
    warmup_slow_ratio: float = 3.0
    baseline_steps: int = 20
    min_baseline_steps: int = 5
    drift_steps: int = 200
    cusum_threshold: float = 6.0
    cusum_slack: float = 1.0
    persist_steps: int = 3
    busier_ratio: float = 1.5
    noise_floor_ms: float = 2.0
    noise_floor_share: float = 0.05
    min_delay_ms: float = 3.0
    min_delay_share: float = 0.075
    imbalance_noise: float = 3.0
    transient_steps: int = 8
    min_gain_share: float = 0.05
    min_stall_s: float | None = None
    stall_floor_s: float = 5.0
    stall_steps: float = 10.0
    silent_s: float = 10.0
    link_ratio: float = 2.0
    link_persist_steps: int = 4
    link_noise: float = 2.0
    work_floor_ms: float = 1.0
    work_floor_share: float = 0.02
    work_start_share: float = 0.75
    role_share: float = 0.10
    wander_share: float = 0.05
    a2a_skew_ratio: float = 1.5
    a2a_hot_share: float = 0.75
    grace_steps: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in _NULLABLE:
                continue
            if f.name in _INTS:
                if not isinstance(v, int) or isinstance(v, bool) or v < _LEAST.get(f.name, 1):
                    raise ThresholdError(f"{f.name}={v!r}: expected an integer >= "
                                         f"{_LEAST.get(f.name, 1)}")
                continue
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ThresholdError(f"{f.name}={v!r}: expected a number")
            least = _LEAST.get(f.name)
            if (least is None and v <= 0) or (least is not None and v < least):
                raise ThresholdError(f"{f.name}={v!r}: expected "
                                     + ("> 0" if least is None else f">= {least}"))
            if f.name in _SHARES and v >= 1:
                raise ThresholdError(f"{f.name}={v!r}: expected a share below 1")
        if min(self.busier_ratio, self.link_ratio, self.a2a_skew_ratio,
               self.warmup_slow_ratio) <= 1:
            raise ThresholdError("busier_ratio, link_ratio, a2a_skew_ratio and "
                                 "warmup_slow_ratio: expected > 1")
        if self.min_baseline_steps > self.baseline_steps:
            raise ThresholdError(f"min_baseline_steps {self.min_baseline_steps} > "
                                 f"baseline_steps {self.baseline_steps}")

    # --- building -----------------------------------------------------------------------------
    def with_values(self, values: Mapping[str, object]) -> Thresholds:
        """A copy with ``values`` (``name: value``; ``None`` or ``"default"`` puts a field back
        to its default) validated.

        Raises:
            ThresholdError: an unknown name, or a bad value.
        """
        if not isinstance(values, Mapping):
            raise ThresholdError("thresholds must be an object of NAME: value")
        unknown = sorted(set(values) - set(NAMES))
        if unknown:
            raise ThresholdError(f"unknown threshold(s): {', '.join(map(str, unknown))}; "
                                 f"known: {', '.join(NAMES)}")
        out = {}
        for k, v in values.items():
            if v is None or v == "default":
                out[k] = getattr(DEFAULT_THRESHOLDS, k)
            elif k in _INTS and isinstance(v, float) and v.is_integer():
                out[k] = int(v)  # JSON and TOML writers give 8.0 for 8
            else:
                out[k] = v
        try:
            return replace(self, **out)
        except TypeError as exc:  # pragma: no cover - names were checked above
            raise ThresholdError(str(exc)) from None

    def with_assignments(self, items: Iterable[str]) -> Thresholds:
        """A copy with ``NAME=VALUE`` strings (the CLI's ``--threshold``) applied."""
        values: dict[str, object] = {}
        for item in items:
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not name:
                raise ThresholdError(f"--threshold {item!r}: expected NAME=VALUE")
            values[name] = _parse_value(name, raw.strip())
        return self.with_values(values)

    def with_file(self, path: str | Path) -> Thresholds:
        """A copy with a TOML file's thresholds (top level, or its ``[thresholds]`` table)."""
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ThresholdError(f"{path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ThresholdError(f"{path}: not TOML ({exc})") from None
        table = doc.get("thresholds", doc)
        if not isinstance(table, dict):
            raise ThresholdError(f"{path}: [thresholds] must be a table")
        try:
            return self.with_values(table)
        except ThresholdError as exc:
            raise ThresholdError(f"{path}: {exc}") from None

    def for_job(self, events) -> Thresholds:
        """These thresholds with ``warmup_steps`` raised to the job's own warm-up, the
        leading steps far slower than its usual step
        (:func:`~ringwatch.analyzers._warmup.leading_warmup_steps`)."""
        from ringwatch.analyzers._warmup import leading_warmup_steps

        n = leading_warmup_steps(events, least=self.warmup_steps,
                                 baseline_steps=self.baseline_steps,
                                 slow_ratio=self.warmup_slow_ratio)
        return self if n == self.warmup_steps else replace(self, warmup_steps=n)

    def to_dict(self) -> dict:
        return asdict(self)

    def changed(self) -> dict:
        """The fields that differ from the defaults (what a report prints)."""
        return {k: v for k, v in asdict(self).items() if getattr(DEFAULT_THRESHOLDS, k) != v}

    # --- what each detector takes -------------------------------------------------------------
    def straggler_args(self) -> dict:
        """Keyword arguments of :func:`~ringwatch.analyzers._stragglers.detect_stragglers`."""
        return {"warmup_steps": self.warmup_steps, "baseline_steps": self.baseline_steps,
                "min_baseline_steps": self.min_baseline_steps, "slack": self.cusum_slack,
                "threshold": self.cusum_threshold, "floor_ms": self.noise_floor_ms,
                "floor_share": self.noise_floor_share, "persist": self.persist_steps,
                "busier": self.busier_ratio, "imbalance_noise": self.imbalance_noise,
                "min_delay_ms": self.min_delay_ms, "delay_share": self.min_delay_share,
                "transient_steps": self.transient_steps, "drift_steps": self.drift_steps,
                "grace_steps": self.grace_steps}

    def link_args(self) -> dict:
        """Keyword arguments of :func:`~ringwatch.analyzers._links.detect_slow_links`."""
        return {**self.link_baseline_args(), "transient_steps": self.transient_steps}

    def link_baseline_args(self) -> dict:
        """Keyword arguments of
        :func:`~ringwatch.analyzers._link_baseline.usual_bandwidth`."""
        return {"warmup_steps": self.warmup_steps, "baseline_steps": self.baseline_steps,
                "min_baseline_steps": self.min_baseline_steps, "ratio": self.link_ratio,
                "persist": self.link_persist_steps, "noise": self.link_noise}

    def work_args(self) -> dict:
        """Keyword arguments of :func:`~ringwatch.analyzers._work.detect_work_findings`."""
        return {"warmup_steps": self.warmup_steps, "baseline_steps": self.baseline_steps,
                "floor_ms": self.work_floor_ms, "floor_share": self.work_floor_share,
                "threshold": self.cusum_threshold, "slack": self.cusum_slack,
                "persist": self.persist_steps, "start_share": self.work_start_share,
                "role_share": self.role_share, "wander_share": self.wander_share,
                "min_gain_share": self.min_gain_share, "grace_steps": self.grace_steps,
                "transient_steps": self.transient_steps}

    def moe_args(self) -> dict:
        """Keyword arguments of :func:`~ringwatch.analyzers._moe.detect_moe_skew`."""
        return {"warmup_steps": self.warmup_steps, "skew_ratio": self.a2a_skew_ratio,
                "hot_share": self.a2a_hot_share, "persist": self.persist_steps,
                "min_gain_share": self.min_gain_share}

    def stall_s(self, step_s: float | None) -> float:
        """How long a group must be stuck to be hung, for a job of ``step_s`` steps."""
        if self.min_stall_s is not None:
            return self.min_stall_s
        return self.stall_floor_s if step_s is None else max(self.stall_floor_s,
                                                             self.stall_steps * step_s)


def _parse_value(name: str, raw: str) -> object:
    if raw in ("", "default", "null", "none"):
        return None
    try:
        return int(raw) if name in _INTS else float(raw)
    except ValueError:
        raise ThresholdError(f"{name}={raw!r}: expected "
                             + ("an integer" if name in _INTS else "a number")) from None


def describe() -> list[tuple[str, object, str]]:
    """``(name, default, help)`` of every threshold, from :class:`Thresholds`' docstring."""
    doc = Thresholds.__doc__ or ""
    helps: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        text = line.strip()
        head, sep, rest = text.partition(": ")
        if sep and head in NAMES:
            current = head
            helps[head] = rest
        elif current and text and line.startswith(" " * 12):
            helps[current] += " " + text
        else:
            current = None
    return [(n, getattr(DEFAULT_THRESHOLDS, n), helps.get(n, "")) for n in NAMES]


def thresholds_markdown() -> str:
    """docs/thresholds.md: every threshold, its default and what it does (``ringwatch schema
    --thresholds`` prints it)."""
    lines = ["# The analyzers' thresholds", "",
             "<!-- generated by `ringwatch schema --thresholds > docs/thresholds.md` -->", "",
             "Every threshold the job analyzers use (stragglers, hangs, slow links, pipelines, "
             "mixture-of-experts skew, the live window), in one frozen object, "
             "`ringwatch.analyzers.Thresholds`. Set them with",
             "",
             "- `ringwatch analyze --thresholds FILE --threshold NAME=VALUE ...`;",
             "- `ringwatch serve --thresholds FILE --threshold NAME=VALUE ...`, and while it "
             "runs `ringwatch status --threshold NAME=VALUE` (its control API, "
             "`POST /api/v1/control {\"thresholds\": {NAME: VALUE}}`; `null` or "
             "`\"default\"` puts one back; a restart goes back to the command line's);",
             "- Python: `analyze_events(..., thresholds=Thresholds(cusum_threshold=8))`.",
             "",
             "`FILE` is TOML, the names at its top level or in a `[thresholds]` table. A report "
             "lists the thresholds that differ from these defaults. Steps are steps *seen* "
             "(whatever their numbers); shares are of the job's typical step time.",
             "", "| name | default | what it does |", "|---|---|---|"]
    for name, default, text in describe():
        shown = "null" if default is None else default
        lines.append(f"| `{name}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


NAMES: tuple[str, ...] = tuple(f.name for f in fields(Thresholds))
_INTS = frozenset(f.name for f in fields(Thresholds) if f.type == "int")
_NULLABLE = frozenset({"min_stall_s"})
_SHARES = frozenset({"noise_floor_share", "min_delay_share", "min_gain_share", "a2a_hot_share",
                     "work_floor_share", "work_start_share", "role_share", "wander_share"})
# least values where 1 (integers) or > 0 (numbers) is not the rule
_LEAST: dict[str, float] = {"warmup_steps": 0, "drift_steps": 0, "min_gain_share": 0.0,
                            "cusum_slack": 0.0, "noise_floor_share": 0.0,
                            "min_delay_share": 0.0, "link_noise": 0.0}
DEFAULT_THRESHOLDS = Thresholds()

__all__ = ["DEFAULT_THRESHOLDS", "NAMES", "ThresholdError", "Thresholds", "describe",
           "thresholds_markdown"]

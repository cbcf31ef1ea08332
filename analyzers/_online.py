"""The analyzers over a stream of rows, with bounded memory: one job's online window.

:class:`OnlineWindow` keeps the newest ``keep_steps`` steps of a job's rows (a row seen again,
a pending collective that has finished since, replaces the older copy) and runs the same
pure analyzers as the post-mortem pass over them. What the post-mortem pass reads from the
job's first steps (each rank's usual delay, the job's noise, each group's usual bandwidth) is
taken once, when the first ``warmup_steps + baseline_steps`` steps are in, and kept: later
windows compare against the job's start, not against a window that may hold nothing but the
fault. Structural imbalance is judged on those first steps only: a window whose oldest steps
all lie after a fault's onset would take the fault for "more work by design".

A straggler that outlasts the window stays one episode: the window remembers, per rank, the
step its lateness began (and the step it was detected at), so the finding keeps the ``since``
the post-mortem pass gives it while the window slides on. :meth:`OnlineWindow.state` and
:meth:`OnlineWindow.restore` carry the baselines and those episodes across a restart of the
service, so a window reopened mid-fault compares against the healthy start, not the fault.

Each rank's usual delay follows slow drift after the baseline as post-mortem
(:mod:`ringwatch.analyzers._drift`): the window carries each rank's drift state (the usual,
its CUSUM, its steps since its last late one, its usual compute ratio) as of the step before
its oldest, and moves it on over each step as it leaves the window, with all of that step's
rows, once; so the usual at a step does not depend on how many steps each push carried, and a
restart resumes from the saved state.

With a pipeline (the caller's ``layout``: stages from the send/recv peers), stragglers and
imbalance come from each rank's unblocked time per step against its stage's, as post-mortem
(:mod:`ringwatch.analyzers._work`), over the newest ``keep_steps`` steps of each rank's step and
blocked time (:meth:`OnlineWindow.add_work`); a straggler keeps its onset as an episode, an
imbalance the step it was first seen at.

Send/recv between hosts comes as a receive table (:meth:`OnlineWindow.add_recv`: per receiving
rank, sender and step, its fastest receive; :mod:`ringwatch.analyzers._p2p_links`): each
direction's usual bandwidth is taken from the baseline's steps, as the groups' is, and each
window judges the directions like groups.

Memory is the window (``keep_steps`` x the rows of a step) plus a row per rank and per group;
nothing grows with the job's length.

The caller owns the clock (``now_ns``) and the transport; the window does no I/O.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._hangs import detect_hangs, stall_threshold_s
from ringwatch.analyzers._links import (
    compute_group_bandwidth,
    detect_slow_links,
    explain_by_links,
    p2p_bandwidth,
    usual_bandwidth,
)
from ringwatch.analyzers._online_frames import (
    RECV_SCHEMA,
    WORK_SCHEMA,
    frame_from_state,
    frame_state,
    merge_steps,
    recv_frame,
)
from ringwatch.analyzers._policy import is_hiccup
from ringwatch.analyzers._stragglers import (
    compute_step_lateness,
    compute_straggler_scores,
    detect_stragglers,
    scaled_floors_ms,
)
from ringwatch.analyzers._symmetry import judge_first_steps, usual_delay
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D
from ringwatch.analyzers._thresholds import Thresholds
from ringwatch.analyzers._warmup import leading_warmup_steps

# the lateness scores' own arguments, of all the stragglers' thresholds
_SCORE_ARGS = ("warmup_steps", "baseline_steps", "min_baseline_steps", "slack", "threshold",
               "floor_ms", "persist", "busier", "drift_steps")

#: Steps an open straggler episode is remembered for while the window does not report it
#: (the default; :attr:`Thresholds.grace_steps`).
GRACE_STEPS = _D.grace_steps


class OnlineWindow:
    """One job's newest rows and the baselines of its first steps.

    Args:
        keep_steps: Steps kept (at least the thresholds' ``warmup_steps + baseline_steps``;
            more when :meth:`findings` is given thresholds that need more).
        thresholds: The analyzers' :class:`~ringwatch.analyzers._thresholds.Thresholds`, as
            post-mortem; :meth:`findings` may change them (the service's control API).
        keep_unstepped: Rows without a step kept per rank (the newest).
    """

    def __init__(self, *, keep_steps: int = 64, thresholds: Thresholds = _D,
                 keep_unstepped: int = 256):
        self.thresholds = thresholds
        #: The job's warm-up in steps seen, once its first steps are in (None before).
        self.warmup_found: int | None = None
        if keep_steps < self.warmup_steps + self.baseline_steps:
            raise ValueError(f"keep_steps {keep_steps}: at least warmup_steps + "
                             f"baseline_steps ({self.warmup_steps + self.baseline_steps})")
        self.keep_steps, self.keep_unstepped = keep_steps, keep_unstepped
        self.rows: pl.DataFrame | None = None
        self.usual_delay: pl.DataFrame | None = None  # rank, usual_ms
        self.noise_ms: float | None = None
        self.usual_bw: pl.DataFrame | None = None  # pg, usual_MBps
        self.baseline_until: int | None = None  # last step of the frozen baseline
        #: The last step each rank's usual (``usual_delay``) has followed drift over.
        self.drift_step: int | None = None
        #: The first step seen: the baseline is the steps after it (a window opened on a job
        #: already at step 500 baselines on 500.., not on steps it never saw).
        self.first_step: int | None = None
        #: Structural imbalance, judged once on the baseline steps (a later window whose
        #: first steps are all after a fault's onset would call the fault "structural").
        self.imbalance: tuple[Finding, ...] = ()
        #: rank -> (since_step, detected_step, newest step it was seen at) of its straggler
        #: episode still going on.
        self.episodes: dict[int, tuple[int, int | None, int | None]] = {}
        #: rank -> (since_step, detected_step, until_step) of its last straggler episode that
        #: ended: a later window that still holds its end, but not its start, names it so.
        self.ended: dict[int, tuple[int, int | None, int]] = {}
        self.dropped_rows = 0
        #: The job's :class:`~ringwatch.analyzers._layout.Layout` when the caller knows it
        #: (None: no pipeline, every rank one class). Its stages judge a rank late from the
        #: first steps when the baselines freeze (``detect_stragglers``'s ``stage``); with a
        #: pipeline, stragglers and imbalance come from the ranks' unblocked time.
        self.layout = None
        #: With a pipeline, each rank's step and time blocked per step (rank, step, step_ms,
        #: blocked_ms, work_ms: :func:`~ringwatch.analyzers._work.compute_step_work`), the
        #: newest ``keep_steps`` steps: stragglers and imbalance come from it, as post-mortem.
        self.work: pl.DataFrame | None = None
        #: (class, ranks) -> the step an imbalance was first seen at, kept as the window
        #: slides (post-mortem it is the job's first step judged).
        self.imbalance_since: dict[tuple[str, tuple[int, ...]], int] = {}
        #: The pipeline's imbalance as last judged on a window of enough steps: what a window
        #: too young to judge (a service just restarted) reports meanwhile.
        self.work_imbalance: tuple[Finding, ...] = ()
        #: The job's send/recv between hosts, as a receive table
        #: (:func:`~ringwatch.analyzers._p2p_links.receive_table`; :meth:`add_recv`): the
        #: newest ``keep_steps`` steps, and the first ones until their usual is taken.
        self.recv: pl.DataFrame | None = None
        #: Whether the send/recv directions' usual bandwidth has been taken (into
        #: ``usual_bw``, from the baseline's steps; once, as the groups').
        self.p2p_frozen = False

    @property
    def warmup_steps(self) -> int:
        """The thresholds' warm-up, or the job's own where its first steps were far slower
        (decided with the baselines, as post-mortem: ``Thresholds.for_job``)."""
        return max(self.thresholds.warmup_steps, self.warmup_found or 0)

    def _th(self) -> Thresholds:
        th = self.thresholds
        return th if th.warmup_steps == self.warmup_steps else replace(
            th, warmup_steps=self.warmup_steps)

    @property
    def baseline_steps(self) -> int:
        return self.thresholds.baseline_steps

    def add(self, rows: pl.DataFrame) -> None:
        """Take new rows (any ranks, any order); a ``(rank, idx)`` seen before is replaced."""
        if rows.is_empty():
            return
        low = rows["step"].min()
        if low is not None and self.baseline_until is None:
            self.first_step = low if self.first_step is None else min(low, self.first_step)
        if self.rows is None:
            merged = rows
        else:
            merged = pl.concat([self.rows.join(rows.select("rank", "idx"), on=["rank", "idx"],
                                               how="anti"), rows], how="vertical_relaxed")
        # the baselines first, then the usual's drift over the steps leaving the window,
        # then the trim: each step is judged with all of its rows whatever the pushes carried
        self.rows = merged.sort("rank", "idx")
        self._freeze_baselines()
        self._follow_drift(self.rows)
        self.rows = self._trim(self.rows)

    def add_work(self, work: pl.DataFrame) -> None:
        """Take each rank's step and blocked time of new steps (a ``(rank, step)`` seen
        before is replaced); the newest ``keep_steps`` steps are kept."""
        if work.is_empty():
            return
        merged = merge_steps(self.work, work, ["rank", "step"])
        top = max(merged["step"].max(), -1 if self.rows is None else
                  (self.rows["step"].max() or -1))
        self.work = merged.filter(pl.col("step") > top - self.keep_steps).sort("rank", "step")

    def add_recv(self, recv: pl.DataFrame) -> None:
        """Take new rows of the job's receive table (a ``(rank, peer, step)`` seen before is
        replaced): send/recv between hosts is judged like a group's transfers."""
        if recv.is_empty():
            return
        merged = merge_steps(self.recv, recv_frame(recv), ["rank", "peer", "step"])
        top = max(merged["step"].max(), -1 if self.rows is None else
                  (self.rows["step"].max() or -1))
        keep = pl.col("step") > top - self.keep_steps
        if not self.p2p_frozen:  # the first steps are still needed
            keep = keep | (pl.col("step") <= (self.first_step or 0) + self.warmup_steps
                           + self.baseline_steps)
        self.recv = merged.filter(keep).sort("rank", "peer", "step")
        self._freeze_p2p()

    def _freeze_p2p(self) -> None:
        """The send/recv directions' usual bandwidth, from the baseline's steps, once every
        receiving rank has sent a later step (its receives lag its collectives)."""
        until = self.baseline_until
        if self.p2p_frozen or until is None or self.recv is None:
            return
        if self.recv.group_by("rank").agg(pl.col("step").max())["step"].min() <= until:
            return
        head = self.recv.filter(pl.col("step").is_between(self.first_step or 0, until))
        usual = usual_bandwidth(p2p_bandwidth(head), **self._th().link_baseline_args())
        self.usual_bw = usual if self.usual_bw is None else pl.concat(
            [self.usual_bw, usual], how="vertical_relaxed")
        self.p2p_frozen = True

    def _window_recv(self) -> pl.DataFrame | None:
        """The receive table over the window's steps (its first ones left out once judged)."""
        if self.recv is None or self.rows is None:
            return None
        top = self.rows["step"].max()
        return None if top is None else self.recv.filter(
            pl.col("step") > top - self.keep_steps)

    @property
    def pipeline(self) -> bool:
        """Whether the job has pipeline stages (``layout``: more than one)."""
        return self.layout is not None and self.layout.pp > 1

    def _work_findings(self, th: Thresholds) -> tuple[Finding, ...]:
        """Stragglers and imbalance of a pipeline from the ranks' unblocked time, as
        ``ringwatch analyze`` finds them (:func:`~ringwatch.analyzers._work.detect_work_findings`):
        stragglers as episodes of the job, imbalance with the step it was first seen at."""
        from ringwatch.analyzers._work import detect_work_findings, reported_steps

        layout = self.layout
        hosts = {int(r): str(h) for r, h in self.rows.select("rank", "host").unique("rank")
                 .iter_rows() if r is not None and h}
        found = detect_work_findings(None, layout.peers_frame(), hosts=hosts,
                                     work=reported_steps(self.work), **th.work_args())
        out = self._episodes(tuple(f for f in found if f.kind == "straggler"))
        if self.work["step"].n_unique() < self.warmup_steps + self.baseline_steps:
            return out + self.work_imbalance  # too few steps to judge: as last judged
        imbalance = []
        for f in found:
            if f.kind == "imbalance":
                key = (f.cls, f.ranks)
                if key not in self.imbalance_since and len(self.imbalance_since) < 256:
                    self.imbalance_since[key] = f.since_step
                imbalance.append(replace(f, since_step=self.imbalance_since.get(
                    key, f.since_step)))
        self.work_imbalance = tuple(imbalance)
        return out + self.work_imbalance

    def _trim(self, df: pl.DataFrame) -> pl.DataFrame:
        n = df.height
        top = df["step"].max()
        if top is not None:
            keep = (pl.col("step") > top - self.keep_steps) | (pl.col("status") == "pending")
            if self.baseline_until is None:  # the first steps are still needed
                keep = keep | (pl.col("step") <= (self.first_step or 0) + self.warmup_steps
                               + self.baseline_steps)
            unstepped = pl.col("step").is_null() & (
                pl.int_range(pl.len()).reverse().over("rank") < self.keep_unstepped)
            df = df.filter(keep.fill_null(False) | unstepped)
        self.dropped_rows += n - df.height
        return df

    def _follow_drift(self, rows: pl.DataFrame) -> None:
        """Move each rank's usual on over the steps about to leave the window."""
        top = rows["step"].max()
        if self.baseline_until is None or self.usual_delay is None or top is None:
            return
        done = max(self.baseline_until, self.drift_step or 0)
        cut = top - self.keep_steps  # the steps that _trim drops
        if cut <= done:
            return
        self.drift_step = cut
        th = self._th()
        leaving = rows.filter(pl.col("step").is_between(done + 1, cut))
        if th.drift_steps <= 0 or leaving.is_empty():
            return
        args = {k: v for k, v in th.straggler_args().items() if k in _SCORE_ARGS}
        scores = compute_straggler_scores(
            compute_step_lateness(leaving), **args, usual=self.usual_delay,
            noise_ms=self.noise_ms, drift_from_step=done + 1, drift_state=True)
        if scores.is_empty():
            return
        self.usual_delay = _with_state(self.usual_delay, scores)

    def _freeze_baselines(self) -> None:
        if self.baseline_until is not None or self.rows is None:
            return
        first = self.first_step or 0
        tops = self.rows.group_by("rank").agg(pl.col("step").max())["step"]
        if self.warmup_found is None:  # the job's warm-up, from the same first steps as
            # post-mortem (each step's time needs the next step's start on every rank)
            th = self.thresholds
            least_last = first + th.warmup_steps + th.baseline_steps - 1
            if tops.min() is None or tops.min() <= least_last + 1:
                return
            self.warmup_found = leading_warmup_steps(
                self.rows.filter(pl.col("step") <= least_last + 1), least=th.warmup_steps,
                baseline_steps=th.baseline_steps, slow_ratio=th.warmup_slow_ratio)
        last = first + self.warmup_steps + self.baseline_steps - 1
        top = self.rows["step"].max()
        if top is None or top <= last:  # wait until every rank is past the baseline
            return
        if self.rows.group_by("rank").agg(pl.col("step").max())["step"].min() <= last:
            return
        head = self.rows.filter(pl.col("step") <= last)
        # the analyzers count their warm-up from step 0: shift the head so it starts there
        lat = compute_step_lateness(head).with_columns(pl.col("step") - first)
        args = self._th().straggler_args()
        score_args = {k: v for k, v in args.items() if k in _SCORE_ARGS}
        # the noise floor scales with the job's step, as in detect_stragglers
        score_args["floor_ms"], min_delay_ms = scaled_floors_ms(
            head, args["floor_ms"], args["min_delay_ms"], floor_share=args["floor_share"],
            delay_share=args["delay_share"])
        score_args["rise_noise"] = args["imbalance_noise"]
        scores = compute_straggler_scores(lat, **score_args, drift_state=True)
        if scores.is_empty():
            return
        self.noise_ms = float(scores["noise_ms"][0])
        base = scores.filter(pl.col("step") < self.warmup_steps + self.baseline_steps)
        # a rank late from the start while its stage's other ranks are not is measured
        # against their usual, as post-mortem: it stays a straggler the window follows
        stage = None if self.layout is None else self.layout.stage
        _, from_start = judge_first_steps(
            scores, stage, baseline_steps=self.baseline_steps,
            imbalance_noise=args["imbalance_noise"], min_delay_ms=min_delay_ms)
        fixed = from_start.select("rank", "usual_ms", "usual_compute_ratio")
        usual = usual_delay(base.filter(pl.col("in_baseline")))  # a rise: the steps before
        usual = pl.concat(
            [usual.join(fixed.select(pl.col("rank").cast(usual["rank"].dtype)), on="rank",
                        how="anti"), fixed], how="vertical_relaxed").sort("rank")
        if not from_start.is_empty():  # the drift's state as post-mortem sums it
            scores = compute_straggler_scores(lat, **score_args, usual_from_peers=from_start,
                                              drift_state=True)
        self.usual_delay = _with_state(usual, scores)
        found = detect_stragglers(head, **args, stage=stage)
        self.imbalance = tuple(f for f in found if f.kind == "imbalance")
        for f in found:  # its onset and detection as the whole log gives them
            if f.kind == "straggler" and f.ranks[0] in set(fixed["rank"]) \
                    and f.until_step is None:
                self.episodes[f.ranks[0]] = (f.since_step, f.detected_step, None)
        self.usual_bw = usual_bandwidth(
            compute_group_bandwidth(head).with_columns(pl.col("step") - first),
            **self._th().link_baseline_args())
        self.baseline_until = self.drift_step = last
        self._freeze_p2p()

    def findings(self, *, now_ns: int, last_seen_ns: dict[int, int] | None = None,
                 min_stall_s: float | None = None,
                 thresholds: Thresholds | None = None,
                 data_ended: bool = False) -> tuple[Finding, ...]:
        """Every analyzer over the window, as of ``now_ns`` (with ``thresholds`` from now on,
        when given). A slow link that may yet end as a hiccup is held back while the job goes
        on (not ``data_ended``: :func:`~ringwatch.analyzers._link_episodes.undecided`)."""
        if thresholds is not None:
            self.thresholds = thresholds
            self.keep_steps = max(self.keep_steps, self.warmup_steps + self.baseline_steps)
        if self.rows is None:
            return ()
        ev = self.rows
        th = self._th()
        out = detect_hangs(ev, now_ns=now_ns, last_seen_ns=last_seen_ns,
                           min_stall_s=stall_threshold_s(ev, min_stall_s, th),
                           silent_s=th.silent_s)
        if self.baseline_until is None:
            return out  # not enough steps yet for a usual, nor to call anything structural
        # the warm-up is left out as post-mortem (a first window still holds it)
        after = (self.first_step or 0) + self.warmup_steps
        judged = ev.filter(pl.col("step").is_null() | (pl.col("step") >= after))
        if self.pipeline and self.work is not None and not self.work.is_empty():
            # lateness at collectives would blame a slow stage's neighbours, blocked in
            # their receives: the ranks' unblocked time, against their stage's
            stragglers = self._work_findings(th)
        else:
            stragglers = self._episodes(detect_stragglers(
                judged, **th.straggler_args(), usual=self.usual_delay,
                noise_ms=self.noise_ms, imbalance=False,
                drift_from_step=(self.drift_step or self.baseline_until) + 1,
                ongoing={r: e[:2] for r, e in self.episodes.items()})) + self.imbalance
        recv = self._window_recv()
        links = detect_slow_links(
            judged.filter(pl.col("step").is_not_null()), **th.link_args(), usual=self.usual_bw,
            recv=None if recv is None else recv.filter(pl.col("step") >= after),
            hold_undecided=not data_ended)
        return out + explain_by_links(stragglers, links)

    def _episodes(self, found: tuple[Finding, ...]) -> tuple[Finding, ...]:
        """Stragglers of this window as episodes of the job: one still late since before the
        window's oldest step keeps the onset it was first seen with (one that ended, the
        onset it had, while the window holds its end). An episode ends when its finding
        does, or when ``grace_steps`` newer steps came without it once the window is old
        enough to judge (a window just reopened says nothing about it yet)."""
        oldest, newest = self.rows["step"].min(), self.rows["step"].max()
        grace = self.thresholds.grace_steps
        # a window that still holds the job's first steps reads every episode as the whole
        # log does: its onsets stand (a straggler from the start, first seen on a few steps,
        # has its onset refined as they come)
        whole = oldest is not None and self.first_step is not None and oldest <= self.first_step
        out, going = [], {}
        for f in found:
            rank = f.ranks[0]
            known, ended = self.episodes.get(rank), self.ended.get(rank)
            # the window's sum starts at its oldest step (and a pipeline's work is judged
            # against the window's own first steps): an onset at its edge is where the
            # window begins, the episode began before it
            edge = not whole and oldest is not None and f.since_step is not None \
                and f.since_step <= oldest + self.warmup_steps + 2
            if edge and known is not None:
                f = replace(f, since_step=known[0], detected_step=known[1])
            elif edge and ended is not None and f.until_step is not None \
                    and abs(f.until_step - ended[2]) <= grace:
                f = replace(f, since_step=ended[0], detected_step=ended[1])
            if f.until_step is None:
                going[rank] = (f.since_step, f.detected_step, newest)
            elif not is_hiccup(f):
                self.ended[rank] = (f.since_step, f.detected_step, f.until_step)
            out.append(f)
        # a window too young to judge (just reopened: a pipeline's work needs its warm-up
        # and a few steps) says nothing yet about the episodes it does not show: their grace
        # starts when it can
        young = oldest is None or newest is None or newest - oldest + 1 < (
            self.warmup_steps + self.thresholds.transient_steps + self.thresholds.persist_steps)
        for rank, (since, detected, seen) in self.episodes.items():
            seen = newest if seen is None or young else seen  # restored: from now on
            if rank not in going and all(f.ranks[0] != rank for f in found) \
                    and newest is not None and newest - seen < self.thresholds.grace_steps:
                going[rank] = (since, detected, seen)
        self.episodes = going
        return tuple(out)

    def state(self) -> dict:
        """The baselines and open episodes, as JSON-able data (see :meth:`restore`)."""
        def rows(df):
            return None if df is None else df.to_dicts()

        return {"version": 1, "first_step": self.first_step,
                "baseline_until": self.baseline_until, "drift_step": self.drift_step,
                "noise_ms": self.noise_ms,
                "usual_delay": rows(self.usual_delay), "usual_bw": rows(self.usual_bw),
                "imbalance": [f.to_dict() for f in self.imbalance],
                "episodes": [[r, *e] for r, e in sorted(self.episodes.items())],
                "ended": [[r, *e] for r, e in sorted(self.ended.items())],
                "warmup_steps": self.warmup_found,
                "imbalance_since": [[c, list(r), s] for (c, r), s in
                                    sorted(self.imbalance_since.items())],
                "work_imbalance": [f.to_dict() for f in self.work_imbalance],
                "work": frame_state(self.work, WORK_SCHEMA),
                "recv": frame_state(self.recv, RECV_SCHEMA), "p2p_frozen": self.p2p_frozen}

    def restore(self, state: dict) -> None:
        """Take back what :meth:`state` gave (a window reopened after a restart). Raises
        ``ValueError`` (nothing taken) on a state that is not one."""
        try:
            if state.get("version") != 1:
                raise ValueError(f"unknown version {state.get('version')!r}")
            first, until = state["first_step"], state["baseline_until"]
            noise = state["noise_ms"]
            usual = None if state["usual_delay"] is None else pl.DataFrame(
                [{"state_cusum_ms": 0.0, "quiet": 0, **d} for d in state["usual_delay"]],
                schema={"rank": pl.Int32, "usual_ms": pl.Float64,
                        "usual_compute_ratio": pl.Float64, "state_cusum_ms": pl.Float64,
                        "quiet": pl.Int64})
            drift = state.get("drift_step", until)
            bw = None if state["usual_bw"] is None else pl.DataFrame(
                state["usual_bw"], schema={"pg": pl.Utf8, "usual_MBps": pl.Float64,
                                           "spread_log": pl.Float64})  # null: older state
            if bw is not None and not bw.filter(
                    ~(pl.col("usual_MBps").is_finite() & (pl.col("usual_MBps") > 0))
                    | ~(pl.col("spread_log").is_finite() & (pl.col("spread_log") >= 0))
                    .fill_null(True)).is_empty():
                raise ValueError("a usual bandwidth that is not one")
            imbalance = tuple(_finding(d) for d in state["imbalance"])
            # the step each was last seen at is not kept: the grace starts again
            episodes = {int(r): (int(s), _int_or_none(d), None)
                        for r, s, d, *_ in state["episodes"]}
            ended = {int(r): (int(s), _int_or_none(d), int(u))
                     for r, s, d, u in state.get("ended", [])}
            warmup = state.get("warmup_steps")
            since = {(str(c), tuple(int(x) for x in r)): int(v)
                     for c, r, v in state.get("imbalance_since", [])}
            work_imbalance = tuple(_finding(d) for d in state.get("work_imbalance", []))
            work = frame_from_state(state.get("work"), WORK_SCHEMA, "work")
            recv = frame_from_state(state.get("recv"), RECV_SCHEMA, "recv")
            # an older state has no send/recv baseline: none is taken from later steps
            p2p_frozen = state.get("p2p_frozen", until is not None)
            if not isinstance(p2p_frozen, bool):
                raise ValueError(f"p2p_frozen {p2p_frozen!r}")
            for v in (first, until, warmup, drift):
                if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                    raise ValueError(f"step {v!r} is not an integer")
            if noise is not None and not (isinstance(noise, (int, float)) and noise >= 0):
                raise ValueError(f"noise {noise!r}")
        except (KeyError, TypeError, AttributeError, pl.exceptions.PolarsError) as exc:
            raise ValueError(f"not a window state: {exc!r}") from exc
        self.first_step, self.baseline_until, self.drift_step = first, until, drift
        self.noise_ms = None if noise is None else float(noise)
        self.usual_delay, self.usual_bw = usual, bw
        self.imbalance, self.episodes, self.ended = imbalance, episodes, ended
        self.warmup_found = warmup
        self.imbalance_since, self.work_imbalance = since, work_imbalance
        self.work, self.recv, self.p2p_frozen = work, recv, p2p_frozen


def _with_state(usual: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """``usual`` (rank, usual_ms, usual_compute_ratio) with each rank's drift state after its
    last step in ``scores`` (:data:`~ringwatch.analyzers._drift.STATE_COLUMNS`), where it has
    one; the others keep theirs (or none)."""
    last = (scores.sort("rank", "step").group_by("rank")
            .agg(pl.col("usual_after_ms").last().alias("_u"),
                 pl.col("state_cusum_ms").last().alias("_c"),
                 pl.col("quiet").last().cast(pl.Int64).alias("_q"),
                 pl.col("ratio_after").last().alias("_g"))
            .with_columns(pl.col("rank").cast(usual["rank"].dtype)))
    out = usual.join(last, on="rank", how="left", maintain_order="left")

    def newest(new: str, col: str) -> pl.Expr:
        return pl.coalesce(new, *([col] if col in usual.columns else [])).alias(col)

    return out.select("rank", newest("_u", "usual_ms"), newest("_g", "usual_compute_ratio"),
                      newest("_c", "state_cusum_ms"), newest("_q", "quiet"))


def _int_or_none(v) -> int | None:
    return None if v is None else int(v)


def _finding(d: dict) -> Finding:
    """A :class:`Finding` from its ``to_dict``."""
    if not isinstance(d, dict):
        raise TypeError(f"finding {d!r}")
    d = dict(d)
    for k in ("ranks", "hosts", "local_ranks", "evidence"):
        d[k] = tuple(d.get(k) or ())
    return Finding(**d)


__all__ = ["OnlineWindow"]

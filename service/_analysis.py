"""One analysis round of one job: the live state as the analyzers' frames, then the analyzers.

The analyzers are the same pure functions ``ringwatch analyze`` runs on logs. They read
collectives; the service holds, per (rank, group, step), the step's totals. Each total is
given to them as one collective of the group, numbered by its step: a rank's wait in it
(its time minus the group's shortest) is the sum of its waits in the step's collectives, so
who comes late, by how much, and at which group survive the summing; a group's transfer time
is its shortest member's total. Send/recv between hosts comes as each rank's fastest receive
per sender and step, judged like a group's transfers. Hangs are read from the frontier the
agents report: per rank and group, the last collective entered and finished, and the oldest
pending with its age.
"""

from __future__ import annotations

from ringwatch.service._jobs import _STEP_ROW, JobLive


def _frame(rows: list[tuple]):
    """Rows in :data:`~ringwatch._analyze.ANALYZED_COLUMNS` order as an analyzer frame."""
    import polars as pl

    from ringwatch._analyze import ANALYZED_COLUMNS
    from ringwatch._schema import polars_schema

    schema = polars_schema()
    return pl.DataFrame(rows, schema={c: schema[c] for c in ANALYZED_COLUMNS}, orient="row")


def step_frame(jl: JobLive, items=None):
    """Step totals as analyzer rows, one per rank, group and step (complete ones only):
    ``items`` (``((rank, pg, step), values)`` pairs), or every step the state keeps."""
    rows = []
    for (rank, pg, step), v in (jl.steps.items() if items is None else items):
        if any(k not in v for k in _STEP_ROW):
            continue
        live = jl.ranks.get(rank)
        members, size = jl.groups.get(pg, ("", 0))
        start = int(v["start_s"] * 1e9)
        busy = int(round(v["busy_s"] * 1e9))
        rows.append((rank, None if live is None else live.local_rank,
                     "" if live is None else live.host, step * 1024 + jl.pg_index.get(pg, 0),
                     pg, members, size, jl.group_rank.get((rank, pg), 0), step, "step", False,
                     None, int(v["nbytes"]), "ok", start, int(v["end_s"] * 1e9), start,
                     start + busy, busy, step))
    return _frame(rows)


def frontier_frame(jl: JobLive):
    """Per rank and group, its last finished collective and, when it has one in flight, that
    collective as pending (entered, never finished)."""
    rows = []

    def add(rank, live, pg, seq, status, op, start):
        members, size = jl.groups.get(pg, ("", 0))
        rows.append((rank, live.local_rank, live.host, seq, pg, members or str(rank),
                     size or 1, jl.group_rank.get((rank, pg), 0), seq, op, False, None, None,
                     status, start, None, start, None, None, live.step))

    for rank, live in sorted(jl.ranks.items()):
        for pg in live.started_seq.keys() | live.completed_seq.keys():
            done = live.completed_seq.get(pg)
            if done is not None:
                add(rank, live, pg, done, "ok", "", None)
            entered = live.started_seq.get(pg)
            if entered is not None and (done is None or entered > done):
                pend = live.pending if live.pending and live.pending[0] == pg else None
                if pend is not None:
                    add(rank, live, pg, entered, "pending", pend[1], pend[2])
                else:  # finished between two reads of its log: counted as done
                    add(rank, live, pg, entered, "ok", "", None)
    return _frame(rows)


def work_frame(items):
    """``((rank, step), {"step_s", "blocked_s"})`` pairs as
    :func:`~ringwatch.analyzers._work.compute_step_work`'s frame."""
    import polars as pl

    rows = [(rank, step, v["step_s"] * 1e3, v["blocked_s"] * 1e3,
             max(0.0, v["step_s"] - v["blocked_s"]) * 1e3) for (rank, step), v in items]
    return pl.DataFrame(rows, schema={"rank": pl.Int32, "step": pl.Int64,
                                      "step_ms": pl.Float64, "blocked_ms": pl.Float64,
                                      "work_ms": pl.Float64}, orient="row")


def recv_table(jl: JobLive, items):
    """The receives in ``items`` (:func:`work_frame`'s, with ``"recv"``) as a receive table
    (:func:`~ringwatch.analyzers._p2p_links.receive_table`), each side's host as its agent
    names it (a sender the service has not heard of: none)."""
    import polars as pl

    from ringwatch.analyzers._p2p_links import RECV_SCHEMA

    def host(rank):
        live = jl.ranks.get(rank)
        return live.host if live is not None and live.host else None

    rows = [(rank, host(rank), peer, host(peer), step, int(f["count"]), int(f["nbytes"]),
             int(round(f["recv_s"] * 1e9)))
            for (rank, step), v in items for peer, f in v.get("recv", {}).items()
            if len(f) == 3]
    return pl.DataFrame(rows, schema=RECV_SCHEMA, orient="row")


def live_pairs(jl: JobLive) -> list[tuple[int, int]]:
    """The send/recv pairs the agents report: (rank, peer)."""
    return [(r, q) for r, rl in jl.ranks.items() for q in rl.p2p_peers]


def live_stages(jl: JobLive) -> dict[int, int] | None:
    """``rank -> pipeline stage`` from the send/recv peers the agents report, as
    ``ringwatch analyze`` infers them from the rows; None without any (no pipeline: one
    class of ranks)."""
    from ringwatch.analyzers._layout import pair_counts, stages_from_pairs

    pairs = live_pairs(jl)
    if not pairs:
        return None
    first = {r: rl.first_p2p_op for r, rl in jl.ranks.items() if rl.first_p2p_op}
    ops = pair_counts((r, q, n) for r, rl in jl.ranks.items() for q, n in rl.p2p_peers.items())
    stage, _ = stages_from_pairs(jl.ranks, pairs, first, ops)
    return stage


class LiveAnalysis:
    """One job's analysis across rounds: the analyzers' online window, fed each step once.

    The window freezes each rank's usual delay, the job's noise and each group's usual
    bandwidth from the job's first steps, so a fault that lasts longer than the window is
    still measured against the healthy start.
    """

    def __init__(self, *, keep_steps: int = 64):
        from ringwatch.analyzers import OnlineWindow

        self.window = OnlineWindow(keep_steps=keep_steps)
        self._stage: dict[int, int] | None = None  # the stages the layout was inferred with
        self._counts: dict[str, tuple[int, float]] = {}  # pg -> (step rows, collectives)
        self.last_rows_ns: int | None = None  # when step rows last came in
        # (kind, rank or group, since) -> Finding
        self._hiccups: dict[tuple[str, object, int | None], object] = {}
        self._fresh_hiccups: list = []

    def feed(self, jl: JobLive, items, work=(), *, now_ns: int) -> None:
        """Add the step rows and each rank's step and blocked time completed since the last
        round (:meth:`Jobs.take`)."""
        rows = step_frame(jl, items)
        for (_, pg, _), v in items:  # each group's collectives per step, for the layout
            n, total = self._counts.get(pg, (0, 0.0))
            self._counts[pg] = (n + 1, total + v.get("count", 0.0))
        stage = live_stages(jl)
        if stage is None:
            self.window.layout = None  # no pipeline: every rank one class
        elif (self.window.baseline_until is None or stage != self._stage
              or self.window.layout is None) and (basis := self._layout_rows(rows)) is not None:
            # the stages from the agents' send/recv peers, the groups from the step rows:
            # what the baselines are judged by, and the pipeline analysis's roles (again
            # after a restart: a window restored with its baselines has no rows to read the
            # groups from until its first ones come)
            from ringwatch.analyzers._layout import chains_from_pairs, infer_layout

            self.window.layout = infer_layout(
                basis, stage, {pg: t / n for pg, (n, t) in self._counts.items()},
                chains_from_pairs(live_pairs(jl)))
        self._stage = stage
        if rows.height:
            self.window.add(rows)
            self.last_rows_ns = now_ns
        if work:
            self.window.add_work(work_frame(work))
            self.window.add_recv(recv_table(jl, work))

    def _layout_rows(self, rows):
        """The rows to read the groups from: the window's and the ones about to join it (a
        first push may carry tens of steps, all judged as they are added), or None."""
        import polars as pl

        if not rows.height:
            return self.window.rows
        if self.window.rows is None:
            return rows
        return pl.concat([self.window.rows, rows], how="vertical_relaxed")

    def note_hiccups(self, hiccups) -> None:
        """Remember the transient stragglers and slow links the window reports (each episode
        once)."""
        for f in hiccups:
            key = (f.kind, f.pg if f.kind == "slow_link" else f.ranks[0], f.since_step)
            if key not in self._hiccups:
                self._hiccups[key] = f
                self._fresh_hiccups.append(f)
        if len(self._hiccups) > 4096:  # episodes long gone from the window
            self._hiccups = dict(list(self._hiccups.items())[-1024:])

    def take_hiccups(self) -> list:
        """The hiccups first reported since the last call."""
        out, self._fresh_hiccups = self._fresh_hiccups, []
        return out


#: Least quiet time (s) of a job's step rows before only its hangs are reported.
QUIET_MIN_S = 10.0


def without_unplaced_links(findings: tuple, open_stragglers) -> tuple:
    """Drop a slow link that names no one host while a compute straggler on one of those
    hosts is open: the straggler holds the group's transfers up, and the link evidence
    cannot tell more (the analyzers fold such a link when both start together; this covers
    a link that shows later, while the straggler goes on)."""
    hosts = {h for f in open_stragglers for h in f.hosts}
    return tuple(f for f in findings if not (f.kind == "slow_link" and len(f.hosts) > 1
                                             and hosts & set(f.hosts)))


def analyze_live(jl: JobLive, *, now_ns: int, min_stall_s: float | None = None,
                 detectors: frozenset[str] = frozenset({"hang", "straggler", "slow_link"}),
                 thresholds=None, live: LiveAnalysis | None = None,
                 new_rows=(), new_work=()) -> tuple:
    """Findings of one job now (same :class:`~ringwatch.analyzers.Finding` model).

    With ``live`` (the service), ``new_rows`` (from :meth:`Jobs.take`) join its online
    window, and stragglers and slow links come from it, against frozen baselines; without,
    from the steps the state keeps (baselines from their first steps).

    Stragglers and slow links follow the post-mortem's rules: a transient one (a hiccup) is
    no finding (the window's hiccups go to ``live``, :meth:`LiveAnalysis.take_hiccups`), and
    one that has lasted fewer steps than a hiccup can is held back until it lasts that long,
    or until the job stops sending steps (``split_undecided``): a noisy healthy job shows
    nothing, and the service and ``ringwatch analyze`` name the same stragglers and links.

    ``thresholds``: the analyzers' :class:`~ringwatch.analyzers._thresholds.Thresholds` (or a
    ``{name: value}`` mapping over the defaults), as ``ringwatch analyze`` takes them."""
    from ringwatch.analyzers import detect_hangs, detect_slow_links, detect_stragglers
    from ringwatch.analyzers._findings import with_local_ranks
    from ringwatch.analyzers._hangs import stall_threshold_s
    from ringwatch.analyzers._links import explain_by_links
    from ringwatch.analyzers._policy import significant, split_hiccups, split_undecided
    from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS, Thresholds

    th = thresholds if isinstance(thresholds, Thresholds) else \
        DEFAULT_THRESHOLDS.with_values(thresholds or {})
    if live is not None:
        live.feed(jl, new_rows, new_work, now_ns=now_ns)
        steps = live.window.rows if live.window.rows is not None else step_frame(jl, [])
    else:
        steps = step_frame(jl)
    stall = stall_threshold_s(steps, min_stall_s, th)
    findings: tuple = ()
    if "hang" in detectors:
        seen = {r: rl.pushed_ns - int((rl.log_age_s or 0) * 1e9)
                for r, rl in jl.ranks.items()}
        findings += detect_hangs(frontier_frame(jl), now_ns=now_ns,
                                 min_stall_s=stall, last_seen_ns=seen, silent_s=th.silent_s)
    # A job whose steps stopped coming (it ended, or it is hung) has nobody slow now: once
    # its rows have been quiet for twice the hang threshold, only hangs are reported, and
    # its stragglers and slow links resolve after the store's silence (a straggler that
    # outlasts the window would otherwise stay open for as long as the job's state does).
    quiet = live is not None and live.last_rows_ns is not None and \
        now_ns - live.last_rows_ns >= max(2 * stall, QUIET_MIN_S) * 1e9
    if live is not None and not quiet:
        want = {"straggler", "imbalance"} if "straggler" in detectors else set()
        want |= {"slow_link"} if "slow_link" in detectors else set()
        ended = live.last_rows_ns is not None and now_ns - live.last_rows_ns >= stall * 1e9
        found, hiccups = split_hiccups(tuple(
            f for f in live.window.findings(now_ns=now_ns, thresholds=th, data_ended=ended)
            if f.kind in want))
        live.note_hiccups(hiccups)
        newest = steps["step"].max() if steps.height else None
        found, _ = split_undecided(found, newest_step=newest, data_ended=ended,
                                   transient_steps=th.transient_steps,
                                   persist_steps=th.persist_steps)
        findings += significant(found, steps, th.min_gain_share)
    elif live is None:
        stragglers = detect_stragglers(steps, **th.straggler_args()) \
            if "straggler" in detectors and steps.height else ()
        links = detect_slow_links(steps, **th.link_args()) \
            if "slow_link" in detectors and steps.height else ()
        findings += split_hiccups(explain_by_links(stragglers, links))[0]
    local = {r: rl.local_rank for r, rl in jl.ranks.items()}
    return with_local_ranks(findings, local)

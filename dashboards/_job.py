"""Job: one training job's rhythm, rank by rank, and what the central service found in it.

Nothing here averages over ranks: a straggler is one rank out of many, so every rank keeps its
own series, and the one summary line is the worst rank against the median (max minus median).
"""

from __future__ import annotations

from ringwatch.dashboards._frame import board, label_var
from ringwatch.dashboards._panels import (
    bargauge_panel,
    heatmap_panel,
    q,
    table_panel,
    timeseries_panel,
)
from ringwatch.dashboards._series import agent, by, service

RANK_STEP = agent("rank", "step")
IN_COLL = agent("rank_op", "busy_ns")
COLL_BYTES = agent("rank_op", "nbytes")
GAP = agent("rank_op", "gap_ns")
STARTED = agent("rank_pg", "last_started_seq")
COMPLETED = agent("rank_pg", "last_completed_seq")
PENDING = agent("rank", "pending_ns")
LOG_AGE = agent("rank", "log_age_ns")
FINDING = service("ringwatch_finding_open")
GAIN = service("ringwatch_whatif_gain_seconds")
STRAGGLER = service("ringwatch_straggler_suspect")
HANG = service("ringwatch_hang_suspect")
LINK = service("ringwatch_link_suspect")
HICCUPS = service("ringwatch_straggler_hiccups_total")
LINK_HICCUPS = service("ringwatch_link_hiccups_total")

J = {"job": "$job"}
RANK = ["job", "host", "rank"]
RANK_LEGEND = "rank {{rank}} ({{host}})"
#: Steps per second of each rank (0 while it makes none: left out, not divided by).
STEP_RATE = f"({RANK_STEP.deriv(**J)} > 0)"
#: Seconds per second each rank spends inside collectives, all groups and ops.
IN_COLL_RANK = by("sum", RANK, IN_COLL.rate(**J))
#: How much less than the median rank each rank waits inside collectives, per step: a
#: straggler arrives last and waits for no one, so its lateness is its peers' wait for it.
LATENESS = (f"(quantile by (job) (0.5, {IN_COLL_RANK}) - on (job) group_right "
            f"{IN_COLL_RANK}) / on (job, host, rank) {STEP_RATE}")
JOB_STEP_RATE = by("max", ["job"], STEP_RATE)
#: Per rank and group: the group's newest started collective minus the rank's last completed.
BEHIND = (f"{by('max', ['job', 'pg'], STARTED.sel(**J))} - on (job, pg) group_right "
          f"{by('max', ['job', 'pg', 'host', 'rank'], COMPLETED.sel(**J))}")


def _per_group(counter) -> str:
    return by("sum", ["job", "pg", "host", "rank"], counter.rate(**J))


def build():
    b = board("job", "ringwatch / Job",
              "One training job: step time, each rank's lateness, findings with what fixing "
              "them would save, where each group's collectives stand (hangs), and each "
              "group's transfers (slow links).",
              label_var("job", "Job", f"label_values({RANK_STEP.name}, job)", multi=False,
                        description="Training job id (the ranks' RINGWATCH_JOB_ID)."))
    b.row("Rhythm")
    b.add(timeseries_panel("Step time per rank", "Seconds per training step, from each "
                           "rank's step marks.", "s", q(f"1 / {STEP_RATE}", RANK_LEGEND),
                           min_val=0))
    b.add(timeseries_panel("Time in collectives per step, per rank", "Seconds each rank "
                           "spends inside collectives per step. A straggler's is the "
                           "lowest: it arrives last and waits for no one.", "s",
                           q(f"{IN_COLL_RANK} / on (job, host, rank) {STEP_RATE}",
                             RANK_LEGEND), min_val=0))
    b.add(heatmap_panel("Lateness, rank x time", "Per rank and step: the median rank's time "
                        "in collectives minus this rank's (seconds per step). The late rank "
                        "is the bright row.", "s", q(LATENESS, RANK_LEGEND)), w=16, h=9)
    b.add(timeseries_panel("Worst rank: max minus median", "The largest lateness over the "
                           "ranks (seconds per step): the straggler signal, never averaged "
                           "away.", "s", q(by("max", ["job"], LATENESS), "{{job}}"),
                           min_val=0), w=8, h=9)
    b.add(timeseries_panel("Time between collectives per step, per rank", "Seconds per "
                           "step each rank spends outside collectives (its compute and host "
                           "work).", "s", q(f"{by('sum', RANK, GAP.rate(**J))} / on (job, "
                                            f"host, rank) {STEP_RATE}", RANK_LEGEND),
                           min_val=0), w=24, h=7)
    b.row("Findings")
    b.add(table_panel(
        "Open findings and their what-if gain", "What the central service holds open for "
        "this job, and the seconds per step fixing each would save.", "none",
        q(FINDING.sel(**J), instant=True), q(GAIN.sel(**J), instant=True),
        columns={"kind": "kind", "cls": "class", "ranks": "ranks", "hosts": "hosts",
                 "Value #B": "what-if gain", "id": "id"},
        units={"what-if gain": "s"}), w=14)
    b.add(timeseries_panel("What-if gain per finding", "Seconds per step fixing each open "
                           "finding would save.", "s",
                           q(f"{GAIN.sel(**J)} * on (job, id) group_left (kind, cls, ranks) "
                             f"{FINDING.sel(**J)}", "{{kind}} ({{cls}}) ranks {{ranks}}"),
                           min_val=0), w=10)
    b.add(timeseries_panel("Straggler suspects", "The service's confidence that a rank is a "
                           "straggler (or structurally imbalanced).", "percentunit",
                           q(STRAGGLER.sel(**J), "rank {{rank}} ({{host}}): {{cls}}"),
                           min_val=0), w=8)
    b.add(timeseries_panel("Hang suspects", "The service's confidence that a rank holds its "
                           "group in a hang.", "percentunit",
                           q(HANG.sel(**J), "rank {{rank}} ({{host}}): {{cls}}"), min_val=0),
          w=8)
    b.add(bargauge_panel("Hiccups per rank", "Transient stragglers per rank since the "
                         "service started: late for a few steps, then caught up (never a "
                         "finding).", "none",
                         q(by("sum", ["host", "rank"], HICCUPS.sel(**J)), RANK_LEGEND,
                           instant=True)), w=8)
    b.row("Hang frontier")
    b.add(table_panel(
        "Hang frontier: last sequence per rank and group", "Per group and rank: the last "
        "collective started and completed (the same number on every member), and how far "
        "the rank is behind the group's front. In a hang the rank that never arrived is "
        "behind; when all are level, the collective itself is stuck.", "none",
        q(by("max", ["job", "pg", "host", "rank"], STARTED.sel(**J)), instant=True),
        q(by("max", ["job", "pg", "host", "rank"], COMPLETED.sel(**J)), instant=True),
        q(BEHIND, instant=True),
        columns={"pg": "group", "rank": "rank", "host": "host", "Value #A": "last started",
                 "Value #B": "last completed", "Value #C": "behind the front"}), h=9)
    b.add(timeseries_panel("Collectives behind the group's front", "Per rank and group: "
                           "the group's newest started collective minus the rank's last "
                           "completed one.", "none",
                           q(BEHIND, "pg {{pg}} rank {{rank}} ({{host}})"), min_val=0), h=9)
    b.add(timeseries_panel("Oldest pending collective per rank", "How long each rank's "
                           "oldest unfinished collective has been in flight (0: none).", "s",
                           q(by("max", ["job", "host", "rank", "pg", "pending_op"],
                                PENDING.sel(**J)),
                             "rank {{rank}} ({{host}}) pg {{pg}} {{pending_op}}"), min_val=0))
    b.add(timeseries_panel("Log age per rank", "Seconds since each rank's log was last "
                           "written: a stopped process or a lost host ages while its peers "
                           "stay fresh.", "s", q(by("max", RANK, LOG_AGE.sel(**J)),
                                                RANK_LEGEND), min_val=0))
    b.row("Communication")
    b.add(timeseries_panel("Transfer time per group and step", "Per process group: the "
                           "fastest member's seconds inside collectives per step (nobody's "
                           "lateness inflates it).", "s",
                           q(f"{by('min', ['job', 'pg'], _per_group(IN_COLL))} / on (job) "
                             f"group_left {JOB_STEP_RATE}", "pg {{pg}}"), min_val=0), w=8)
    b.add(timeseries_panel("Bandwidth per group", "Per process group: message bytes over "
                           "the fastest member's time inside collectives, as the link "
                           "analyzer measures it.", "Bps",
                           q(f"{by('max', ['job', 'pg'], _per_group(COLL_BYTES))} / "
                             f"({by('min', ['job', 'pg'], _per_group(IN_COLL))} > 0)",
                             "pg {{pg}}"), min_val=0), w=8)
    b.add(timeseries_panel("Link suspects", "The service's confidence that a host's links "
                           "are slow (shared among the suspects).", "percentunit",
                           q(LINK.sel(**J), "{{host}}"), min_val=0), w=8)
    b.add(bargauge_panel("Link hiccups per host", "Transient slow links per suspect host "
                         "since the service started: a group's transfers slower for a few "
                         "steps, then as usual (never a finding). A host that keeps "
                         "hiccuping is worth a probe.", "none",
                         q(by("sum", ["host"], LINK_HICCUPS.sel(**J)), "{{host}}",
                           instant=True)), w=24, h=5)
    return b.build()

"""Human-readable views of a job's logs, shared by ``ringwatch run``, ``logs`` and ``demo``."""

from __future__ import annotations

from ringwatch._logs import JobLogs


def summary_lines(job: JobLogs) -> list[str]:
    """A few lines: where the logs are, rows per rank, anything lost or still pending."""
    import polars as pl

    ev = job.events()
    meta = job.meta()
    lines = [f"job {job.job_id}: {len(job.ranks)} rank(s), {ev.height} collective rows "
             f"in {job.path}"]
    if ev.height:
        per = ev.group_by("rank").agg(
            pl.len().alias("rows"), (pl.col("status") == "pending").sum().alias("pending"),
            (pl.col("status") == "error").sum().alias("errors"),
            (pl.col("status") == "unknown").sum().alias("from_fr"),
            pl.col("pg").n_unique().alias("groups")).sort("rank")
        for r in per.iter_rows(named=True):
            c = meta.get(r["rank"], {}).get("counters", {})
            extra = []
            if r["pending"]:
                extra.append(f"{r['pending']} pending at exit")
            if r["errors"]:
                extra.append(f"{r['errors']} failed")
            if r["from_fr"]:
                extra.append(f"{r['from_fr']} from the Flight Recorder")
            if c.get("dropped"):
                extra.append(f"{c['dropped']} DROPPED")
            if meta.get(r["rank"], {}).get("final") is False:
                extra.append("no final flush (killed?)")
            lines.append(f"  rank {r['rank']:>4}: {r['rows']:>7} rows, {r['groups']} group(s)"
                         + (f"; {', '.join(extra)}" if extra else ""))
    lines.extend(f"  unreadable: {p}" for p in job.problems)
    return lines


def check_job(job: JobLogs) -> dict:
    """Consistency across ranks plus, per rank, the match with its saved Flight Recorder."""
    import polars as pl

    from ringwatch.analyzers import check_consistency, compare_flight_recorder

    ev = job.events()
    cons = check_consistency(ev)
    lines = []
    if cons.ok:
        n = sum(g.collectives for g in cons.groups)
        lines.append(f"consistency: OK ({len(cons.groups)} group(s), {n} collectives, "
                     "same order/op/bytes on every member; every send met its recv)")
    else:
        lines.append(f"consistency: {cons.n_problems} problem(s)")
        lines.extend(f"  {p}" for p in cons.problems)
    fr_ok = True
    fr = {}
    for rank in job.ranks:
        dump = job.flight_recorder(rank)
        if dump is None:
            lines.append(f"flight recorder rank {rank}: no saved copy")
            continue
        cmp = compare_flight_recorder(ev.filter(pl.col("rank") == rank), dump)
        fr[rank] = {"ok": cmp.ok, "matched": cmp.matched, "fr_only": cmp.fr_only,
                    "ringwatch_only": cmp.ringwatch_only, "order_ok": cmp.order_ok,
                    "mismatches": cmp.mismatches}
        fr_ok &= cmp.ok
        state = "OK" if cmp.ok else "MISMATCH"
        lines.append(f"flight recorder rank {rank}: {state}, {cmp.matched} matched"
                     + (f", missed {list(cmp.fr_only)[:5]}" if cmp.fr_only else "")
                     + (f", extra {list(cmp.ringwatch_only)[:5]}" if cmp.ringwatch_only else "")
                     + ("" if cmp.order_ok else ", ORDER DIFFERS")
                     + (f", {cmp.mismatches[:3]}" if cmp.mismatches else ""))
    return {"ok": cons.ok and fr_ok and not job.problems, "lines": lines,
            "consistency": {"ok": cons.ok, "problems": cons.problems,
                            "groups": [g.pg for g in cons.groups]},
            "flight_recorder": fr, "unreadable": job.problems}


def step_table(events, *, last: int | None = None) -> str:
    """Per-step collective time per rank, in ms, as text."""
    from ringwatch.analyzers import compute_step_comm, pivot_step_comm

    sc = compute_step_comm(events)
    if sc.height == 0:
        return "(no steps recorded)"
    wide = pivot_step_comm(sc)
    if last:
        wide = wide.tail(last)
    cols = [c for c in wide.columns if c != "step"]
    out = ["step " + " ".join(f"{c:>9}" for c in cols) + "   (collective ms per step)"]
    for row in wide.iter_rows(named=True):
        cells = " ".join(f"{(row[c] or 0) / 1e6:9.1f}" for c in cols)
        out.append(f"{row['step']:>4} {cells}")
    return "\n".join(out)

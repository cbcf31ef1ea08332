"""Human-readable views of a job's logs, shared by ``ringwatch run``, ``logs`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

from ringwatch._logs import RESERVE_FILE, TMP_SUFFIX, JobLogs, folder_full


def summary_lines(job: JobLogs) -> list[str]:
    """A few lines: where the logs are, rows per rank, anything lost or still pending, and
    how each rank's recording ended."""
    import polars as pl

    ev = job.events()
    meta = job.meta()
    lines = [f"job {job.job_id}: {len(job.ranks)} rank(s), {ev.height} collective rows "
             f"in {job.path}"]
    per = {}
    if ev.height:
        per = {r["rank"]: r for r in ev.group_by("rank").agg(
            pl.len().alias("rows"), (pl.col("status") == "pending").sum().alias("pending"),
            (pl.col("status") == "error").sum().alias("errors"),
            (pl.col("status") == "unknown").sum().alias("from_fr"),
            pl.col("pg").n_unique().alias("groups")).iter_rows(named=True)}
    for rank in sorted(set(job.ranks) | set(per)):
        r = per.get(rank, {"rows": 0, "groups": 0})
        extra = []
        if r.get("pending"):
            extra.append(f"{r['pending']} pending at exit")
        if r.get("errors"):
            extra.append(f"{r['errors']} failed")
        if r.get("from_fr"):
            extra.append(f"{r['from_fr']} from the Flight Recorder")
        extra += ending_notes(meta.get(rank), job.ranks.get(rank))
        lines.append(f"  rank {rank:>4}: {r['rows']:>7} rows, {r['groups']} group(s)"
                     + (f"; {', '.join(extra)}" if extra else ""))
    lines.extend(f"  unreadable: {p}" for p in job.problems)
    if any(m.get("write_disk_full") or m.get("final") is False for m in meta.values()) \
            and folder_full(job.path):
        lines.append(f"  {job.path} is on a full filesystem now")
    return lines


def ending_notes(meta: dict | None, folder: Path | None) -> list[str]:
    """What a rank's ``meta.json`` (None: there is none) and its folder's files say about
    rows it lost and how its recording ended."""
    if meta is None:
        return ["no meta.json: none written yet (killed before its first flush, or its "
                "writes failed)"]
    notes = []
    write_dropped = meta.get("write_dropped") or 0
    if meta.get("write_failures"):
        why = "disk full" if meta.get("write_disk_full") else meta.get("write_error") or "error"
        notes.append(f"log writes failed ({why}): {write_dropped} rows dropped")
    other = (meta.get("counters", {}).get("dropped") or 0) - write_dropped
    if other > 0:  # older logs count the rows of failed writes there too, unsplit
        notes.append(f"{other} DROPPED" + (" (buffer full)" if "write_dropped" in meta else ""))
    if meta.get("recorder_held") is True:
        notes.append("recorder held at its last flush (the main thread stopped inside one of "
                     "ringwatch's hooks): rows since its last full flush not written")
    if meta.get("final") is False:
        # The reserve is given up when the final meta is tried: still there, it never was.
        if folder is not None and (folder / RESERVE_FILE).exists():
            notes.append("no final meta.json: the rank was killed (or is still running)")
        else:
            notes.append("no final meta.json: the rank was killed, or its last write failed")
    cut = _temporaries(folder)
    if cut:
        notes.append(f"{cut} temporary file(s) left (a write cut short, or under way)")
    return notes


def _temporaries(folder: Path | None) -> int:
    try:
        return sum(p.name.endswith(TMP_SUFFIX) for p in folder.iterdir()) if folder else 0
    except OSError:
        return 0


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

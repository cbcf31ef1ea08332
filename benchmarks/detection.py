"""Detection benchmark: the analyzers' findings on scenario runs, scored against ground truth.

    .venv/bin/python benchmarks/detection.py scenarios            # score stored runs
    .venv/bin/python benchmarks/detection.py m1 m2 --json d.json  # several folders, details
    .venv/bin/python benchmarks/detection.py --run --out s --worlds 4 --reps 1   # run, score

Input: scenario folders written by ``benchmarks/scenarios.py`` (``runs.jsonl`` and one folder
per run with ``ground_truth.json``, ``logs/``, ``steps/``), or run folders themselves.
``--run`` first runs the matrix with ``scenarios.py`` (``--out``, ``--worlds``, ``--reps``,
``--faults``, ``--seed``, ``--resume`` passed through) and then scores ``--out``.

Each run is analysed post-mortem, as ``ringwatch analyze`` does (``analyze_job``: hangs
measured up to the agents' last write, stragglers and imbalance from durations), and every
finding is held against the ground truth:

* expected finding: straggler -> kind ``straggler`` naming the victim rank; hang -> kind
  ``hang`` whose ranks include the victim (class ``never arrived`` for the ``block`` mode,
  where the agent's threads go on writing; ``stop`` SIGSTOPs the whole process, agent
  included, and gives ``rank not running`` once the peers' agents outlive it by the hang
  analyzer's ``silent_s``; the class is checked and reported, not part of the culprit
  match); link -> kind ``slow_link`` whose hosts include the victim host; imbalance (a rank
  with more work from launch: among replicas doing the same work, a straggler from the start)
  -> kind ``straggler`` naming the victim rank, and no other finding; none -> no finding at
  all. Hiccups (transient
  stragglers: behind for a few steps, then caught up; ``analyze_job``'s ``hiccups``) are
  listed per run, not scored: ``ringwatch analyze`` reports them apart from the findings.
* a finding is a true positive (TP) when it has the expected kind and names the victim; a
  *wrong culprit* when it has the expected kind but does not; a false positive (FP)
  otherwise (every finding on a healthy run; any finding but the victim's straggler on an
  imbalance run; an imbalance finding on a fault run).
* precision = TP / (TP + FP) over findings (wrong-culprit findings are in neither term; they
  count against culprit accuracy); recall = runs with a finding of the expected kind / runs
  (for imbalance: runs with a straggler finding); culprit accuracy = runs with a TP / runs with
  a finding of the expected kind.
* onset: where the run recorded when the fault took effect on the victim (``effect_step``,
  ``effect_wall_ns``: the first step a ``work`` straggler ran slowed; it takes the runner's
  signal at its next step boundary, one or two steps after the runner saw ``onset_step``),
  that; otherwise the ground truth's ``onset_step`` / ``onset_wall_ns``. ``--from-trigger``
  scores from the trigger always.
* latency, of a run's earliest TP: iterations = ``detected_step - onset_step``;
  seconds = detection point - onset. The detection point of a finding with a
  ``detected_step`` is the end of that step, read from the job's own step marks
  (``steps/rank-N.tsv``): when step ``detected_step + 1`` began on the victim rank (rank 0 for
  link runs or when the victim has no such mark). A hang has no ``detected_step``; its
  ``since_ns`` is when the oldest blocking collective was entered, and its detection point is
  ``since_ns + min_stall_s``, when the stall reached the analyzer's threshold (its iteration
  latency is left blank). The onset is ``onset_wall_ns`` from the ground truth, or the start
  of ``onset_step`` when later (imbalance is recorded at launch, before step 0). Both are
  when the evidence was complete inside the job: an online watcher adds its flush and poll
  delays.

Runs that cannot be scored (folder or logs missing, no ground truth, run not finished as
planned, fault not applied, analysis failed) are listed with the reason and counted as not
scored. Output: a table per scenario (fault x world) with a totals row per fault, then one
line per acceptance criterion of the issue. ``--markdown`` prints the same as Markdown;
``--json FILE`` saves every run's findings, verdicts and latencies. Exit status 0, 2 when a
run could not be scored, 1 on a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _scoring import EXPECTED_KIND, SCENARIO_ORDER, acceptance, score_run, summarize

OK_REASONS = {"hang": ("completed", "hang held")}  # other kinds: completed only
TRUTH_FORMAT = "ringwatch-ground-truth/1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="*", type=Path,
                   help="scenario output folders (runs.jsonl + run folders) or run folders")
    p.add_argument("--json", type=Path, metavar="FILE", help="save per-run details here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--per-run", action="store_true", help="also print one line per run")
    p.add_argument("--from-trigger", action="store_true",
                   help="count latencies from the step the runner triggered the fault at, "
                        "even where the run recorded the first step the fault took effect")
    p.add_argument("--min-stall-s", type=float,
                   help="hang analyzer threshold, s (default: the analyzer's own, 10)")
    g = p.add_argument_group("running the matrix first (benchmarks/scenarios.py)")
    g.add_argument("--run", action="store_true", help="run the scenarios, then score --out")
    g.add_argument("--out", type=Path, help="where the scenario runs go (with --run)")
    g.add_argument("--worlds", help="world sizes, e.g. 4,8,16")
    g.add_argument("--reps", type=int, help="repetitions per scenario")
    g.add_argument("--faults", help="e.g. none,straggler,hang,link,imbalance")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", action="store_true", help="skip finished runs")
    return p.parse_args(argv)


# ---- reading runs ------------------------------------------------------------------------


def list_runs(folder: Path) -> list[tuple[str, Path, dict | None]]:
    """``(name, run folder, runs.jsonl record or None)`` for every run of a scenario folder:
    those listed in ``runs.jsonl`` (the last line of a name wins), then any other subfolder
    with a ground truth. A run folder given directly is one run."""
    if (folder / "ground_truth.json").is_file():
        return [(folder.name, folder, None)]
    records: dict[str, dict] = {}
    index = folder / "runs.jsonl"
    if index.is_file():
        for line in index.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "name" in rec:
                    records[rec["name"]] = rec
    runs = [(name, folder / name, rec) for name, rec in records.items()]
    runs += [(d.name, d, None) for d in sorted(folder.iterdir())
             if d.is_dir() and d.name not in records and (d / "ground_truth.json").is_file()]
    return runs


def _scenario(name: str, truth: dict | None, rec: dict | None) -> tuple[str, int]:
    """(fault, world) from the ground truth, else the runner's record, else the name."""
    if truth and truth.get("kind") and truth.get("world_size"):
        return truth["kind"], int(truth["world_size"])
    if rec and rec.get("fault") and rec.get("world"):
        return rec["fault"], int(rec["world"])
    kind, _, rest = name.partition("-w")
    world = rest.split("-")[0]
    return kind, int(world) if world.isdigit() else 0


def _unscored_reason(run_dir: Path, truth: dict | None, rec: dict | None) -> str | None:
    if not run_dir.is_dir():
        return "run folder missing"
    if truth is None:
        return "no readable ground_truth.json"
    if truth.get("format") != TRUTH_FORMAT:
        return f"ground truth format {truth.get('format')!r}, expected {TRUTH_FORMAT!r}"
    if truth.get("kind") not in EXPECTED_KIND:
        return f"unknown fault kind {truth.get('kind')!r}"
    outcome = truth.get("outcome")
    if not outcome:
        return "run not finished (no outcome in the ground truth)"
    reason = outcome.get("reason")
    if reason not in OK_REASONS.get(truth.get("kind"), ("completed",)):
        return f"run ended: {reason}"
    if rec is not None and rec.get("ok") is False:
        return f"runner reported the run as failed ({rec.get('reason')})"
    if truth.get("is_fault") and not truth.get("applied"):
        return "fault not applied"
    return None


def read_marks(steps_dir: Path) -> dict[int, dict[int, int]]:
    """``{rank: {step: wall ns when it began}}`` from the job's step marks."""
    from ringwatch.cluster import read_steps

    if not steps_dir.is_dir():
        return {}
    out: dict[int, dict[int, int]] = {}
    for rank, (_pid, marks) in read_steps(steps_dir).items():
        per = out.setdefault(rank, {})
        for step, ns in marks:
            per.setdefault(step, ns)
    return out


def score_folder_run(source: Path, name: str, run_dir: Path, rec: dict | None,
                     min_stall_s: float | None, from_trigger: bool = False) -> dict:
    """Analyse and score one run: a JSON-ready record with ``status`` ``scored`` or the reason
    it was not, and ``_score`` (the :class:`RunScore`) when scored."""
    from ringwatch._analyze import analyze_job
    from ringwatch._logs import open_job
    from ringwatch.analyzers._hangs import MIN_STALL_S
    try:
        truth = json.loads((run_dir / "ground_truth.json").read_text())
    except (OSError, ValueError):
        truth = None
    if not isinstance(truth, dict):
        truth = None
    fault, world = _scenario(name, truth, rec)
    out = {"source": str(source), "name": name, "path": str(run_dir), "fault": fault,
           "world": world}
    if truth is not None:
        out.update({k: truth.get(k) for k in ("rank", "host", "onset_step", "onset_wall_ns")},
                   params=truth.get("params"),
                   outcome=(truth.get("outcome") or {}).get("reason"))
    why = _unscored_reason(run_dir, truth, rec)
    if why is None:
        try:
            job = open_job(run_dir / "logs", truth.get("job_id"))
        except (OSError, ValueError) as exc:  # LogError is a ValueError
            why = f"logs: {exc}"
    if why is None:
        stall = min_stall_s
        try:
            report = analyze_job(job, min_stall_s=stall)
        except Exception as exc:
            why = f"analysis failed: {type(exc).__name__}: {exc}"
    if why is not None:
        return {**out, "status": why}
    findings = report["_findings"]
    marks = read_marks(run_dir / "steps")
    score = score_run(truth, findings, marks=marks, from_trigger=from_trigger,
                      min_stall_s=MIN_STALL_S if stall is None else stall)  # w/o detected_ns
    detail = score.to_dict()
    detail["findings"] = [{**f.to_dict(), **s} for f, s in zip(findings, detail["findings"],
                                                                strict=True)]
    detail["hiccups"] = report["hiccups"]  # transient stragglers: reported, not findings
    return {**out, "status": "scored", "step_marks": bool(marks), **detail, "_score": score}


# ---- tables ------------------------------------------------------------------------------


def scenario_rows(records: list[dict]) -> list[tuple[str, dict]]:
    """``(label, summary)`` per scenario (fault x world), each fault followed by its total."""
    rows = []
    order = {k: i for i, k in enumerate(SCENARIO_ORDER)}
    faults = sorted({r["fault"] for r in records}, key=lambda k: (order.get(k, 99), k))
    for fault in faults:
        mine = [r for r in records if r["fault"] == fault]
        worlds = sorted({r["world"] for r in mine})
        for world in worlds:
            rows.append((f"{fault}-w{world}", _summary([r for r in mine if r["world"] == world])))
        if len(worlds) > 1:
            rows.append((f"{fault} (all)", _summary(mine)))
    return rows


def _summary(records: list[dict]) -> dict:
    scores = [r["_score"] for r in records if "_score" in r]
    return summarize(scores, unscored=len(records) - len(scores))


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cells(s: dict) -> list[str]:
    lat_i, lat_s = s["latency_steps"] or {}, s["latency_s"] or {}
    recall = "-" if s["recall"] is None else f"{s['detected']}/{s['scored']}"
    culprit = "-" if s["culprit_accuracy"] is None else f"{s['right_culprit']}/{s['detected']}"
    return [str(s["runs"]), str(s["unscored"]), str(s["tp"]), str(s["fp"]), str(s["wrong"]),
            _num(s["precision"], ".2f"), recall, culprit,
            _num(lat_i.get("median"), "g"), _num(lat_i.get("max"), "g"),
            _num(lat_s.get("median"), ".2f"), _num(lat_s.get("max"), ".2f")]


HEAD = ["scenario", "runs", "n/s", "TP", "FP", "wrong", "prec", "recall", "culprit",
        "it med", "it max", "s med", "s max"]


def render_text(rows: list[tuple[str, dict]]) -> list[str]:
    table = [HEAD] + [[label, *_cells(s)] for label, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEAD))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    out = [line(table[0]), "-" * len(line(table[0]))]
    for label, cells in zip([x[0] for x in rows], table[1:], strict=True):
        out.append(line(cells))
        if label.endswith("(all)"):
            out.append("")
    return out[:-1] if out[-1] == "" else out


def render_markdown(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] + ["--:"] * 12) + "|"]
    for label, s in rows:
        cells = _cells(s)
        if label.endswith("(all)"):
            label, cells = f"**{label}**", [f"**{c}**" for c in cells]
        out.append("| " + " | ".join([label, *cells]) + " |")
    return out


LEGEND = [
    "n/s: runs not scored; TP, FP, wrong: findings (true positive, false positive, expected",
    "kind with the wrong culprit); prec: TP/(TP+FP); recall: runs with a finding of the",
    "expected kind; culprit: of those, runs naming the victim; it, s med/max: detection",
    "latency of the runs' true positives, iterations after the onset step and seconds after",
    "the onset (hangs: seconds only)",
]


def run_lines(records: list[dict]) -> list[str]:
    several = len({r["source"] for r in records}) > 1
    out = []
    for r in records:
        name = f"{Path(r['source']).name}/{r['name']}" if several else r["name"]
        head = f"{name:<24} "
        if r["status"] != "scored":
            out.append(head + f"NOT SCORED: {r['status']}")
            continue
        victim = r["host"] if r["fault"] == "link" else r["rank"]
        victim = "-" if victim is None else victim
        fs = "; ".join(f"{f['kind']} ({f['cls']}) ranks {','.join(map(str, f['ranks']))} "
                       f"-> {f['verdict']}" for f in r["findings"]) or "no finding"
        lat = []
        if r["latency_steps"] is not None:
            lat.append(f"{r['latency_steps']} it")
        if r["latency_s"] is not None:
            lat.append(f"{r['latency_s']:.2f} s")
        hic = "; ".join(f"rank {h['ranks'][0]} steps {h['since_step']}-{h['until_step']}"
                        for h in r.get("hiccups", ()))
        out.append(head + f"victim {victim}: {fs}" + (f"  [{', '.join(lat)}]" if lat else "")
                   + (f"  (hiccups: {hic})" if hic else ""))
    return out


def report(records: list[dict], *, markdown: bool, per_run: bool) -> list[str]:
    rows = scenario_rows(records)
    lines = render_markdown(rows) if markdown else render_text(rows)
    lines += ["", *LEGEND, ""]
    bad = [r for r in records if r["status"] != "scored"]
    if bad:
        lines.append(f"{len(bad)} run(s) not scored:")
        lines += [f"  {r['name']} ({r['source']}): {r['status']}" for r in bad]
        lines.append("")
    hangs = [r["_score"] for r in records if r["fault"] == "hang" and "_score" in r]
    classed = [s for s in hangs if s.cls_ok is not None]
    if classed:
        lines.append(f"hang class as expected for the injection mode: "
                     f"{sum(s.cls_ok for s in classed)}/{len(classed)} found hangs")
    lines.append("acceptance:")
    for a in accept(records):
        lines.append(("- " if markdown else "  ") + f"{a['status'].upper()}: {a['criterion']}"
                     f" ({a['detail']})")
    if per_run:
        lines += ["", "runs:"] + run_lines(records)
    return lines


def accept(records: list[dict]) -> list[dict]:
    unscored: dict[str, int] = {}
    for r in records:
        if "_score" not in r:
            unscored[r["fault"]] = unscored.get(r["fault"], 0) + 1
    return acceptance([r["_score"] for r in records if "_score" in r], unscored)


# ---- entry point -------------------------------------------------------------------------


def run_scenarios(args) -> int:
    import scenarios

    argv = ["--out", str(args.out)]
    for flag in ("worlds", "reps", "faults", "seed"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    if args.resume:
        argv.append("--resume")
    return scenarios.main(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folders = list(args.folders)
    if args.run:
        if args.out is None:
            print("error: --run needs --out (where the scenario runs go)", file=sys.stderr)
            return 1
        rc = run_scenarios(args)
        print(f"scenarios.py exited with {rc}; scoring {args.out}", flush=True)
        folders.insert(0, args.out)
    if not folders:
        print("error: give scenario folders to score, or --run --out DIR", file=sys.stderr)
        return 1
    runs = []
    for folder in folders:
        if not folder.is_dir():
            print(f"error: {folder}: no such folder", file=sys.stderr)
            return 1
        found = list_runs(folder)
        if not found:
            print(f"error: {folder}: no runs.jsonl and no run folders", file=sys.stderr)
            return 1
        runs += [(folder, *x) for x in found]
    records = []
    for i, (folder, name, run_dir, rec) in enumerate(runs, 1):
        r = score_folder_run(folder, name, run_dir, rec, args.min_stall_s, args.from_trigger)
        n = len(r.get("findings", []))
        print(f"[{i}/{len(runs)}] {name}: "
              + (f"{n} finding(s)" if r["status"] == "scored" else r["status"]),
              file=sys.stderr, flush=True)
        records.append(r)
    print("\n".join(report(records, markdown=args.markdown, per_run=args.per_run)))
    if args.json:
        stall = "adaptive" if args.min_stall_s is None else args.min_stall_s
        doc = {"format": "ringwatch-detection/1", "inputs": [str(f) for f in folders],
               "min_stall_s": stall,
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records],
               "scenarios": [{"scenario": label, **s} for label, s in scenario_rows(records)],
               "acceptance": accept(records)}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 2 if any(r["status"] != "scored" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""ringwatch against HolisticTraceAnalysis (HTA) on the same multi-rank profiler traces.

    .venv/bin/python benchmarks/hta_compare.py --hta-python /tmp/hta-venv/bin/python
    .venv/bin/python benchmarks/hta_compare.py --hta-python ... --sizes 20,100,300 --reps 3

HTA is not a dependency of ringwatch: install it apart, e.g.
``python3 -m venv /tmp/hta-venv && /tmp/hta-venv/bin/pip install HolisticTraceAnalysis``.

1. Traces: for each size (steps of the job), a real job is run and traced:
   ``torchrun --nproc-per-node N -m ringwatch.cluster._job --steps S --profile-dir DIR``
   (Gloo on CPU, torch.profiler recording every step, ``rank-R.json.gz`` per rank), with one
   rank doing ``--extra-work-factor`` times the work (a straggler by design) so that both
   tools have something to find. Kept under ``--traces`` (reused when already there).
2. Runs, interleaved (for each repetition, each size, both tools in turn, the order swapped
   every repetition), each in a fresh child process:
   - ringwatch: ``open_sources`` (sniff, stream and map the traces) then ``analyze_job``
     (every analyzer: hangs, stragglers, slow links, clocks);
   - HTA: ``TraceAnalysis(trace_dir=...)`` (loads and parses the traces; its own process
     pool) then ``get_potential_stragglers()`` and ``get_comm_comp_overlap()``.
   Measured: wall seconds of the child (load + analysis), and peak memory two ways: the
   child's max RSS (``wait4``; for HTA's pool, the largest process's) and the peak of the
   whole process tree's summed RSS, sampled from /proc every 20 ms.
3. The table: medians per size and tool, and the ratios HTA / ringwatch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

RINGWATCH_CODE = r"""
import json, sys, time
t0 = time.monotonic()
from ringwatch.inputs import open_sources
from ringwatch._analyze import analyze_job
opened = open_sources([sys.argv[1]])
src = opened.sources[0]
t1 = time.monotonic()
report = analyze_job(src)
t2 = time.monotonic()
json.dump({"load_s": t1 - t0, "analysis_s": t2 - t1, "rows": report["collectives"],
           "stragglers": sorted({r for f in report["_findings"] if f.kind in
                                 ("straggler", "imbalance") for r in f.ranks}),
           "problems": len(report["unreadable"]) + len(opened.unreadable)},
          open(sys.argv[2], "w"))
"""

HTA_CODE = r"""
import json, sys, time, logging
logging.disable(logging.CRITICAL)
t0 = time.monotonic()
from hta.trace_analysis import TraceAnalysis
a = TraceAnalysis(trace_dir=sys.argv[1])
t1 = time.monotonic()
out = {"load_s": t1 - t0}
try:
    out["stragglers"] = [int(r) for r in a.get_potential_stragglers(num_candidates=1)]
except Exception as exc:
    out["stragglers_error"] = f"{type(exc).__name__}: {exc}"[:200]
try:
    overlap = a.get_comm_comp_overlap(visualize=False)
    out["overlap_rows"] = int(len(overlap))
except Exception as exc:
    out["overlap_error"] = f"{type(exc).__name__}: {exc}"[:200]
out["analysis_s"] = time.monotonic() - t1
json.dump(out, open(sys.argv[2], "w"))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hta-python", required=True, help="a Python with HTA installed")
    p.add_argument("--nproc", type=int, default=8, help="ranks of the traced job")
    p.add_argument("--sizes", default="20,100,300", help="steps of each traced job")
    p.add_argument("--reps", type=int, default=3, help="runs of each tool per size")
    p.add_argument("--large-reps", type=int, default=1,
                   help="runs per tool for sizes of --large-steps steps or more")
    p.add_argument("--large-steps", type=int, default=250)
    p.add_argument("--straggler", type=int, default=3, help="rank with extra work")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--traces", default=str(Path(tempfile.gettempdir()) / "rw-hta-traces"),
                   help="where the traces are made (reused if there)")
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--json", metavar="FILE", help="write every run here")
    return p.parse_args(argv)


def make_traces(args, steps: int) -> Path:
    """A folder with one ``rank-R.json.gz`` per rank of a ``steps``-step traced job."""
    d = Path(args.traces) / f"n{args.nproc}-s{steps}"
    if len(list(d.glob("rank-*.json.gz"))) == args.nproc:
        return d
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "ringwatch.cluster._job", "--steps", str(steps), "--profile-dir", str(d),
           "--extra-work-rank", str(args.straggler), "--extra-work-factor", str(args.factor)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return d


def _tree_rss_kb(root: int) -> int:
    """Summed RSS (KiB) of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE") // 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def measure(python: str, code: str, trace_dir: Path, timeout_s: float) -> dict:
    """One child: its result, wall seconds, max RSS and peak tree RSS (MiB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    t0 = time.monotonic()
    proc = subprocess.Popen([python, "-c", code, str(trace_dir), out_path], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = b""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else b""
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        done.set()
        sampler.join()
    result = {"wall_s": wall, "maxrss_mib": usage.ru_maxrss / 1024,
              "tree_peak_mib": peak[0] / 1024, "rc": proc.returncode}
    if wall > timeout_s:
        result["slow"] = True
    try:
        result.update(json.loads(Path(out_path).read_text()))
    except (OSError, ValueError):
        result["error"] = err.decode(errors="replace")[-500:]
    os.unlink(out_path)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    dirs = {}
    for s in sizes:
        t0 = time.monotonic()
        dirs[s] = make_traces(args, s)
        files = sorted(dirs[s].glob("rank-*.json.gz"))
        gz = sum(f.stat().st_size for f in files)
        import gzip

        raw = 0
        for f in files:
            with gzip.open(f, "rb") as g:
                while chunk := g.read(1 << 24):
                    raw += len(chunk)
        dirs[s] = (dirs[s], gz, raw)
        print(f"traces {s} steps x {args.nproc} ranks: {gz / 1e6:.1f} MB gzipped, "
              f"{raw / 1e6:.1f} MB of JSON ({time.monotonic() - t0:.0f} s)", flush=True)
    tools = {"ringwatch": (PY, RINGWATCH_CODE), "hta": (args.hta_python, HTA_CODE)}
    runs = []
    reps = max(args.reps, args.large_reps)
    for rep in range(reps):
        for s in sizes:
            if rep >= (args.large_reps if s >= args.large_steps else args.reps):
                continue
            order = ["ringwatch", "hta"] if rep % 2 == 0 else ["hta", "ringwatch"]
            for tool in order:
                python, code = tools[tool]
                r = measure(python, code, dirs[s][0], args.timeout_s)
                r.update(tool=tool, steps=s, rep=rep, load=os.getloadavg()[0])
                runs.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{args.nproc} ranks, Gloo + torch.profiler traces (.json.gz), medians; "
          f"{os.cpu_count()} CPUs, shared machine (load figures in the runs above)")
    head = (f"{'steps':>5} {'JSON MB':>8} {'tool':>9} {'runs':>4} {'wall s':>8} "
            f"{'load s':>8} {'analysis s':>10} {'maxRSS MiB':>10} {'tree MiB':>9}  answer")
    print(head)
    print("-" * len(head))
    ratios = []
    for s in sizes:
        med = {}
        for tool in ("ringwatch", "hta"):
            rs = [r for r in runs if r["steps"] == s and r["tool"] == tool]
            if not rs:
                continue
            m = {k: statistics.median(r.get(k, float("nan")) for r in rs)
                 for k in ("wall_s", "load_s", "analysis_s", "maxrss_mib", "tree_peak_mib")}
            med[tool] = m
            answer = rs[0].get("stragglers", rs[0].get("stragglers_error", rs[0].get("error")))
            print(f"{s:>5} {dirs[s][2] / 1e6:>8.1f} {tool:>9} {len(rs):>4} {m['wall_s']:>8.2f} "
                  f"{m['load_s']:>8.2f} {m['analysis_s']:>10.2f} {m['maxrss_mib']:>10.0f} "
                  f"{m['tree_peak_mib']:>9.0f}  {answer}")
        if len(med) == 2:
            ratios.append((s, med["hta"]["wall_s"] / med["ringwatch"]["wall_s"],
                           med["hta"]["maxrss_mib"] / med["ringwatch"]["maxrss_mib"],
                           med["hta"]["tree_peak_mib"] / med["ringwatch"]["tree_peak_mib"]))
    print("\nHTA / ringwatch:")
    for s, t, m, tree in ratios:
        print(f"  {s:>5} steps ({dirs[s][2] / 1e6:.0f} MB): time {t:.1f}x, max RSS {m:.1f}x, "
              f"tree peak {tree:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "sizes": {
            s: {"gz_bytes": dirs[s][1], "json_bytes": dirs[s][2]} for s in sizes}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`compute_step_work` (a pipeline's blocked time per rank and step) on many rows.

A stored real pipeline run (``tests/data/pipeline/NAME.parquet``, 8 ranks) is tiled to
``--copies`` copies of its ranks, and the per-step sums are timed ``--repeat`` times. With
``--against FILE``, the same function from another revision of ``analyzers/_work.py`` (e.g.
``git show REV:analyzers/_work.py > /tmp/old_work.py``) runs interleaved with the current one,
and the sums of both are printed.

    .venv/bin/python benchmarks/step_work_scale.py --run b-strag --copies 1000
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import polars as pl
from _against import load_revision

from ringwatch.analyzers import _work
from ringwatch.analyzers._timing import with_analysis_durations

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "pipeline"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="healthy", help="a stored run of tests/data/pipeline")
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--against", help="another revision's analyzers/_work.py")
    args = ap.parse_args(argv)
    base = pl.read_parquet(DATA / f"{args.run}.parquet")
    ranks = int(base["rank"].max()) + 1
    ev = with_analysis_durations(pl.concat(
        [base.with_columns(pl.col("rank") + ranks * i) for i in range(args.copies)]))
    arms = [("current", _work)]
    if args.against:
        arms.append(("against", load_revision(args.against, "other_work")))
    print(f"{args.run} x {args.copies}: {ev.height:,} rows")
    for _ in range(args.repeat):
        for name, mod in arms:
            t0 = time.perf_counter()
            work = mod.compute_step_work(ev)
            took = time.perf_counter() - t0
            print(f"{name:8} {took:6.2f} s  {work.height:,} (rank, step)  blocked "
                  f"{work['blocked_ms'].sum() / 1e3:,.0f} s in all")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

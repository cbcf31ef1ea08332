"""`compute_group_bandwidth` (each group's transfer bandwidth per step) on many rows, or the
whole link pass (`detect_slow_links`, with `--pass links`: the step table, the bandwidth, the
slow groups and the suspects).

A stored real run (``tests/data/long/NAME.parquet``: 4 Gloo DDP ranks, 400 steps, its gradient
buckets queued in the backend) is tiled to ``--copies`` copies of its ranks and groups, and
the bandwidth pass is timed ``--repeat`` times. With ``--against FILE``, the same function
from another revision of ``analyzers/_links.py`` (e.g. ``git show REV:analyzers/_links.py >
/tmp/old_links.py``) runs interleaved with the current one; the medians and the median
bandwidth of each are printed.

    .venv/bin/python benchmarks/link_bandwidth_scale.py --copies 64 --against /tmp/old_links.py
    .venv/bin/python benchmarks/link_bandwidth_scale.py --pass links --against /tmp/old_links.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import polars as pl
from _against import load_revision

from ringwatch.analyzers import _links
from ringwatch.analyzers._timing import with_analysis_durations

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "long"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="straggler-work-400", help="a stored run of tests/data/long")
    ap.add_argument("--copies", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--against", help="another revision's analyzers/_links.py")
    ap.add_argument("--pass", dest="what", choices=("bandwidth", "links"), default="bandwidth")
    args = ap.parse_args(argv)
    base = pl.read_parquet(DATA / f"{args.run}.parquet")
    ranks = int(base["rank"].max()) + 1
    ev = with_analysis_durations(pl.concat([base.with_columns(
        (pl.col("rank") + ranks * i).cast(base.schema["rank"]),
        (pl.col("pg").cast(pl.Utf8) + f"-{i}").alias("pg")) for i in range(args.copies)]))
    arms = [("current", _links)]
    if args.against:
        arms.append(("against", load_revision(args.against, "other_links")))
    print(f"{args.run} x {args.copies}: {ev.height:,} rows")
    took: dict[str, list[float]] = {name: [] for name, _ in arms}
    mbps: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, mod in arms:
            t0 = time.perf_counter()
            if args.what == "links":
                mod.detect_slow_links(ev)
            else:
                mbps[name] = float(mod.compute_group_bandwidth(ev)["MBps"].median())
            took[name].append(time.perf_counter() - t0)
    for name, ts in took.items():
        print(f"{name:8} median {statistics.median(ts):6.3f} s over {len(ts)}" + (
            f"  median bandwidth {mbps[name]:,.1f} MB/s" if name in mbps else ""))
    if len(took) == 2:
        print(f"ratio current / against: "
              f"{statistics.median(took['current']) / statistics.median(took['against']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A post-mortem of a pipeline-parallel job of ~10 M rows: ``ringwatch analyze``'s passes
(layout, blocked time, the work detectors, the what-if replay) at scale.

``scale.py``'s post-mortem is a data-parallel job; a pipeline's analysis has more to do (the
send/recv pairs, every asynchronous receive's wait, the replay of the steps' dependencies).
Here the rows are a real run's, tiled: two stored runs of the local cluster's 2 x 2 x 2
pipeline (``tests/data/pipeline``: ``healthy`` and ``strag-mid``, rank 5 twice the work from
step 26) are laid side by side ``--rank-copies`` times (each copy its own ranks, groups and
hosts: more data-parallel pipelines of one job) and end to end ``--step-copies`` times (the
job runs longer). Every block is the healthy run but the last block of copy 0, the straggler
run: one straggler, rank 5, in the job's last steps. Clocks and step numbers, sequence numbers
and op indices run on from block to block.

The tiled job is written as the agents lay logs out (``synthetic.write_rank_logs``), then
``--repeats`` fresh processes each read it as ``ringwatch analyze`` does and run every analyzer
(``scale.py``'s post-mortem child: wall time from opening the logs to the findings, peak RSS).

    .venv/bin/python benchmarks/pipeline_scale.py                       # 64 x 11: 10.5 M rows
    .venv/bin/python benchmarks/pipeline_scale.py --rank-copies 8 --step-copies 2   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale import PM_TARGET_MB, PM_TARGET_S, run_child  # noqa: E402
from synthetic import write_rank_logs  # noqa: E402

from ringwatch._analyze import ANALYZED_COLUMNS  # noqa: E402
from ringwatch._schema import format_ranks, parse_ranks, polars_schema  # noqa: E402

DATA = HERE.parent / "tests" / "data" / "pipeline"
VICTIM = 5  # strag-mid's straggler ...
ONSET = 26  # ... and its first slowed step (tests/data/pipeline/README.md)
GAP_NS = 50_000_000  # between one block's last row and the next block's first


def _normalised(run: pl.DataFrame) -> pl.DataFrame:
    """A stored run with its wall clock from 0 and each host's monotonic clock the wall
    clock less a per-host offset (the run's own)."""
    t0 = int(run["t_start_ns"].min())
    off = run.group_by("host").agg((pl.col("t_start_ns") - pl.col("mono_start_ns"))
                                   .median().cast(pl.Int64).alias("_off"))
    return run.with_columns(pl.col("t_start_ns", "t_end_ns") - t0).join(off, on="host")


def tile(healthy: pl.DataFrame, faulty: pl.DataFrame, rank_copies: int,
         step_copies: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """The tiled job's rows and each host's wall-minus-monotonic offset."""
    a, b = _normalised(healthy), _normalised(faulty)
    ranks = int(max(a["rank"].max(), b["rank"].max())) + 1
    hosts = sorted(set(a["host"].unique()) | set(b["host"].unique()))
    pgs = int(max(a["pg"].cast(pl.Int64).max(), b["pg"].cast(pl.Int64).max())) + 1
    steps = int(max(a["step"].max(), b["step"].max())) + 1
    period = int(max(a["t_end_ns"].max(), b["t_end_ns"].max())) + GAP_NS
    seq = dict(pl.concat([a, b]).group_by("pg").agg(pl.col("seq").max() + 1).iter_rows())
    idx = int(max(a["idx"].max(), b["idx"].max())) + 1
    offsets: dict[str, int] = {}
    blocks = []
    for i in range(rank_copies):
        host_of = {h: f"host{n + i * len(hosts)}" for n, h in enumerate(hosts)}
        spans = {s: format_ranks([r + i * ranks for r in parse_ranks(s)])
                 for s in set(a["pg_ranks"].unique()) | set(b["pg_ranks"].unique())}
        for j in range(step_copies):
            src = b if (i == 0 and j == step_copies - 1) else a
            shift = j * period
            blk = src.with_columns(
                pl.col("rank") + i * ranks, pl.col("peer") + i * ranks,
                pl.col("host").replace_strict(host_of),
                pl.col("pg_ranks").replace_strict(spans),
                (pl.col("pg").cast(pl.Int64) + i * pgs).cast(pl.Utf8).alias("pg"),
                pl.col("seq") + j * pl.col("pg").replace_strict(seq, return_dtype=pl.Int64),
                pl.col("idx") + j * idx, pl.col("step") + j * steps,
                pl.col("t_start_ns", "t_end_ns") + shift)
            blocks.append(blk)
        for h, off in a.select("host", "_off").unique("host").iter_rows():
            offsets[host_of[h]] = int(off)
    rows = pl.concat(blocks).with_columns(
        (pl.col("t_start_ns") - pl.col("_off")).alias("mono_start_ns"),
        (pl.col("t_end_ns") - pl.col("_off")).alias("mono_end_ns")).drop("_off")
    return rows, offsets


def _full_schema(rows: pl.DataFrame, job_id: str, world: int) -> pl.DataFrame:
    """The stored runs keep the analysed columns; the rest as an agent on Gloo writes them."""
    fill = {"job_id": pl.lit(job_id), "world_size": pl.lit(world),
            "pid": pl.col("rank") + 10_000, "backend": pl.lit("gloo"),
            "pg_desc": pl.when(pl.col("pg_size") == world).then(pl.lit("default_pg"))
            .otherwise(pl.lit("undefined")),
            "dtype": pl.lit("float32"), "numel": pl.col("nbytes") // 4,
            "nbytes_in": pl.col("nbytes"), "nbytes_out": pl.col("nbytes"),
            "api": pl.lit("torch.distributed"), "t_issue_ns": pl.col("t_start_ns")}
    schema = polars_schema()
    return rows.with_columns(
        [fill.get(c, pl.lit(None)).cast(t).alias(c) for c, t in schema.items()
         if c not in rows.columns]).select([pl.col(c).cast(t) for c, t in schema.items()])


def write_job(log_dir: Path, rank_copies: int, step_copies: int) -> dict:
    t0 = time.perf_counter()
    healthy = pl.read_parquet(DATA / "healthy.parquet")
    faulty = pl.read_parquet(DATA / "strag-mid.parquet")
    rows, offsets = tile(healthy, faulty, rank_copies, step_copies)
    world = int(rows["rank"].max()) + 1
    job_id = "pipeline-scale"
    rows = _full_schema(rows, job_id, world)
    written_ns = int(rows["t_end_ns"].max()) + 60 * 10**9
    for (_rank,), part in rows.sort("rank", "idx").partition_by(
            "rank", as_dict=True, maintain_order=True).items():
        write_rank_logs(part, log_dir, job_id, world, written_ns=written_ns,
                        wall_minus_mono=offsets[part["host"][0]])
    size = sum(p.stat().st_size for p in (log_dir / job_id).rglob("*") if p.is_file())
    return {"rows": rows.height, "ranks": world, "steps": int(rows["step"].max()) + 1,
            "victim_step": (step_copies - 1) * (int(faulty["step"].max()) + 1) + ONSET,
            "write_s": time.perf_counter() - t0, "disk_mb": size / 2**20,
            "dir": str(log_dir / job_id)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank-copies", type=int, default=64)
    ap.add_argument("--step-copies", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rss-mb", type=float, default=8192.0)
    ap.add_argument("--logs", help="write the logs here and keep them (reused if there)")
    ap.add_argument("--json", help="save every number here")
    args = ap.parse_args(argv)
    keep = args.logs is not None
    root = Path(args.logs) if keep else Path(tempfile.mkdtemp(prefix="rw-pipeline-scale-"))
    try:
        meta_file = root / "tiled.json"
        if keep and meta_file.exists():
            job = json.loads(meta_file.read_text())
            print(f"reusing {job['dir']}")
        else:
            job = write_job(root, args.rank_copies, args.step_copies)
            meta_file.write_text(json.dumps(job))
        print(f"{job['rows']:,} rows, {job['ranks']} ranks x {job['steps']} steps, "
              f"{job['disk_mb']:.0f} MB on disk (written in {job.get('write_s', 0):.0f} s)")
        runs = [run_child("postmortem", args.max_rss_mb, job_dir=job["dir"],
                          columns=list(ANALYZED_COLUMNS)) for _ in range(args.repeats)]
        for r in runs:
            print(f"  wall {r['wall_s']:6.2f} s (read {r['read_s']:5.2f} s)  cpu "
                  f"{r['cpu_s']:6.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  load "
                  f"{r['load']:.1f}")
        wall = statistics.median(r["wall_s"] for r in runs)
        rss = max(r["peak_rss_mb"] for r in runs)
        print(f"median wall {wall:.2f} s (target < {PM_TARGET_S:.0f} s), peak RSS {rss:.0f} MB "
              f"(target < {PM_TARGET_MB:.0f} MB)")
        found = runs[0]["findings"]
        named = [f for f in found if f["kind"] == "straggler" and VICTIM in f["ranks"]]
        print(f"rank {VICTIM}, straggler from step {job['victim_step']}: " + (
            f"found (since {named[0]['since_step']}, detected {named[0]['detected_step']})"
            if named else "NOT FOUND"))
        for f in found:
            if f not in named:
                print(f"  other finding: {f['kind']} ({f['cls']}) ranks {f['ranks']}"
                      f"{' +more' if f['n_ranks'] > 8 else ''}")
        if args.json:
            Path(args.json).write_text(json.dumps({"job": job, "runs": runs}, indent=1))
        return 0 if named and wall < PM_TARGET_S and rss < PM_TARGET_MB else 2
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

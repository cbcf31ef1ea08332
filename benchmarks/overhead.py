"""What ringwatch costs a training job: step-time overhead and hook cost per collective.

Two measurements, taken side by side in one run.

(a) Step-time overhead of a real job. The demo job (``ringwatch.cluster._job``: a 4-rank Gloo DDP
    MLP, 6 gradient buckets per step) is launched with ``torch.distributed.run`` in interleaved
    runs, one per arm in each group (``off, on, run, off, on, run, ...`` by default), after one
    discarded warm-up run. The arms differ only in how ringwatch is attached:

    * ``off``: the plain command;
    * ``on``:  the same command with ``--attach DIR``, i.e. ``ringwatch.attach(log_dir=DIR)``
      in the script (the one-line use);
    * ``run``: ``ringwatch run --log-dir DIR -- python -m torch.distributed.run ...``
      (the zero-code use: the agent attaches itself in every Python child);
    * ``on-noddp`` (diagnostic, not run by default): ``on`` with ``RINGWATCH_DDP_HOOK=0``, so
      DDP's buckets stay in C++ (recovered from the Flight Recorder): it separates the cost of
      routing buckets through a Python comm hook from the rest of the agent.

    Each run reports rank 0's median step time over steps 2..N. Per arm we give the median over
    runs and its overhead against ``off`` (ratio of the medians, minus one), and a paired
    estimate: the median over groups of ``arm_i / off_i - 1``, where group ``i`` is the runs
    launched back to back, which cancels slow drifts of the machine. The bracket after it is a
    bootstrap 95% interval of that paired median (resampling groups); on a busy or small
    machine it can be wider than the effect. The 1-minute load average is noted before each run.
    After every recorded run the logs are read back: each rank must hold at least
    ``(steps - 1) * buckets + first`` timed DDP all-reduce rows (DDP's first iteration uses its
    initial bucketing, ``first`` buckets, one for this model; after it DDP rebuilds them and
    sends ``buckets`` per step), so a run whose agent did not really record cannot pass for a
    cheap one.

(b) Hook cost per collective. Two Gloo ranks (``torch.multiprocessing``, a free TCP port) time
    blocks of ``K`` tiny collectives on a 1-float tensor, in the same processes, for three arms:
    ``bare``; ``ringwatch`` (``attach()`` before the arm's blocks, ``detach()`` after, so the
    patched functions are really restored in between; Flight Recorder backfill off, or each
    attach would try to recover the other arms' collectives); ``profiler`` (the same blocks inside
    ``torch.profiler.profile(activities=[CPU])``). Ops: blocking ``all_reduce``, ``all_reduce``
    with ``async_op=True`` followed by ``wait()``, and ``broadcast``. Each round runs every arm
    once, in an order rotated from round to round; a barrier precedes every block so the ranks
    start together; a block's time is the maximum over the two ranks. The table gives the
    median over rounds of the per-call time, and each arm's difference from ``bare`` (median
    over rounds of the same-round difference). A second table gives the CPU time per call, of
    the whole rank (all threads) and of the calling thread alone: on a small machine the wall
    time is mostly waiting for the peer and thread wake-ups, and the CPU time shows what the
    hooks themselves cost. The agent's writer thread flushes every 2 s, so
    some ringwatch blocks include a flush and some not: the median leaves that amortised cost
    out, the mean (in the JSON) keeps it. One
    untimed round first warms up the hooks, the profiler and Gloo. The recorded rows (ringwatch)
    and profiler events are counted so that both arms are known to have seen every call.
    ``--hook-backend nccl --hook-world N`` runs (b) on NCCL instead: one rank per GPU, a
    1-float CUDA tensor, each block closed by ``torch.cuda.synchronize()`` (the CPU figures
    are then the launch path: PyTorch's, NCCL's enqueue, and ringwatch's hooks). The first
    ``attach()`` turns NCCL's CUDA-event timing on for the group for good (PyTorch cannot turn
    it off), so from the second round on ``bare`` includes the two events per collective that
    ringwatch's timing needs.

Run ``python benchmarks/overhead.py --help`` for the knobs; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _overhead_hook import hook_cost
from _overhead_tables import bootstrap_median_ci, hook_table, pct, step_table

# Arms of (a): how the demo job is launched.
ARMS = {
    "off": "the plain command",
    "on": "--attach DIR: ringwatch.attach() in the script",
    "run": "ringwatch run --log-dir DIR -- <the plain command>",
    "native": "--attach DIR with RINGWATCH_NATIVE=1: the C++ backend wrapper records the Gloo "
              "groups (no Python hook on the calling thread)",
    "run-native": "ringwatch run with RINGWATCH_NATIVE=1",
    "on-noddp": "--attach DIR with RINGWATCH_DDP_HOOK=0 (diagnostic: DDP buckets stay in C++ "
                "and are recovered from the Flight Recorder)",
    "pyhook": "no ringwatch; PyTorch's own Python allreduce comm hook registered (reference: "
              "what routing DDP's buckets through Python costs by itself)",
}
# Scale of a full run (about 10-15 minutes on 2 CPUs) and of --quick (about 2 minutes); an
# explicit flag wins over both.
FULL = {"pairs": 8, "steps": 200, "rounds": 15, "k": 2000}
QUICK = {"pairs": 2, "steps": 30, "rounds": 3, "k": 300}
RUN_TIMEOUT_S = 300


# ---- (a) step-time overhead ---------------------------------------------------------------------
def _clean_env(tmp: Path) -> dict[str, str]:
    """This environment without any RINGWATCH_* variable (the arms set their own), with its
    temporary files (``torch.distributed.run`` leaves a folder per launch) under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGWATCH_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["TMPDIR"] = str(tmp)
    return env


def job_command(arm: str, args, result: Path, log_dir: Path) -> list[str]:
    """The command line of one run of the demo job for ``arm``."""
    py = sys.executable
    cmd = [py, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(args.nproc), "-m", "ringwatch.cluster._job",
           "--steps", str(args.steps), "--batch", str(args.batch), "--layers", str(args.layers),
           "--width", str(args.width), "--bucket-cap-mb", str(args.bucket_cap_mb),
           "--result", str(result)]
    if args.workload == "decode":  # a tensor-parallel decode loop (cluster/_serving.py)
        cmd += ["--workload", "decode", "--tp", str(args.tp)]
    if args.job_sleep_ms:
        cmd += ["--step-sleep-ms", str(args.job_sleep_ms)]
    if arm in ("on", "on-noddp", "native"):
        cmd += ["--attach", str(log_dir)]
    elif arm in ("run", "run-native"):
        cmd = [py, "-m", "ringwatch._cli", "run", "--log-dir", str(log_dir), "--"] + cmd
    elif arm == "pyhook":
        cmd += ["--python-hook"]
    return cmd


def _run(cmd: list[str], timeout_s: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill that whole session (torchrun's ranks)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}\n"
                           f"{out[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def check_logs(log_dir: Path, *, steps: int, buckets: int, first: int, world: int,
               ddp_hook: bool = True, native: bool = False) -> dict:
    """Read a recorded run's logs back: DDP all-reduce rows per rank vs what the job issued.

    With the DDP hook (the default) every bucket must be a timed ``api="ddp"`` row; with the
    native path, a timed ``api="native"`` row; without either (``on-noddp``) the buckets are
    recovered from the Flight Recorder, and are only counted.
    """
    expected = (steps - 1) * buckets + first
    if native:
        return _timed_allreduces(log_dir, expected=expected, world=world, api="native")
    if ddp_hook:
        return _timed_allreduces(log_dir, expected=expected, world=world, api="ddp")
    return _timed_allreduces(log_dir, expected=expected, world=world, api=None, timed=False)


def _timed_allreduces(log_dir: Path, *, expected: int, world: int, api: str | None,
                      timed: bool = True) -> dict:
    """All-reduce rows per rank of the one job under ``log_dir`` (of ``api`` when given;
    finished and timed when ``timed``) against ``expected``."""
    import polars as pl

    import ringwatch

    jobs = sorted(d.name for d in log_dir.iterdir() if d.is_dir()) if log_dir.is_dir() else []
    if len(jobs) != 1:
        return {"jobs": jobs, "ddp_allreduce_per_rank": [0] * world,
                "expected_per_rank": expected, "ok": False}
    df = ringwatch.read_events(log_dir, jobs[0])
    keep = pl.col("op") == "all_reduce"
    if api is not None:
        keep = keep & (pl.col("api") == api)
    if timed:
        keep = keep & pl.col("duration_ns").is_not_null() & (pl.col("status") == "ok")
    per_rank = {int(r): int(n) for r, n in df.filter(keep).group_by("rank").len().iter_rows()}
    rows = [per_rank.get(r, 0) for r in range(world)]
    return {"jobs": jobs, "rows": df.height, "ddp_allreduce_per_rank": rows,
            "expected_per_rank": expected, "ok": min(rows) >= expected}


def check_decode_logs(log_dir: Path, *, steps: int, layers: int, world: int) -> dict:
    """A recorded decode run's logs: every rank must hold its ``2 * layers`` timed tensor-
    parallel all-reduces per step (the loop issues nothing else)."""
    return _timed_allreduces(log_dir, expected=steps * 2 * layers, world=world, api=None)


def run_once(arm: str, args, scratch: Path, tag: str) -> dict:
    """One measured run of the demo job; returns its result line plus the log check.

    A run is kept when rank 0 wrote its result and, for a recorded arm, the logs hold every
    DDP all-reduce, even if the launcher then exits non-zero: PyTorch sometimes aborts a rank
    during interpreter shutdown (``terminate called without an active exception``, after
    ``destroy_process_group``, with or without ringwatch), which happens after everything was
    measured. Such exits are counted (``teardown_aborts``). Anything else is retried up to
    ``--retries`` times, then fails the benchmark.
    """
    aborts = 0
    for attempt in range(args.retries + 1):
        work = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=scratch))
        try:
            result, log_dir = work / "result.json", work / "logs"
            cmd = job_command(arm, args, result, log_dir)
            t0 = time.perf_counter()
            env = _clean_env(work)
            if arm == "on-noddp":
                env["RINGWATCH_DDP_HOOK"] = "0"
            if arm in ("native", "run-native"):
                env["RINGWATCH_NATIVE"] = "1"
            load = os.getloadavg()[0]
            proc = _run(cmd, RUN_TIMEOUT_S, env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                aborts += "terminate called without an active exception" in proc.stdout
            if not result.exists():
                if attempt == args.retries:
                    raise RuntimeError(f"{arm} run failed (exit {proc.returncode}): "
                                       f"{' '.join(cmd)}\n{proc.stdout[-3000:]}")
                continue
            out = json.loads(result.read_text())
            rec = {"arm": arm, "median_step_s": out["median_step_s"],
                   "buckets": out.get("buckets", 0),
                   "buckets_first_step": out.get("buckets_first_step", 1), "wall_s": wall,
                   "exit_code": proc.returncode, "attempts": attempt + 1,
                   "teardown_aborts": aborts, "loadavg_1min_before": load}
            if arm in ("off", "pyhook"):
                if log_dir.exists():
                    raise RuntimeError("the off run wrote ringwatch logs: the agent was not off")
                return rec
            if args.workload == "decode":
                rec["logs"] = check_decode_logs(log_dir, steps=args.steps, layers=args.layers,
                                                world=out["world_size"])
            else:
                rec["logs"] = check_logs(log_dir, steps=args.steps, buckets=out["buckets"],
                                         first=rec["buckets_first_step"],
                                         world=out["world_size"], ddp_hook=arm != "on-noddp",
                                         native=arm in ("native", "run-native"))
            if rec["logs"]["ok"] or attempt == args.retries:
                return rec
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise AssertionError("unreachable")


def step_overhead(args, scratch: Path, say) -> dict:
    arms = args.arms
    if any(a in ("native", "run-native") for a in arms):
        from ringwatch.agent.capture import _native

        if _native.load() is None:  # built once here, not inside the measured runs
            raise RuntimeError("the native hot path cannot be built here")
    say(f"(a) demo job: {args.nproc} ranks, {args.steps} steps, {args.pairs} x {arms} "
        "(+1 warm-up)")
    warm = run_once("off", args, scratch, "warmup")
    say(f"    warm-up off: {1e3 * warm['median_step_s']:.2f} ms/step, {warm['wall_s']:.1f} s")
    runs: list[dict] = []
    for i in range(args.pairs):
        for arm in arms:
            rec = run_once(arm, args, scratch, f"{arm}{i}")
            rec["pair"] = i
            runs.append(rec)
            check = ""
            if "logs" in rec:
                lg = rec["logs"]
                check = (f"  logs {'ok' if lg['ok'] else 'MISSING ROWS'}: all_reduce rows/rank "
                         f"{min(lg['ddp_allreduce_per_rank'])} (>= {lg['expected_per_rank']})")
            if rec["exit_code"] or rec["attempts"] > 1:
                check += (f"  [exit {rec['exit_code']}, attempt {rec['attempts']}, "
                          f"{rec['teardown_aborts']} teardown abort(s)]")
            say(f"    pair {i} {arm:<8} {1e3 * rec['median_step_s']:7.2f} ms/step  "
                f"{rec['wall_s']:5.1f} s  load {rec['loadavg_1min_before']:4.1f}{check}")
    by_arm = {a: [r["median_step_s"] for r in runs if r["arm"] == a] for a in arms}
    off_med = statistics.median(by_arm["off"])
    summary = {}
    for a in arms:
        med = statistics.median(by_arm[a])
        mine = [r for r in runs if r["arm"] == a]
        entry = {"runs": len(by_arm[a]), "median_step_s": med, "per_run_step_s": by_arm[a],
                 "teardown_aborts": sum(r["teardown_aborts"] for r in mine),
                 "relaunched": sum(r["attempts"] - 1 for r in mine)}
        if a != "off":
            ratios = [on / off - 1 for on, off in zip(by_arm[a], by_arm["off"], strict=True)]
            entry["overhead"] = med / off_med - 1
            entry["paired_overhead"] = statistics.median(ratios)
            entry["paired_ci95"] = bootstrap_median_ci(ratios)
            entry["pair_ratios"] = ratios
            entry["logs_ok"] = all(r["logs"]["ok"] for r in mine if "logs" in r)
        summary[a] = entry
    return {"config": {k: getattr(args, k) for k in
                       ("nproc", "steps", "batch", "layers", "width", "bucket_cap_mb", "pairs",
                        "workload", "tp", "job_sleep_ms")},
            "buckets": runs[0]["buckets"], "arms": summary, "runs": runs,
            "warmup": warm}


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
    g = p.add_argument_group("(a) step-time overhead")
    g.add_argument("--pairs", type=int, help=f"interleaved groups of runs, one run per arm "
                   f"(default {FULL['pairs']})")
    g.add_argument("--steps", type=int, help=f"training steps per run (default {FULL['steps']})")
    g.add_argument("--nproc", type=int, default=4, help="ranks of the demo job (default 4)")
    g.add_argument("--batch", type=int, default=32,
                   help="samples per rank per step (default 32)")
    g.add_argument("--layers", type=int, default=6, help="linear layers (default 6)")
    g.add_argument("--width", type=int, default=256, help="features per layer (default 256)")
    g.add_argument("--bucket-cap-mb", type=float, default=0.25,
                   help="DDP bucket size, MiB (default 0.25)")
    g.add_argument("--workload", choices=("train", "decode"), default="train",
                   help="the job: train (DDP, default) or decode (tensor-parallel decode "
                   "loop, --tp ranks per replica, two all-reduces per layer per step; "
                   "cluster/_serving.py)")
    g.add_argument("--tp", type=int, default=2, help="decode: ranks per replica (default 2)")
    g.add_argument("--job-sleep-ms", type=float, default=0.0,
                   help="host idle time per step, as while a GPU computes (default 0)")
    g.add_argument("--arms", default="off,on,run",
                   help="comma-separated arms, 'off' first (default off,on,run): " + "; ".join(
                       f"{k} = {v}" for k, v in ARMS.items()))
    g.add_argument("--retries", type=int, default=3, help="re-launch a run that produced no "
                   "result (or, recorded, no full log) up to this many times (default 3)")
    g.add_argument("--skip-step", action="store_true", help="skip (a)")
    h = p.add_argument_group("(b) hook cost per collective")
    h.add_argument("--rounds", type=int, help="timed rounds, every arm once in each "
                   f"(default {FULL['rounds']})")
    h.add_argument("--k", type=int, help=f"calls per timed block (default {FULL['k']})")
    h.add_argument("--skip-hook", action="store_true", help="skip (b)")
    h.add_argument("--hook-backend", choices=("gloo", "nccl"), default="gloo",
                   help="gloo (CPU tensors, the default) or nccl (a CUDA tensor per rank, "
                   "GPU = rank)")
    h.add_argument("--hook-world", type=int, default=2, help="ranks of (b) (default 2; one "
                   "per GPU on nccl)")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.arms[:1] != ["off"] or len(set(args.arms)) != len(args.arms) or len(args.arms) < 2 \
            or not set(args.arms) <= set(ARMS):
        p.error(f"--arms: 'off' then one or more of {', '.join(list(ARMS)[1:])}, no repeats")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pairs < 1 or args.steps < 3 or args.rounds < 1 or args.k < 1:
        p.error("--pairs, --rounds, --k must be >= 1 and --steps >= 3")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    import ringwatch

    results: dict = {"ringwatch": ringwatch.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "host_cpus": os.cpu_count(),
                     "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="ringwatch-bench-"))
    try:
        if not args.skip_step:
            results["step_overhead"] = step_overhead(args, scratch, say)
        if not args.skip_hook:
            results["hook_cost"] = hook_cost(args, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t0
    print()
    if "step_overhead" in results:
        res = results["step_overhead"]
        c = res["config"]
        what = (f"tensor-parallel decode loop (tp {c['tp']}, {c['layers']} layers: "
                f"{2 * c['layers']} all-reduces/step)" if c.get("workload") == "decode"
                else f"DDP demo job, {res['buckets']} buckets/step")
        idle = f", {c['job_sleep_ms']:g} ms host idle/step" if c.get("job_sleep_ms") else ""
        print(f"(a) step time, {c['nproc']}-rank Gloo {what}{idle}, {c['steps']} steps/run, "
              f"{c['pairs']} interleaved groups")
        print("\n".join(step_table(res)))
        print()
    if "hook_cost" in results:
        res = results["hook_cost"]
        c = res["config"]
        print(f"(b) cost per collective, {c['world']}-rank {c['backend']}, 1-float tensor, "
              f"{c['rounds']} rounds of {c['k']} calls")
        print("\n".join(hook_table(res)))
        if "step_overhead" in results:
            so = results["step_overhead"]
            d = res["ops"]["all_reduce_async"]["ringwatch"]["paired_delta_us"]
            base = so["arms"]["off"]["median_step_s"]
            print(f"ringwatch's all_reduce_async wall Δ x {so['buckets']} buckets/step = "
                  f"{so['buckets'] * d:.0f} µs/step = {pct(so['buckets'] * d / 1e6 / base)} "
                  "of an off step of (a)")
        print()
    print(f"total {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")
    ok = all(e.get("logs_ok", True) for e in
             results.get("step_overhead", {}).get("arms", {}).values())
    ok = ok and results.get("hook_cost", {}).get("recorded_ok", True)
    ok = ok and results.get("hook_cost", {}).get("profiler_ok", True)
    if not ok:
        print("WARNING: some arm did not record every collective (see above)", file=sys.stderr)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())

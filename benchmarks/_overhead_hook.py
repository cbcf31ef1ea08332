"""(b) of ``overhead.py``: the hook cost per collective, bare against ringwatch's Python hooks,
its native hot path and ``torch.profiler``, in the same two processes (see ``overhead.py``'s
docstring for the method)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _procs import free_port

HOOK_ARMS = ("bare", "ringwatch", "native", "profiler")
HOOK_OPS = ("all_reduce", "all_reduce_async", "broadcast", "all_to_all")
# The profiler event (``c10d::`` op) of each timed op.
HOOK_OP_PROFILER = {"all_reduce": "c10d::allreduce_", "all_reduce_async": "c10d::allreduce_",
                    "broadcast": "c10d::broadcast_", "all_to_all": "c10d::alltoall_base_"}
HOOK_TIMEOUT_S = 900


def _block(op: str, k: int, t, dist, a2a=None) -> tuple[int, int, int]:
    """``k`` calls of ``op`` on tensor ``t`` (``all_to_all``: ``a2a``, one element per rank,
    in and out); returns the nanoseconds elapsed, of CPU time of the whole process (all its
    threads: Gloo's, ringwatch's writer) and of this thread."""
    w0, p0, t0 = time.perf_counter_ns(), time.process_time_ns(), time.thread_time_ns()
    if op == "all_reduce":
        for _ in range(k):
            dist.all_reduce(t)
    elif op == "all_reduce_async":
        for _ in range(k):
            dist.all_reduce(t, async_op=True).wait()
    elif op == "broadcast":
        for _ in range(k):
            dist.broadcast(t, src=0)
    elif op == "all_to_all":
        out, inp = a2a
        for _ in range(k):
            dist.all_to_all_single(out, inp)
    else:
        raise ValueError(op)
    if t.is_cuda:  # the block ends when the GPU is done (CPU time stays the launch cost)
        import torch

        torch.cuda.synchronize(t.device)
    return (time.perf_counter_ns() - w0, time.process_time_ns() - p0,
            time.thread_time_ns() - t0)


def job_id(r: int, arm: str = "ringwatch") -> str:
    return f"hook-{arm}-r{r:03d}"


def _count_profiler(prof) -> dict[str, int]:
    names = set(HOOK_OP_PROFILER.values())
    counts = dict.fromkeys(names, 0)
    for ev in prof.events():
        if ev.name in counts:
            counts[ev.name] += 1
    return counts


def hook_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One rank of the hook-cost measurement (a ``torch.multiprocessing`` child)."""
    # The children's own chatter (profiler start/stop lines, ringwatch's warnings about the
    # collectives issued between two attach() calls) goes to a file, shown only on failure.
    log = os.open(Path(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for k in [k for k in os.environ if k.startswith("RINGWATCH_")]:
        del os.environ[k]
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import ringwatch

    torch.set_num_threads(1)
    if cfg["backend"] == "nccl":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        t = torch.zeros(1, device="cuda")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        t = torch.zeros(1)  # sums of zeros stay zero: every call does the same work
    a2a = (torch.zeros(world, device=t.device), torch.zeros(world, device=t.device))
    k, rounds = cfg["k"], cfg["rounds"]
    arms = tuple(cfg["arms"])
    times = {a: {op: [] for op in HOOK_OPS} for a in arms}
    prof_counts: list[dict[str, int]] = []
    log_root = Path(out_dir) / "logs"

    def blocks(arm: str, keep: bool) -> None:
        for op in HOOK_OPS:
            dist.barrier()
            ns = _block(op, k, t, dist, a2a)
            if keep:
                times[arm][op].append(ns)  # [wall, process CPU, main-thread CPU]

    for r in range(rounds + 1):  # round 0 warms up and is not kept
        keep = r > 0
        n = len(arms)
        order = arms[r % n:] + arms[:r % n]
        for arm in order:
            if arm == "bare":
                blocks(arm, keep)
            elif arm in ("ringwatch", "native"):
                # A job id per round: ranks agree on it without a store round-trip. No Flight
                # Recorder backfill: it would try to recover the thousands of collectives the
                # other arms issued since the last detach() (an artefact of re-attaching; the
                # per-call path is the same with or without it). ``native``: the C++ backend
                # wrapper (built before the run; attach() fails over to the Python hooks
                # otherwise, which the row check below would show).
                if not ringwatch.attach(log_dir=log_root, job_id=job_id(r, arm),
                                        fr_backfill=False, native=arm == "native"):
                    raise RuntimeError("ringwatch.attach() returned False")
                try:
                    blocks(arm, keep)
                finally:
                    ringwatch.detach()
            else:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    blocks(arm, keep)
                if r in (0, rounds):  # counting the events costs seconds: twice is enough
                    prof_counts.append(_count_profiler(prof))
                del prof
    dist.barrier()
    out = {"rank": rank, "times_ns": times, "profiler_counts": prof_counts}
    if rank == 0:
        import polars as pl

        out["recorded"] = {}
        for arm in [a for a in ("ringwatch", "native") if a in arms]:
            df = pl.concat([ringwatch.read_events(log_root / job_id(r, arm))
                            for r in range(rounds + 1)])
            recorded = df.filter(pl.col("rank") == rank)
            out["recorded"][arm] = {
                f"{op}/{api}": n for op, api, n in
                recorded.group_by("op", "api").len().sort("op", "api").iter_rows()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def hook_cost(args, scratch: Path, say) -> dict:
    import torch.multiprocessing as mp

    from ringwatch.agent.capture import _native

    world = args.hook_world
    arms = HOOK_ARMS
    if _native.load() is None:  # built here once, not inside the timed processes
        arms = tuple(a for a in HOOK_ARMS if a != "native")
        say("    the native hot path cannot be built here (see the warning above; "
            "tests/tools/require.sh names what it needs): no native arm")
    cfg = {"k": args.k, "rounds": args.rounds, "backend": args.hook_backend, "arms": arms}
    say(f"(b) hook cost: {world} {args.hook_backend} ranks, {args.rounds} rounds x "
        f"{len(arms)} arms x {len(HOOK_OPS)} ops, blocks of {args.k} calls (+1 warm-up round)")
    out_dir = Path(tempfile.mkdtemp(prefix="hook-", dir=scratch))
    try:
        t0 = time.perf_counter()
        ctx = mp.start_processes(hook_worker, args=(world, free_port(), cfg, str(out_dir)),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + HOOK_TIMEOUT_S
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hook-cost workers still running after "
                                       f"{HOOK_TIMEOUT_S} s")
        except Exception:
            for f in sorted(out_dir.glob("rank*.log")):
                say(f"--- {f.name} (tail)\n" + f.read_text(errors="replace")[-3000:])
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        elapsed = time.perf_counter() - t0
        ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    k = args.k
    table: dict[str, dict] = {}
    for op in HOOK_OPS:
        row = {}
        for arm in arms:
            blocks = list(zip(*(rk["times_ns"][arm][op] for rk in ranks), strict=True))
            # Wall: the slower rank (the block ends when both are done); CPU: rank average.
            wall = [max(b[0] for b in x) / k / 1e3 for x in blocks]
            cpu = [statistics.fmean(b[1] for b in x) / k / 1e3 for x in blocks]
            main_cpu = [statistics.fmean(b[2] for b in x) / k / 1e3 for x in blocks]
            rank0 = [x[0][0] / k / 1e3 for x in blocks]
            row[arm] = {"us_per_call": statistics.median(wall),
                        "mean_us_per_call": statistics.fmean(wall),
                        "rank0_us_per_call": statistics.median(rank0),
                        "cpu_us_per_call": statistics.median(cpu),
                        "main_thread_cpu_us_per_call": statistics.median(main_cpu),
                        "blocks_us_per_call": wall, "blocks_cpu_us_per_call": cpu,
                        "blocks_main_thread_cpu_us_per_call": main_cpu}
        for arm in arms[1:]:
            # Paired per round (same round, same rotation): median of the differences.
            for key in ("blocks_us_per_call", "blocks_cpu_us_per_call",
                        "blocks_main_thread_cpu_us_per_call"):
                diffs = [a - b for a, b in zip(row[arm][key], row["bare"][key], strict=True)]
                row[arm]["paired_delta_" + key.removeprefix("blocks_")] = statistics.median(diffs)
            row[arm]["paired_delta_us"] = row[arm]["paired_delta_us_per_call"]
        table[op] = row
    # Verification: both ringwatch arms recorded every timed call (the Python hooks as
    # dist.<function>, the native path as "native"); the profiler saw every call.
    rec = ranks[0].get("recorded", {})
    calls = (args.rounds + 1) * k  # timed rounds + warm-up round, per op
    want_rec = {"ringwatch": {"all_reduce/dist.all_reduce": 2 * calls,
                              "broadcast/dist.broadcast": calls,
                              "all_to_all_single/dist.all_to_all_single": calls},
                # On NCCL the native path installs no hook on the calling thread: the NCCL
                # completion hook reports every work.
                "native": {f"{op}/{api}": n for api in [
                    "nccl_hook" if args.hook_backend == "nccl" else "native"]
                    for op, n in (("all_reduce", 2 * calls), ("broadcast", calls),
                                  ("all_to_all_single", calls))}}
    rec_ok = all(rec.get(arm, {}).get(key, 0) >= n
                 for arm, want in want_rec.items() if arm in arms for key, n in want.items())
    prof_ok = all(c.get("c10d::allreduce_", 0) >= 2 * k and c.get("c10d::broadcast_", 0) >= k
                  and c.get("c10d::alltoall_base_", 0) >= k
                  for rk in ranks for c in rk["profiler_counts"])
    return {"config": {"world": world, **cfg}, "ops": table, "wall_s": elapsed,
            "recorded_rank0": rec, "recorded_expected_rank0": want_rec,
            "recorded_ok": rec_ok, "profiler_counts_rank0": ranks[0]["profiler_counts"],
            "profiler_ok": prof_ok}

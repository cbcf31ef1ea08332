"""The local cluster's workload: a small real training job on Gloo (CPU), also used by tests and
benchmarks. Run it under ``torchrun``::

    torchrun --standalone --nproc-per-node 4 -m ringwatch.cluster._job --steps 30

It trains an MLP of ``--layers`` blocks on random data with DDP. With ``--tp T`` > 1 each block
is split Megatron-style over groups of T consecutive ranks ("tensor parallel": a column-parallel
then a row-parallel linear, an all-reduce in the tp group in forward and one in backward) and DDP
runs over the data-parallel groups (ranks with the same tp index), so the job has two levels of
process groups. ``--bucket-cap-mb`` small enough gives DDP several gradient buckets per step.

Hooks for the fault injectors: ``--step-log DIR`` appends ``step<TAB>wall_ns`` to
``DIR/rank-<R>.tsv`` (after a ``pid<TAB>PID`` line) as each step starts (the ground truth's
clock); SIGUSR1 blocks the main thread for good before the rank's next collective (a "never
arrived" hang; the agent's threads go on). ``--extra-work-rank R --extra-work-factor F`` gives
rank R F times the work by design (compute and host-side sleep); SIGUSR2 gives the rank that
receives it ``--slowdown-factor`` times the work from its next step on (a compute straggler
appearing mid-run, as a throttled GPU or a busy host would), for ``--slowdown-steps`` steps
when given (a fault that ends). ``--drift-rank R
--drift-ms-per-step X`` makes rank R's host-side work X ms longer at every step: a slow drift.

``--fr-dump PREFIX`` writes each rank's Flight Recorder to ``PREFIX<rank>`` on a stall or an
error, and ``--fault-in-job MODE:RANKS@STEP`` blocks, kills or desynchronises ranks from inside
at an exact step (see :mod:`ringwatch.cluster._fr_dump`).

``--attach DIR`` calls ``ringwatch.attach(log_dir=DIR)`` in the script (the one-line use)
instead of relying on ``ringwatch run``. ``--profile-dir DIR`` traces every step with
``torch.profiler`` (CPU ops, and CUDA with ``--device cuda``; shapes recorded) and writes
``DIR/rank-<R>.json.gz`` at the end (a Chrome trace, what ``ringwatch analyze`` reads as
profiler traces). Rank 0 prints one JSON line at the end: steps, median
step time and DDP's bucket count.

``--workload decode`` or ``--workload moe`` serves instead of training (see
:mod:`ringwatch.cluster._serving`), under ``torch.no_grad()`` with no optimizer step: ``decode``
is tensor-parallel decoding with continuous batching (two all-reduces per layer per step in the
tp group, their size following the active requests), ``moe`` an expert-parallel MoE stack over
the world (per layer an ``all_to_all_single`` of counts, one dispatching the tokens with split
sizes, one combining them; ``--hot-expert`` skews the routing from ``--hot-from-step``). A step
is one decode iteration, and the hooks above act per step as in training.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time

from ringwatch.cluster import _fr_dump, _serving


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ringwatch.cluster._job",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--workload", choices=_serving.WORKLOADS, default="train",
                   help="train (default), or serve: decode (tp) or moe (expert parallel)")
    p.add_argument("--layers", type=int, default=6, help="linear layers (blocks with --tp)")
    p.add_argument("--width", type=int, default=256, help="features per layer")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--tp", type=int, default=1, help="ranks per tensor-parallel group")
    p.add_argument("--bucket-cap-mb", type=float, default=0.25, help="DDP bucket size, MiB")
    p.add_argument("--attach", metavar="DIR", help="call ringwatch.attach(log_dir=DIR)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--extra-work-rank", type=int, default=-1,
                   help="this rank does --extra-work-factor times the compute, by design")
    p.add_argument("--extra-work-factor", type=float, default=1.0)
    p.add_argument("--slowdown-factor", type=float, default=2.0,
                   help="on SIGUSR2, this rank does this many times the work from then on")
    p.add_argument("--slowdown-steps", type=int, default=0,
                   help="the slowdown lasts this many steps, then the work is as before "
                        "(0: to the end; a fault that ends)")
    p.add_argument("--step-sleep-ms", type=float, default=0.0,
                   help="sleep per step outside collectives (host-side work)")
    p.add_argument("--drift-rank", type=int, default=-1,
                   help="this rank's host-side work grows by --drift-ms-per-step every step")
    p.add_argument("--drift-ms-per-step", type=float, default=0.0,
                   help="a slow drift by design (a data pipeline whose cost grows, a host "
                        "that slowly fills up): not a fault to page on")
    p.add_argument("--step-log", metavar="DIR", help="append step start times to DIR/rank-R.tsv")
    p.add_argument("--result", metavar="FILE", help="rank 0 writes its JSON summary here")
    p.add_argument("--python-hook", action="store_true",
                   help="register PyTorch's Python allreduce comm hook (a cost reference)")
    p.add_argument("--profile-dir", metavar="DIR",
                   help="trace the steps with torch.profiler, DIR/rank-R.json.gz at the end")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (Gloo, the default) or cuda (NCCL, one GPU per rank: LOCAL_RANK)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages (send/recv between them; see cluster/_pipeline.py)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (--pp)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b",
                   help="pipeline schedule (--pp)")
    p.add_argument("--vpp", type=int, default=1,
                   help="model chunks per rank (> 1: an interleaved pipeline, the last stage "
                        "sends on to the first; --pp)")
    p.add_argument("--p2p", choices=("plain", "batched"), default="plain",
                   help="plain: isend and blocking recv; batched: a send goes with the next "
                        "receive in one batch_isend_irecv, as Megatron-LM's (--pp)")
    p.add_argument("--last-stage-factor", type=float, default=1.0,
                   help="the last stage does this many times the compute, by design (--pp)")
    p.add_argument("--vary-seq", type=float, default=1.0,
                   help="micro-batch rows drawn from [batch/S, batch*S] per replica (--pp)")
    p.add_argument("--first-step", type=int, default=None,
                   help="mark steps from this number (ringwatch.mark_step), as a job resumed "
                        "from a checkpoint numbers them")
    p.add_argument("--no-optimizer", action="store_true",
                   help="update the weights by hand: no optimizer step, no step marks")
    _fr_dump.add_args(p)
    _serving.add_args(p)
    return p.parse_args(argv)


#: How soon a hang that landed inside ringwatch's own code is tried again.
HANG_RETRY_S = 0.005


def _in_ringwatch_agent(frame) -> bool:
    """Whether ``frame`` or a caller of it runs the agent's capture code (a hook)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("ringwatch.agent."):
            return True
        frame = frame.f_back
    return False


def _block_forever(signum, frame) -> None:
    """SIGUSR1: hang this rank's main thread for good (the fault injector's hang), as a rank
    stuck in its own code would (its data loader, a deadlock of its own). A signal that lands
    while the main thread runs one of ringwatch's hooks is sent again a moment later: a hook
    frozen midway holds the recorder, and the rank's flushes could then write only their
    heartbeat, which is another fault (a debugger's breakpoint inside a hook)."""
    if _in_ringwatch_agent(frame):
        threading.Timer(HANG_RETRY_S, os.kill, (os.getpid(), signum)).start()
        return
    threading.Event().wait()


def _tp_blocks(args, tp_group, tp_size: int, n_blocks: int | None = None):
    """Megatron-style blocks (``--layers`` of them, or ``n_blocks``): column-parallel linear,
    ReLU, row-parallel linear."""
    import torch
    import torch.distributed as dist

    class ReduceInBackward(torch.autograd.Function):  # identity forward, all-reduce backward
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()
            dist.all_reduce(grad, group=tp_group)
            return grad

    class ReduceInForward(torch.autograd.Function):  # all-reduce forward, identity backward
        @staticmethod
        def forward(ctx, x):
            x = x.contiguous()
            dist.all_reduce(x, group=tp_group)
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            hidden = 2 * args.width // tp_size
            self.up = torch.nn.Linear(args.width, hidden)
            self.down = torch.nn.Linear(hidden, args.width, bias=False)

        def forward(self, x):
            h = torch.relu(self.up(ReduceInBackward.apply(x)))
            return ReduceInForward.apply(self.down(h))

    return torch.nn.Sequential(*[Block() for _ in range(n_blocks or args.layers)])


_SLOW = threading.Event()


def _slow_down(signum, frame) -> None:
    """SIGUSR2: from the next step on, this rank does ``--slowdown-factor`` times the work."""
    _SLOW.set()


def _extra_work(args, factor: float, device="cpu"):
    """More compute by design for one rank: forward and backward of a local MLP like the plain
    model's, on ``(factor - 1) * batch`` samples, with no collective (the step's collectives stay
    the same on every rank)."""
    import torch

    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    local = torch.nn.Sequential(*layers).to(device)

    def run(batch: int | None = None) -> None:  # batch: a micro-batch's rows
        rows = max(1, round((factor - 1) * (batch or args.batch)))
        local(torch.randn(rows, args.width, device=device)).square().mean().backward()
        local.zero_grad(set_to_none=True)

    return run


def _groups(world: int, tp: int):
    """Create every tp group (consecutive ranks) and dp group (same tp index), on all ranks in
    the same order; return this rank's (tp group, dp group)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    mine_tp = mine_dp = None
    for d in range(world // tp):
        g = dist.new_group(list(range(d * tp, (d + 1) * tp)), group_desc=f"tp{d}")
        if rank // tp == d:
            mine_tp = g
    for t in range(tp):
        g = dist.new_group(list(range(t, world, tp)), group_desc=f"dp{t}")
        if rank % tp == t:
            mine_dp = g
    return mine_tp, mine_dp


def main(argv=None) -> int:
    args = parse_args(argv)
    _fr_dump.guard_sigterm(args)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if args.attach:
        import ringwatch

        ringwatch.attach(log_dir=args.attach)
    signal.signal(signal.SIGUSR1, _block_forever)
    signal.signal(signal.SIGUSR2, _slow_down)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide world size {world}")
    if args.workload != "train":
        return _serving.run(args, device, groups_fn=_groups, slow=_SLOW)
    pipe = None
    if args.pp > 1:
        from ringwatch.cluster import _pipeline

        lay = _pipeline.check(world, args.tp, args.pp)
        tp_group, dp_group = _pipeline.make_groups(lay)
        pipe = _pipeline.PipelineStep(args, lay, tp_group, dp_group, _tp_blocks, device)
        model, data_seed = pipe.model, rank
    elif args.tp > 1:
        tp_group, dp_group = _groups(world, args.tp)
        torch.manual_seed(rank % args.tp)  # a tp shard is the same on all its dp replicas
        model = DDP(_tp_blocks(args, tp_group, args.tp).to(device), process_group=dp_group,
                    bucket_cap_mb=args.bucket_cap_mb)
        data_seed = rank // args.tp  # the members of a tp group see the same samples
    else:
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
        model = DDP(torch.nn.Sequential(*layers).to(device), bucket_cap_mb=args.bucket_cap_mb)
        data_seed = rank
    if args.python_hook and pipe is None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(data_seed)
    extra = None
    sleep_s = args.step_sleep_ms / 1e3
    if rank == args.extra_work_rank and args.extra_work_factor > 1:
        extra = _extra_work(args, args.extra_work_factor, device)
        sleep_s *= args.extra_work_factor  # its host-side work grows alike
    if pipe is not None and pipe.lay.last and args.last_stage_factor > 1:  # by design
        more = _extra_work(args, args.last_stage_factor, device)
        extra = more if extra is None else (lambda b=None, a=extra, c=more: (a(b), c(b)))
        sleep_s *= args.last_stage_factor
    marker = None
    if args.first_step is not None:
        import ringwatch

        marker = ringwatch.mark_step  # a no-op when ringwatch is not attached
    slowed, restore_at = False, None
    marks = None
    if args.step_log:
        os.makedirs(args.step_log, exist_ok=True)
        marks = open(os.path.join(args.step_log, f"rank-{rank}.tsv"), "a", buffering=1)
        marks.write(f"pid\t{os.getpid()}\n")
    step_s = []
    faults = _fr_dump.parse_in_job_faults(args.fault_in_job)
    dumper = _fr_dump.start(args, rank)
    prof = None
    if args.profile_dir:
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                         else [])
        # a schedule (always recording) is what makes the profiler mark ProfilerStep#N
        prof = profile(activities=acts, record_shapes=True,
                       schedule=lambda _step: ProfilerAction.RECORD)
        prof.start()
    for step in range(args.steps):
        if marks is not None:
            marks.write(f"{step}\t{time.time_ns()}\n")
        fault = _fr_dump.at_step_start(step, rank, faults, dumper, args.bcast_per_step)
        if _SLOW.is_set() and not slowed and args.slowdown_factor > 1:
            slowed = True
            if marks is not None:  # the first step that runs slowed: the fault's effect
                marks.write(f"slowed\t{step}\n")
            more = _extra_work(args, args.slowdown_factor, device)
            if args.slowdown_steps > 0:
                restore_at, before = step + args.slowdown_steps, (extra, sleep_s)
            extra = more if extra is None else (lambda b=None, a=extra, c=more: (a(b), c(b)))
            sleep_s *= args.slowdown_factor
        if restore_at is not None and step >= restore_at:  # the fault ends
            extra, sleep_s = before
            restore_at = None
            if marks is not None:
                marks.write(f"restored\t{step}\n")
        if marker is not None:
            marker(args.first_step + step)
        t0 = time.perf_counter()
        if pipe is not None:  # the extra work goes into every micro-batch's forward
            pipe.extra, pipe.sleep_s = extra, sleep_s
            pipe.step(step)
        else:
            if extra is not None:
                extra()  # before the forward: this step's gradient buckets go out late
            x = torch.randn(args.batch, args.width, generator=gen).to(device)
            loss = model(x).square().mean()
            loss.backward()
            _fr_dump.after_backward(step, fault, faults, loss)
        if args.no_optimizer:  # by hand: nothing ringwatch counts as a step
            with torch.no_grad():
                for prm in model.parameters():
                    if prm.grad is not None:
                        prm.add_(prm.grad, alpha=-0.01)
                        prm.grad = None
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if sleep_s and pipe is None:  # a pipeline spends it in its micro-batches
            time.sleep(sleep_s)
        if rank == args.drift_rank and args.drift_ms_per_step > 0:
            time.sleep(args.drift_ms_per_step * step / 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a step's time is the GPU's, not its launch's
        step_s.append(time.perf_counter() - t0)
        if prof is not None:
            prof.step()  # the spans ProfilerStep#<step>
    if prof is not None:
        prof.stop()
        os.makedirs(args.profile_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.profile_dir, f"rank-{rank}.json.gz"))
    _fr_dump.finish(dumper)
    if marks is not None:
        marks.write(f"{args.steps}\t{time.time_ns()}\n")
        marks.close()
    info = {} if pipe is not None else model._get_ddp_logging_data()  # refreshed at
    # sampled iterations (10, 20, ...)

    def count(sizes) -> int:
        return len([s for s in str(sizes or "").split(",") if s.strip()])

    first = count(info.get("bucket_sizes"))
    buckets = count(info.get("rebuilt_bucket_sizes")) or first
    if rank == 0:
        out = {"world_size": world, "steps": args.steps, "tp": args.tp, "pp": args.pp,
               "buckets": buckets,
               "buckets_first_step": first,
               "median_step_s": statistics.median(step_s[1:] or step_s), "pid": os.getpid()}
        from ringwatch.cluster._serving import write_result

        write_result(args, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

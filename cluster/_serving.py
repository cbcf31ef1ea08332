"""The local cluster's serving workloads (``--workload decode`` and ``--workload moe``): an
inference server's collectives on Gloo, dispatched from :func:`ringwatch.cluster._job.main`.

Both run under ``torch.no_grad()`` and take no optimizer step, so ringwatch's automatic step
counter never moves (the ``step`` column keeps its start value, 0, as in a real inference
server) unless ``--first-step N`` marks iteration ``i`` as ``N + i`` (``ringwatch.mark_step``).
A "step" is one decode iteration, and the job's fault hooks work per step as in training: the
``--step-log`` line at each step start, SIGUSR2 (the rank does ``--slowdown-factor`` times its
compute and host idle time from its next step on and writes ``slowed<TAB>step``),
``--extra-work-rank``/``--extra-work-factor``, SIGUSR1 (set up by ``_job.main``), and the Flight
Recorder options. ``--step-sleep-ms`` is host idle time per step, as while a GPU computes,
spent inside the step between its collectives.

``decode``: tensor-parallel decoding of a small transformer (Megatron inference). The tp groups
are ``--tp`` consecutive ranks; the data-parallel replicas are independent servers with no
collective between them (with ``--tp 1`` every rank serves alone: no collective at all).
Each of ``--layers`` layers does, per step, a column-parallel then row-parallel "attention"
projection and an ``all_reduce`` in the tp group, then a column/row-parallel MLP and a second
``all_reduce``: two all-reduces of shape ``(active, --width)`` float32 per layer per step, and
nothing else (no sampling collective).
Continuous batching: requests arrive (0 to 2 a step) and finish (after 4 to 24 tokens), so the
active count moves step by step between 1 and ``--batch``; the draw is seeded per replica, so
the members of a tp group agree. The idle time (``--step-sleep-ms``) is spent in equal parts
before the ``2 * layers`` all-reduces, whatever the batch (a memory-bound decode step).

``moe``: an expert-parallel MoE stack over the whole world. Each rank hosts
``--experts-per-rank`` experts (expert ``e`` on rank ``e // experts_per_rank``) and has about
``--batch`` tokens per step (within 1/8 of it, drawn per rank and step). Each of ``--layers``
layers routes every token to one expert (a seeded draw standing in for a learned top-1 gate,
so that the skew is exact), exchanges the per-expert counts with ``all_to_all_single`` (int64,
one count per expert), dispatches the tokens with ``all_to_all_single`` and split sizes, runs
each local expert's MLP on the tokens it received and sends the results back with a second
``all_to_all_single`` (the dispatch's splits swapped): three all-to-alls per layer per step.
Compute and idle time (``--step-sleep-ms / layers`` per layer for ``--batch`` tokens received)
are proportional to the tokens a rank received, so a hot expert makes its rank slow and the
others wait for it in the combine. Skew: ``--hot-expert E --hot-share S --hot-from-step N``
sends a share S of every rank's tokens to expert E from step N on (the rest uniform over all
experts), and writes ``hot<TAB>N`` in the step log at that step (the ground truth).

Rank 0 prints one JSON line at the end, as the training loop does, with ``"workload"`` added.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time

from ringwatch.cluster import _fr_dump

WORKLOADS = ("train", "decode", "moe")
MIN_REQUEST_TOKENS, MAX_REQUEST_TOKENS = 4, 24  # a request's decode length, tokens
MAX_ARRIVALS_PER_STEP = 2


def add_args(p) -> None:
    """The serving workloads' own options (``--workload`` itself is the job's)."""
    p.add_argument("--experts-per-rank", type=int, default=1, help="experts per rank (moe)")
    p.add_argument("--hot-expert", type=int, default=None,
                   help="send --hot-share of every rank's tokens to this expert (moe)")
    p.add_argument("--hot-share", type=float, default=0.5,
                   help="share of the tokens the hot expert gets, 0..1 (moe)")
    p.add_argument("--hot-from-step", type=int, default=0,
                   help="first step routed to the hot expert (moe)")


def check(args, world: int) -> None:
    """Refuse options the serving workloads cannot honour (one-line SystemExit)."""
    if args.pp > 1 or args.profile_dir or args.python_hook:
        raise SystemExit(f"--workload {args.workload}: --pp, --profile-dir and --python-hook "
                         "are for the training workload")
    if args.workload == "decode" and args.width % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide --width {args.width}")
    if args.workload == "moe":
        experts = world * args.experts_per_rank
        if args.experts_per_rank < 1:
            raise SystemExit("--experts-per-rank must be at least 1")
        if args.hot_expert is not None and not 0 <= args.hot_expert < experts:
            raise SystemExit(f"--hot-expert {args.hot_expert}: the job has {experts} experts")
        if not 0 <= args.hot_share <= 1:
            raise SystemExit(f"--hot-share {args.hot_share}: expected 0..1")


class Batcher:
    """Continuous batching: the active requests of one replica, step by step.

    Args:
        max_batch: Most requests decoded at once (``--batch``).
        seed: The replica's seed (the same on every member of its tp group).
    """

    def __init__(self, max_batch: int, seed: int):
        self.max_batch = max_batch
        self.rng = random.Random(seed)
        self.left = [self.rng.randint(MIN_REQUEST_TOKENS, MAX_REQUEST_TOKENS)
                     for _ in range(max(1, max_batch // 2))]

    def next_batch(self) -> int:
        """Admit this step's arrivals, return the active count (1..max_batch), then advance
        every active request by one token and retire the finished ones."""
        for _ in range(self.rng.randint(0, MAX_ARRIVALS_PER_STEP)):
            if len(self.left) < self.max_batch:
                self.left.append(self.rng.randint(MIN_REQUEST_TOKENS, MAX_REQUEST_TOKENS))
        if not self.left:  # an idle server takes the next request at once
            self.left.append(self.rng.randint(MIN_REQUEST_TOKENS, MAX_REQUEST_TOKENS))
        active = len(self.left)
        self.left = [n - 1 for n in self.left if n > 1]
        return active


def _extra_rows(rows: int, factor: float) -> int:
    """Rows of extra compute that make ``rows`` rows' compute ``factor`` times as long."""
    return 0 if factor <= 1 else max(1, round((factor - 1) * rows))


class DecodeStep:
    """One tensor-parallel decode iteration of this rank's shards (see module docstring)."""

    def __init__(self, args, tp_group, tp: int, rank: int, device):
        import torch

        self.args, self.group, self.device = args, tp_group, device
        torch.manual_seed(rank % tp)  # a shard is the same on every replica
        w = args.width

        def pair(hidden: int):
            return (torch.nn.Linear(w, hidden // tp).to(device),
                    torch.nn.Linear(hidden // tp, w, bias=False).to(device))

        self.layers = [(pair(w), pair(2 * w)) for _ in range(args.layers)]
        self.batcher = Batcher(args.batch, seed=rank // tp)
        self.replica = rank // tp

    def step(self, n: int, factor: float, sleep_s: float):
        """Decode one token for every active request; returns the output and its batch."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        w = self.args.width
        rows = self.batcher.next_batch()
        g = torch.Generator().manual_seed(n * 1_000_003 + self.replica)
        x = torch.randn(rows, w, generator=g).to(self.device)  # this step's token embeddings
        pause = sleep_s / (2 * len(self.layers))
        extra = _extra_rows(rows, factor)
        for block in self.layers:
            for col, row in block:  # attention projection, then MLP
                h = F.layer_norm(x, (w,))
                y = row(torch.relu(col(h)))
                if extra:
                    row(torch.relu(col(h[:1].expand(extra, w))))
                if pause:
                    time.sleep(pause)
                if self.group is not None:
                    dist.all_reduce(y, group=self.group)
                x = x + y
        return x, rows


class MoeStep:
    """One step of the expert-parallel MoE stack on this rank (see module docstring)."""

    def __init__(self, args, rank: int, world: int, device):
        import torch

        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.per_rank = args.experts_per_rank
        self.experts = world * self.per_rank
        w = args.width
        self.local = []
        for j in range(self.per_rank):
            torch.manual_seed(10_000 + rank * self.per_rank + j)  # one seed per expert
            self.local.append([(torch.nn.Linear(w, 2 * w).to(device),
                                torch.nn.Linear(2 * w, w, bias=False).to(device))
                               for _ in range(args.layers)])

    def hot(self, n: int) -> bool:
        return self.args.hot_expert is not None and n >= self.args.hot_from_step

    def _route(self, n: int, layer: int, rows: int):
        """Each token's expert: a seeded draw, a share to the hot expert when it is on."""
        import torch

        g = torch.Generator().manual_seed((n * 1009 + layer) * 1_000_003 + self.rank)
        dest = torch.randint(0, self.experts, (rows,), generator=g)
        if self.hot(n):
            to_hot = torch.rand(rows, generator=g) < self.args.hot_share
            dest = torch.where(to_hot, torch.full_like(dest, self.args.hot_expert), dest)
        return dest

    def step(self, n: int, factor: float, sleep_s: float):
        """Route, dispatch, compute and combine every layer; returns the output and its
        token count."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        args, w, per = self.args, self.args.width, self.per_rank
        spread = max(1, args.batch // 8)
        rows = random.Random(n * 1_000_003 + self.rank).randint(
            max(1, args.batch - spread), args.batch + spread)
        g = torch.Generator().manual_seed(n * 1_000_003 + self.rank)
        x = torch.randn(rows, w, generator=g).to(self.device)
        for layer in range(args.layers):
            h = F.layer_norm(x, (w,))
            dest = self._route(n, layer, rows)
            order = torch.argsort(dest, stable=True)  # grouped by expert, so by rank
            counts = torch.bincount(dest, minlength=self.experts).to(torch.int64)
            got = torch.empty(self.experts, dtype=torch.int64, device=self.device)
            dist.all_to_all_single(got, counts.to(self.device))
            got = got.cpu()  # got[src * per + j]: tokens from src for local expert j
            send = counts.view(self.world, per).sum(1).tolist()
            recv = got.view(self.world, per).sum(1).tolist()
            tokens = torch.empty(sum(recv), w, device=self.device)
            dist.all_to_all_single(tokens, h[order.to(self.device)].contiguous(),
                                   output_split_sizes=recv, input_split_sizes=send)
            which = torch.repeat_interleave(torch.arange(per).repeat(self.world), got)
            out = torch.empty_like(tokens)
            for j in range(per):
                mine = (which == j).to(self.device)
                up, down = self.local[j][layer]
                out[mine] = down(torch.relu(up(tokens[mine])))
            extra = _extra_rows(len(tokens), factor)
            if extra:
                up, down = self.local[0][layer]
                down(torch.relu(up(torch.zeros(extra, w, device=self.device))))
            if sleep_s:  # a GPU's expert time grows with the tokens it got
                time.sleep(sleep_s / args.layers * len(tokens) / args.batch)
            back = torch.empty(rows, w, device=self.device)
            dist.all_to_all_single(back, out, output_split_sizes=send,
                                   input_split_sizes=recv)
            y = torch.empty_like(back)
            y[order.to(self.device)] = back
            x = x + y
        return x, rows


def run(args, device, *, groups_fn, slow: threading.Event) -> int:
    """Serve ``--steps`` steps of ``args.workload`` on the initialised default group.

    Args:
        args: The job's parsed arguments.
        device: Where tensors live (CPU for Gloo).
        groups_fn: ``_job._groups``: every tp and dp group, this rank's pair.
        slow: The job's SIGUSR2 flag (``_job._SLOW``; passed in, as ``_job`` runs as
            ``__main__`` and an import would make a second one).

    Returns:
        0 (the process exit status).
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    check(args, world)
    if args.workload == "decode":
        tp_group = groups_fn(world, args.tp)[0] if args.tp > 1 else None
        model = DecodeStep(args, tp_group, args.tp, rank, device)
    else:
        model = MoeStep(args, rank, world, device)
    factor, sleep_s = 1.0, args.step_sleep_ms / 1e3
    if rank == args.extra_work_rank and args.extra_work_factor > 1:
        factor *= args.extra_work_factor
        sleep_s *= args.extra_work_factor
    marker = None
    if args.first_step is not None:
        import ringwatch

        marker = ringwatch.mark_step  # a no-op when ringwatch is not attached
    marks = None
    if args.step_log:
        os.makedirs(args.step_log, exist_ok=True)
        marks = open(os.path.join(args.step_log, f"rank-{rank}.tsv"), "a", buffering=1)
        marks.write(f"pid\t{os.getpid()}\n")
    faults = _fr_dump.parse_in_job_faults(args.fault_in_job)
    dumper = _fr_dump.start(args, rank)
    slowed, hot_seen, step_s, batches = False, False, [], []
    with torch.no_grad():
        for step in range(args.steps):
            if marks is not None:
                marks.write(f"{step}\t{time.time_ns()}\n")
                if args.workload == "moe" and model.hot(step) and not hot_seen:
                    hot_seen = True  # the first step routed to the hot expert
                    marks.write(f"hot\t{step}\n")
            fault = _fr_dump.at_step_start(step, rank, faults, dumper, args.bcast_per_step)
            if slow.is_set() and not slowed and args.slowdown_factor > 1:
                slowed = True
                if marks is not None:  # the first step that runs slowed: the fault's effect
                    marks.write(f"slowed\t{step}\n")
                factor *= args.slowdown_factor
                sleep_s *= args.slowdown_factor
            if marker is not None:
                marker(args.first_step + step)
            t0 = time.perf_counter()
            out, rows = model.step(step, factor, sleep_s)
            _fr_dump.after_backward(step, fault, faults, out.sum())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s.append(time.perf_counter() - t0)
            batches.append(rows)
    _fr_dump.finish(dumper)
    if marks is not None:
        marks.write(f"{args.steps}\t{time.time_ns()}\n")
        marks.close()
    if rank == 0:
        res = {"workload": args.workload, "world_size": world, "steps": args.steps,
               "tp": args.tp, "layers": args.layers,
               "median_step_s": statistics.median(step_s[1:] or step_s),
               "mean_batch": statistics.fmean(batches), "pid": os.getpid()}
        if args.workload == "moe":
            res["experts"] = model.experts
        write_result(args, res)
    dist.destroy_process_group()
    return 0


def write_result(args, result: dict) -> None:
    """Rank 0's result: one JSON line on stdout, and in ``--result`` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if args.result:
        with open(args.result, "w") as f:
            f.write(line + "\n")

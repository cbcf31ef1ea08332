"""The local cluster's hybrid-parallel workload: data x tensor x pipeline parallel on Gloo.

Ranks are laid out as Megatron lays them out by default, tensor-parallel index fastest, then
data-parallel, then pipeline stage: ``rank = stage * (dp * tp) + replica * tp + tp_index``.
Each stage holds ``--layers / pp`` blocks (Megatron-style tensor-parallel blocks when tp > 1,
their all-reduces in the tp group); activations go forward and gradients back over
``send``/``recv`` between the ranks of consecutive stages with the same replica and tp index
(sends asynchronous, receives blocking); after the pipeline, each stage's gradients are
all-reduced over its data-parallel group (one flat buffer), then the SGD update.

Schedules (``--schedule``): ``gpipe`` (every micro-batch forward, then every one backward) or
``1f1b`` (after ``pp - stage - 1`` warm-up forwards, one forward then one backward).
``--vpp V`` > 1 gives each rank V model chunks, virtual stage ``chunk * pp + stage`` (as
Megatron-LM's interleaved schedule places them): the last stage sends on to the first, so the
send/recv pairs form a ring, and the schedule is breadth-first (each chunk's forwards in turn,
then the backwards in reverse). ``--p2p batched`` sends as Megatron-LM does by default: a send
goes with the next receive in one ``batch_isend_irecv`` (see :class:`_P2P`).

``--step-sleep-ms`` is spent in the micro-batches (a third in each forward, two thirds in each
backward), as a GPU's compute keeps the host idle. Workloads with imbalance by design:
``--last-stage-factor F`` gives the last stage F times the compute and the idle time of the
others (the loss and the embedding's output layer); ``--vary-seq S`` draws the micro-batches'
rows from ``[batch/S, batch*S]`` per replica and step (sequence lengths that vary), the same on
every stage and tp peer of a replica, different between replicas: who comes last moves from
replica to replica, step to step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """One rank's place in a dp x tp x pp job."""

    rank: int
    world: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def stage(self) -> int:
        return self.rank // (self.dp * self.tp)

    @property
    def replica(self) -> int:
        return self.rank % (self.dp * self.tp) // self.tp

    @property
    def tp_index(self) -> int:
        return self.rank % self.tp

    def at(self, stage: int) -> int:
        """The rank at ``stage`` with this rank's replica and tp index."""
        return stage * self.dp * self.tp + self.replica * self.tp + self.tp_index

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1


def check(world: int, tp: int, pp: int) -> Layout:
    """This rank's layout; SystemExit when tp x pp does not divide the world."""
    import torch.distributed as dist

    if world % (tp * pp):
        raise SystemExit(f"--tp {tp} x --pp {pp} does not divide world size {world}")
    return Layout(dist.get_rank(), world, tp, pp)


def make_groups(lay: Layout):
    """Every tp group and every dp group, created on all ranks in the same order; this
    rank's ``(tp group or None, dp group or None)``."""
    import torch.distributed as dist

    mine_tp = mine_dp = None
    per_stage = lay.dp * lay.tp
    if lay.tp > 1:
        for s in range(lay.pp):
            for d in range(lay.dp):
                first = s * per_stage + d * lay.tp
                g = dist.new_group(list(range(first, first + lay.tp)),
                                   group_desc=f"tp-s{s}-d{d}")
                if (lay.stage, lay.replica) == (s, d):
                    mine_tp = g
    if lay.dp > 1:
        for s in range(lay.pp):
            for t in range(lay.tp):
                members = [s * per_stage + d * lay.tp + t for d in range(lay.dp)]
                g = dist.new_group(members, group_desc=f"dp-s{s}-t{t}")
                if (lay.stage, lay.tp_index) == (s, t):
                    mine_dp = g
    return mine_tp, mine_dp


class PipelineStep:
    """One training step of this rank's stage: ``step(n)`` runs the schedule, the gradient
    all-reduce and the update. ``extra(rows)`` (or None) is more compute per micro-batch of
    ``rows`` samples (a fault or a heavier stage)."""

    def __init__(self, args, lay: Layout, tp_group, dp_group, blocks_fn, device):
        import torch

        self.args, self.lay, self.dp_group, self.device = args, lay, dp_group, device
        self.chunks = max(1, int(getattr(args, "vpp", 1)))
        per = max(1, args.layers // (lay.pp * self.chunks))
        parts = []
        for c in range(self.chunks):  # a shard is the same on replicas
            torch.manual_seed(1000 * (c * lay.pp + lay.stage) + lay.tp_index)
            if lay.tp > 1:
                parts.append(blocks_fn(args, tp_group, lay.tp, per).to(device))
            else:
                layers = []
                for _ in range(per):
                    layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
                parts.append(torch.nn.Sequential(*layers).to(device))
        self.parts = parts
        self.model = parts[0] if len(parts) == 1 else torch.nn.ModuleList(parts)
        self.params = [p for p in self.model.parameters()]
        self.extra = None
        #: Host-side time per step (s), as a GPU's compute keeps the host idle: spread over
        #: the micro-batches, a third in each forward, two thirds in each backward.
        self.sleep_s = 0.0

    def _rows(self, step: int, m: int) -> int:
        spread = self.args.vary_seq
        if spread <= 1:
            return self.args.batch
        # one draw per replica and step: a replica's whole batch is long or short that step
        rng = random.Random(step * 1_000_003 + self.lay.replica)
        lo, hi = max(1, round(self.args.batch / spread)), round(self.args.batch * spread)
        return rng.randint(lo, hi)

    def _neighbours(self, chunk: int) -> tuple[int | None, int | None]:
        """The ranks before and after this rank's ``chunk`` (virtual stage ``chunk * pp +
        stage``): None at either end of the whole model."""
        lay, v = self.lay, chunk * self.lay.pp + self.lay.stage
        last = self.chunks * lay.pp - 1
        return (None if v == 0 else lay.at((v - 1) % lay.pp),
                None if v == last else lay.at((v + 1) % lay.pp))

    def step(self, n: int) -> None:
        import torch
        import torch.distributed as dist

        lay, args, chunks = self.lay, self.args, self.chunks
        mbs = args.micro_batches
        inputs, outputs = {}, {}
        sizes = [args.batch] * mbs
        p2p = _P2P(getattr(args, "p2p", "plain") == "batched")

        def forward(m: int, c: int = 0) -> None:
            prev, nxt = self._neighbours(c)
            rows = self._rows(n, m) if c == 0 else sizes[m]
            if prev is None:
                g = torch.Generator().manual_seed(n * 1_000_003 + m * 1009 + lay.replica)
                x = torch.randn(rows, args.width, generator=g).to(self.device)
            else:
                x = torch.empty(rows, args.width, device=self.device)
                p2p.recv(x, prev)
                x.requires_grad_()
            if self.extra is not None and c == 0:  # once per micro-batch, whatever the chunks
                self.extra(rows)
            if self.sleep_s:  # the idle time grows with the micro-batch's rows
                time.sleep(self.sleep_s * rows / args.batch / (3 * mbs * chunks))
            y = self.parts[c](x)
            if nxt is not None:
                p2p.send(y.detach().contiguous(), nxt)
            inputs[m, c], outputs[m, c] = x, y.square().mean() if nxt is None else y
            sizes[m] = rows

        def backward(m: int, c: int = 0) -> None:
            prev, nxt = self._neighbours(c)
            y = outputs[m, c]
            if self.sleep_s:
                time.sleep(2 * self.sleep_s * sizes[m] / args.batch / (3 * mbs * chunks))
            if nxt is None:
                y.backward()
            else:
                grad = torch.empty_like(y)
                p2p.recv(grad, nxt)
                y.backward(grad)
            if prev is not None:
                p2p.send(inputs[m, c].grad.contiguous(), prev)
            inputs[m, c] = outputs[m, c] = None

        if chunks > 1:  # interleaved, breadth-first: each chunk's forwards, then backwards
            for c in range(chunks):
                for m in range(mbs):
                    forward(m, c)
            for c in reversed(range(chunks)):
                for m in range(mbs):
                    backward(m, c)
        elif args.schedule == "gpipe":
            for m in range(mbs):
                forward(m)
            for m in range(mbs):
                backward(m)
        else:  # 1F1B: warm-up forwards, then one forward one backward, then the rest
            warm = min(mbs, lay.pp - lay.stage - 1)
            for m in range(warm):
                forward(m)
            for m in range(warm, mbs):
                forward(m)
                backward(m - warm)
            for m in range(mbs - warm, mbs):
                backward(m)
        p2p.finish()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.dp_group is not None and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= lay.dp
            at = 0
            for g in grads:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class _P2P:
    """A step's sends and receives. Plain: sends asynchronous (``isend``, waited at the end of
    the step), receives blocking; with blocking sends two neighbours that both send first
    (1F1B's steady state) would wait for each other for good. Batched (``--p2p batched``, as
    Megatron-LM's default): every op goes through ``batch_isend_irecv``; a send is held, and
    when the next receive is from the rank it goes to, the two go in one batch (Megatron's
    ``send_forward_recv_backward`` and ``send_backward_recv_forward``), else it goes alone.
    A receive is waited for at once, a send at the end of the step: Megatron waits for the
    batch's sends too, which with this testbed's breadth-first interleaving and two stages
    would have both neighbours wait for each other for good."""

    def __init__(self, batched: bool):
        self.batched, self.held, self.sent = batched, None, []

    def send(self, t, dst: int) -> None:
        import torch.distributed as dist

        if not self.batched:
            self.sent.append((dist.isend(t, dst=dst), t))
            return
        self._release()
        self.held = (t, dst)

    def recv(self, t, src: int) -> None:
        import torch.distributed as dist

        if not self.batched:
            dist.recv(t, src=src)
            return
        ops = []
        if self.held is not None and self.held[1] == src:
            ops.append(dist.P2POp(dist.isend, *self.held))
            self.held = None
        self._release()
        ops.append(dist.P2POp(dist.irecv, t, src))
        works = dist.batch_isend_irecv(ops)
        works[-1].wait()  # the data; a send goes on, waited at the end of the step
        self.sent.extend((w, t) for w in works[:-1])

    def _release(self) -> None:
        import torch.distributed as dist

        if self.held is not None:
            t, dst = self.held
            self.held = None
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, dst)]):
                self.sent.append((work, t))

    def finish(self) -> None:
        """The step's last send goes; every send of the step has completed."""
        self._release()
        for work, _ in self.sent:
            work.wait()
        self.sent.clear()

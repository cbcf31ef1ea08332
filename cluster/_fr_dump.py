"""The workload's Flight Recorder dumps and its in-job faults (``ringwatch.cluster._job``).

PyTorch dumps its Flight Recorder on a timeout only for NCCL (``TORCH_NCCL_DUMP_ON_TIMEOUT``);
a Gloo job gets the same here: :class:`FrDumper` writes the rank's recorder to
``prefix + rank`` (PyTorch's own naming, as ``TORCH_FR_DUMP_TEMP_FILE``), a pickle
(``_dump_fr_trace``) or JSON (``_dump_fr_trace_json``), from a watchdog thread when no step has
started for ``after_s`` seconds (then ends the rank ``after_s`` later, as NCCL's watchdog tears a
job down after its dump), when an exception is about to end the rank (a collective that
failed because a peer is gone), or when the launcher ends the rank with SIGTERM (``torchrun``
tears the other ranks down as soon as one dies, often before their own collective fails: the
signal is blocked in every thread from the start, :func:`guard_sigterm`, and taken by the
dumper's thread).

In-job faults (``--fault-in-job MODE:RANKS@STEP``) make ranks misbehave at the start of a step,
from inside the process, at an exact step: ``block`` (the main thread blocks for good before
its next collective, as a stuck data loader would), ``kill`` (SIGKILL itself, as a crash or the
OOM killer would), ``mismatch`` (that step every rank all-reduces its loss, these ranks call
broadcast instead: a desynchronised collective), ``cut`` (every packet entering the rank's
emulated host is dropped from then on, with nftables in the host's network namespace: with
``--bcast-per-step`` the rank is cut inside that step's broadcast, which its peers finish; a
leaf of Gloo's broadcast tree, e.g. rank 1 or 3 of 4 with root 0, so that no peer relays
through it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

IN_JOB_FAULTS = ("block", "kill", "mismatch", "cut")
CUT_TABLE = "ringwatch_cut"


def add_args(p) -> None:
    """The workload's options for dumps and in-job faults."""
    p.add_argument("--fr-dump", metavar="PREFIX",
                   help="dump the Flight Recorder to PREFIX<rank> on a stall or an error")
    p.add_argument("--fr-json", action="store_true", help="dump JSON instead of a pickle")
    p.add_argument("--fr-dump-after-s", type=float, default=5.0,
                   help="a stall this long (no step started) dumps; as long again ends the rank")
    p.add_argument("--fr-dump-at-s", type=float, default=None,
                   help="also dump once this long after the start, the job going on (an "
                        "on-demand dump of a running job)")
    p.add_argument("--fault-in-job", action="append", default=[], metavar="MODE:RANKS@STEP",
                   help=f"one of {', '.join(IN_JOB_FAULTS)} for these ranks (a comma list) "
                        "at the start of that step (repeatable)")
    p.add_argument("--bcast-per-step", action="store_true",
                   help="broadcast a flag from rank 0 at the start of every step")


def parse_in_job_faults(specs: list[str]) -> dict[int, dict[int, str]]:
    """``["block:1,2@8"]`` -> ``{8: {1: "block", 2: "block"}}`` (step -> rank -> mode).

    Raises:
        ValueError: a spec is not ``MODE:RANKS@STEP`` with a known mode.
    """
    out: dict[int, dict[int, str]] = {}
    for spec in specs:
        mode, _, rest = spec.partition(":")
        ranks, _, step = rest.partition("@")
        try:
            rs = [int(r) for r in ranks.split(",")]
        except ValueError:
            rs = []
        if mode not in IN_JOB_FAULTS or not rs or not step.isdigit():
            raise ValueError(f"--fault-in-job {spec!r}: expected MODE:RANKS@STEP with MODE one "
                             f"of {', '.join(IN_JOB_FAULTS)}")
        for r in rs:
            out.setdefault(int(step), {})[r] = mode
    return out


class FrDumper:
    """This rank's Flight Recorder written once to ``prefix + rank`` (see module docstring)."""

    def __init__(self, prefix: str, rank: int, *, as_json: bool, after_s: float,
                 at_s: float | None = None):
        self.path = f"{prefix}{rank}"
        self.as_json, self.after_s, self.at_s = as_json, after_s, at_s
        self.progress = time.monotonic()
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._done = False

    def dump(self) -> None:
        import torch

        with self._lock:
            if self._done:
                return
            self._done = True
            c10d = torch._C._distributed_c10d
            if self.as_json:
                data = c10d._dump_fr_trace_json(True, False)  # collectives, not only active
            else:
                data = c10d._dump_fr_trace(True, False, False)  # no stack traces
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode())
            os.replace(tmp, self.path)

    def start(self) -> None:
        """Start the watchdog, and dump before an uncaught exception ends the rank."""
        threading.Thread(target=self._watch, name="fr-watchdog", daemon=True).start()
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
            threading.Thread(target=self._on_term, name="fr-sigterm", daemon=True).start()
        previous = sys.excepthook

        def hook(*exc) -> None:
            try:
                self.dump()
            finally:
                previous(*exc)

        sys.excepthook = hook

    def _on_term(self) -> None:
        signal.sigwait({signal.SIGTERM})
        try:
            self.dump()
        finally:
            os._exit(128 + signal.SIGTERM)

    def _watch(self) -> None:
        t0 = time.monotonic()
        while not self.stopped.wait(0.01 if self.at_s is not None else 0.1):
            if self.at_s is not None and time.monotonic() - t0 >= self.at_s:
                self.dump()  # on demand: the job goes on
                return
            if time.monotonic() - self.progress >= self.after_s:
                self.dump()
                if not self.stopped.wait(self.after_s):
                    os._exit(3)
                return


def guard_sigterm(args) -> None:
    """With ``--fr-dump``: block SIGTERM in this thread and every thread started after it (call
    first thing, before torch starts any), for :meth:`FrDumper.start`'s thread to take."""
    if args.fr_dump:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def start(args, rank: int) -> FrDumper | None:
    """A started dumper when ``--fr-dump`` is given."""
    if not args.fr_dump:
        return None
    d = FrDumper(args.fr_dump, rank, as_json=args.fr_json, after_s=args.fr_dump_after_s,
                 at_s=args.fr_dump_at_s)
    d.start()
    return d


def at_step_start(step: int, rank: int, faults: dict[int, dict[int, str]],
                  dumper: FrDumper | None, bcast: bool) -> str | None:
    """What the workload does as a step starts: progress for the watchdog, this rank's
    in-job fault (returned: ``mismatch`` acts later in the step), the per-step broadcast."""
    if dumper is not None:
        dumper.progress = time.monotonic()
    mode = faults.get(step, {}).get(rank)
    if mode == "block":
        threading.Event().wait()
    elif mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "cut":
        cut_ingress(os.environ.get("GLOO_SOCKET_IFNAME", ""))
    if bcast:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.zeros(1), src=0)
    return mode


def cut_ingress(ifname: str) -> None:
    """Drop every packet entering ``ifname`` (this emulated host's link) with nftables.

    Raises:
        RuntimeError: no emulated host (loopback: cutting ``lo`` would cut every rank).
    """
    if not ifname or ifname == "lo":
        raise RuntimeError("fault cut needs emulated hosts (network namespaces)")
    for cmd in (["add", "table", "inet", CUT_TABLE],
                ["add", "chain", "inet", CUT_TABLE, "in",
                 "{ type filter hook input priority 0; }"],
                ["add", "rule", "inet", CUT_TABLE, "in", "iifname", ifname, "drop"]):
        subprocess.run(["nft", *cmd], check=True, capture_output=True)


def after_backward(step: int, mode: str | None, faults: dict[int, dict[int, str]],
                   loss) -> None:
    """At a fault's step, every rank all-reduces its loss; a ``mismatch`` rank broadcasts."""
    if step not in faults:
        return
    import torch.distributed as dist

    t = loss.detach().reshape(1).clone()
    if mode == "mismatch":
        dist.broadcast(t, src=0)
    else:
        dist.all_reduce(t)


def finish(dumper: FrDumper | None) -> None:
    if dumper is not None:
        dumper.stopped.set()

"""``ringwatch probe``: the active faulty-link test.

One process per host, launched by ``torchrun`` (or by the local cluster), measures for every
ordered pair of ranks (sender ``i``, receiver ``j``) with ``torch.distributed`` send/recv:

- the point-to-point bandwidth ``bw_MBps[i][j]`` (10^6 bytes/s): ``i`` sends one message of
  ``--size-kb`` to ``j``, ``j`` answers with a 1-byte ack once it has it all; the median over
  ``--repeats`` of ``size / (time from the send to the ack's arrival)``. The ack adds one
  small-message latency to every sample: pick a size whose transfer takes milliseconds;
- the small-message latency ``lat_us[i][j]`` (µs): half the median round trip of a 4-byte
  tensor sent by ``i`` and returned by ``j`` (``--lat-repeats`` round trips per repeat). A
  round trip crosses both directions, so this matrix is nearly symmetric and cannot tell a
  sender from a receiver.

Only the sender times (one clock per cell, no clock sync needed). Repeats are sweeps: the
whole schedule runs ``--warmup`` times untimed (connection set-up, NCCL's lazy p2p
communicators), then ``--repeats`` times timed, each cell once per sweep; a burst of load
elsewhere on a host then spoils one sample of many cells, which the medians drop, rather than
every sample of the cells measured at that moment.

Schedule (``--schedule``): ``serial`` (default) measures one ordered pair at a time with a
barrier between pairs, so no measurement shares a link, a switch port or a CPU with another:
every cell is measured alone and the cells compare. ``rounds`` measures rounds of disjoint
pairs (a round-robin tournament, each direction in its own round; 2(N-1) rounds instead of
N(N-1) pairs), for many hosts on a non-blocking fabric; pairs of a round still share the
fabric's core and, on the local cluster, the machine's CPUs, so its cells are noisier.

Rank 0 gathers the samples (``reduce``), writes ``--out`` (format :data:`FORMAT`) and prints
the matrices and the verdicts of :func:`ringwatch.analyzers._probe.detect_probe_links`.
Pairs of ranks on the same host (same ``RINGWATCH_HOST``, else hostname) are not measured
unless ``--include-same-host``: they do not cross the network; run one rank per host
(``--nproc-per-node 1``).

Run it::

    torchrun --nnodes 4 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
        -m ringwatch._probe --out probe.json            # or: ringwatch probe --out ...
    ringwatch probe --read probe.json                   # matrices and verdicts again

Nothing here imports torch until a probe runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

FORMAT = "ringwatch-probe/1"
BACKENDS = ("gloo", "nccl")
SCHEDULES = ("serial", "rounds")
HOST_ENV = "RINGWATCH_HOST"  # the host label of a rank (the local cluster sets it)
_NAME_BYTES = 64  # host names travel as fixed-size byte tensors
_LAT_BYTES = 4
_PROGRESS_S = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeConfig:
    """Settings of one probe.

    Attributes:
        out: Where rank 0 writes the result (JSON, format :data:`FORMAT`).
        size_bytes: Bandwidth message size, bytes.
        repeats: Timed sweeps over every ordered pair: one bandwidth sample per pair each
            (the median is kept).
        lat_repeats: Timed round trips per pair per sweep for the latency.
        warmup: Untimed sweeps first.
        backend: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors, device ``LOCAL_RANK``).
        schedule: ``serial`` or ``rounds`` (see the module docstring).
        timeout_s: The process group's timeout: a peer silent this long ends the probe.
        same_host: Also measure pairs of ranks on one host (loopback, NVLink).
    """

    out: Path = Path("ringwatch-probe.json")
    size_bytes: int = 16 << 20
    repeats: int = 5
    lat_repeats: int = 4
    warmup: int = 1
    backend: str = "gloo"
    schedule: str = "serial"
    timeout_s: float = 300.0
    same_host: bool = False

    def __post_init__(self) -> None:
        if self.size_bytes < 1024:
            raise ValueError(f"message size {self.size_bytes} B: expected at least 1 KiB")
        if self.repeats < 1 or self.lat_repeats < 1 or self.warmup < 0:
            raise ValueError("repeats and lat-repeats must be >= 1, warmup >= 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: expected one of "
                             f"{', '.join(SCHEDULES)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout {self.timeout_s} s: expected > 0")


def add_probe_flags(p: argparse.ArgumentParser) -> None:
    """The probe's settings as command-line flags (shared by ``ringwatch probe`` and
    ``python -m ringwatch._probe``)."""
    d = ProbeConfig()
    g = p.add_argument_group("measurement (run under torchrun, one rank per host)")
    g.add_argument("--out", default=str(d.out), help=f"result file rank 0 writes (default "
                   f"{d.out})")
    g.add_argument("--size-kb", type=float, default=d.size_bytes / 1024,
                   help=f"bandwidth message size, KiB (default {d.size_bytes >> 10})")
    g.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"timed sweeps over all pairs, one message per pair each, median "
                   f"kept (default {d.repeats})")
    g.add_argument("--lat-repeats", type=int, default=d.lat_repeats,
                   help=f"timed round trips per pair per sweep (default {d.lat_repeats})")
    g.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed sweeps first (default {d.warmup})")
    g.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="gloo (CPU tensors, default) or nccl (CUDA tensors)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="serial: one ordered pair at a time (default); rounds: disjoint pairs "
                   "at once")
    g.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"give up on a silent peer after this long (default {d.timeout_s:g})")
    g.add_argument("--include-same-host", action="store_true",
                   help="also measure pairs of ranks on one host (loopback, NVLink)")


def config_from_args(args) -> ProbeConfig:
    return ProbeConfig(out=Path(args.out), size_bytes=int(args.size_kb * 1024),
                       repeats=args.repeats, lat_repeats=args.lat_repeats, warmup=args.warmup,
                       backend=args.backend, schedule=args.schedule, timeout_s=args.timeout_s,
                       same_host=args.include_same_host)


def pair_rounds(world: int, schedule: str = "serial") -> list[list[tuple[int, int]]]:
    """The ordered ``(sender, receiver)`` pairs of ``world`` ranks, in rounds measured one after
    the other; the pairs of one round share no rank. ``serial``: one pair per round. ``rounds``:
    the circle method's perfect matchings (a bye when ``world`` is odd), each matching twice,
    once per direction."""
    if schedule == "serial":
        return [[(i, j)] for i in range(world) for j in range(world) if i != j]
    if schedule != "rounds":
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    m = world + world % 2
    ids = list(range(m))
    out = []
    for _ in range(m - 1):
        pairs = [(ids[k], ids[m - 1 - k]) for k in range(m // 2)]
        pairs = [(a, b) for a, b in pairs if a < world and b < world]
        if pairs:
            out += [pairs, [(b, a) for a, b in pairs]]
        ids = [ids[0], ids[-1], *ids[1:-1]]
    return out


def _host_label() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def _wall_iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


class _Pair:
    """The two roles of one measurement, on tensors of one device."""

    def __init__(self, dist, torch, cfg: ProbeConfig, device):
        self.dist, self.cfg = dist, cfg
        self.big = torch.ones(cfg.size_bytes, dtype=torch.uint8, device=device)
        self.small = torch.ones(_LAT_BYTES, dtype=torch.uint8, device=device)
        self.ack = torch.ones(1, dtype=torch.uint8, device=device)
        # NCCL's send/recv return once queued on the GPU: time up to the stream's end.
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def send_side(self, peer: int) -> tuple[list[float], float]:
        """One visit to ``peer``: (round trips / 2 in µs, the bandwidth in MB/s)."""
        d, cfg = self.dist, self.cfg
        lat = []
        for _ in range(cfg.lat_repeats):
            t0 = time.perf_counter_ns()
            d.send(self.small, peer)
            d.recv(self.small, peer)
            self.sync()
            lat.append((time.perf_counter_ns() - t0) / 2e3)
        t0 = time.perf_counter_ns()
        d.send(self.big, peer)
        d.recv(self.ack, peer)
        self.sync()
        return lat, cfg.size_bytes / ((time.perf_counter_ns() - t0) / 1e9) / 1e6

    def receive_side(self, peer: int) -> None:
        d = self.dist
        for _ in range(self.cfg.lat_repeats):
            d.recv(self.small, peer)
            d.send(self.small, peer)
        d.recv(self.big, peer)
        # on NCCL the ack is queued after the recv on the pair's stream: it leaves once the
        # whole message has arrived
        d.send(self.ack, peer)
        self.sync()


def _gather_hosts(dist, torch, world: int, device) -> list[str]:
    raw = _host_label().encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    mine = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [bytes(p.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for p in parts]


def run_probe(cfg: ProbeConfig, *, log=lambda m: print(f"[probe] {m}", file=sys.stderr,
                                                       flush=True)) -> dict | None:
    """Measure every ordered pair of the job's ranks; the result on rank 0, ``None`` elsewhere.

    Must run in every rank of a job launched with torch's env rendezvous (``torchrun``: ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Rank 0 also writes ``cfg.out``.

    Raises:
        ValueError: Not under torchrun, or ``nccl`` without a CUDA device for ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("not under torchrun (no RANK/WORLD_SIZE): launch it with `torchrun "
                         "--nproc-per-node 1 ... -m ringwatch._probe`, or read a result with "
                         "`ringwatch probe --read FILE`")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    kw = {}
    if cfg.backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend nccl: no CUDA device here (use --backend gloo)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(cfg.backend, timeout=timedelta(seconds=cfg.timeout_s), **kw)
    try:
        return _measure(dist, torch, cfg, device, log)
    finally:
        dist.destroy_process_group()


def _measure(dist, torch, cfg: ProbeConfig, device, log) -> dict | None:
    me, world = dist.get_rank(), dist.get_world_size()
    hosts = _gather_hosts(dist, torch, world, device)
    rounds = [[(i, j) for i, j in r if cfg.same_host or hosts[i] != hosts[j]]
              for r in pair_rounds(world, cfg.schedule)]
    rounds = [r for r in rounds if r]
    if me == 0 and len(set(hosts)) < world and not cfg.same_host:
        log(f"{world} ranks on {len(set(hosts))} hosts: pairs on one host are not measured "
            "(run one rank per host, or --include-same-host)")
    pair = _Pair(dist, torch, cfg, device)
    n_lat = cfg.repeats * cfg.lat_repeats
    lat = torch.zeros(world, world, n_lat, dtype=torch.float64)
    bw = torch.zeros(world, world, cfg.repeats, dtype=torch.float64)
    dist.barrier()
    t0_ns, t0 = time.time_ns(), time.monotonic()
    shown = t0
    sweeps = cfg.warmup + cfg.repeats
    for sweep in range(sweeps):
        s = sweep - cfg.warmup  # < 0: untimed
        for k, pairs in enumerate(rounds):
            for i, j in pairs:
                if me == i:
                    la, b = pair.send_side(j)
                    if s >= 0:
                        lat[i, j, s * cfg.lat_repeats:(s + 1) * cfg.lat_repeats] = \
                            torch.tensor(la, dtype=torch.float64)
                        bw[i, j, s] = b
                elif me == j:
                    pair.receive_side(i)
            dist.barrier()  # the next round starts when this one has ended everywhere
            if me == 0 and time.monotonic() - shown > _PROGRESS_S:
                shown = time.monotonic()
                log(f"sweep {sweep + 1}/{sweeps}, round {k + 1}/{len(rounds)}, "
                    f"{shown - t0:.0f} s")
    samples = torch.cat([lat.flatten(), bw.flatten()]).to(device)
    dist.reduce(samples, dst=0, op=dist.ReduceOp.SUM)
    if me != 0:
        return None
    samples = samples.cpu()
    cut = world * world * n_lat
    lat = samples[:cut].reshape(world, world, n_lat).tolist()
    bw = samples[cut:].reshape(world, world, cfg.repeats).tolist()
    measured = {(i, j) for r in rounds for i, j in r}

    def cells(s):
        return [[[round(v, 3) for v in s[i][j]] if (i, j) in measured else None
                 for j in range(world)] for i in range(world)]

    lat_s, bw_s = cells(lat), cells(bw)
    t1_ns = time.time_ns()
    doc = {
        "format": FORMAT, "backend": cfg.backend, "schedule": cfg.schedule,
        "world_size": world, "ranks": list(range(world)), "hosts": hosts,
        "size_bytes": cfg.size_bytes, "repeats": cfg.repeats, "lat_repeats": cfg.lat_repeats,
        "warmup": cfg.warmup, "same_host": cfg.same_host,
        "started_wall_ns": t0_ns, "finished_wall_ns": t1_ns,
        "started": _wall_iso(t0_ns), "finished": _wall_iso(t1_ns),
        "wall_s": round(time.monotonic() - t0, 3),
        "bw_MBps": [[None if c is None else round(statistics.median(c), 3) for c in row]
                    for row in bw_s],
        "lat_us": [[None if c is None else round(statistics.median(c), 3) for c in row]
                   for row in lat_s],
        "bw_samples_MBps": bw_s, "lat_samples_us": lat_s,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, out)
    return doc


# -- reading a result -----------------------------------------------------------------------
def _cell(v: float | None, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    return (f"{v:.0f}" if v >= 100 else f"{v:.1f}").rjust(width)


def matrix_lines(title: str, m, hosts) -> list[str]:
    """A matrix as text: rows are senders, columns receivers."""
    corner = "sender \\ receiver"
    lw = max(len(corner), *(len(h) for h in hosts)) + 1
    w = max(8, *(len(h) + 1 for h in hosts))
    lines = [title, corner.ljust(lw) + "".join(h.rjust(w) for h in hosts)]
    for h, row in zip(hosts, m, strict=True):
        lines.append(h.ljust(lw) + "".join(_cell(v, w) for v in row))
    return lines


def report(doc: dict, *, ratio: float | None = None) -> tuple[list[str], tuple]:
    """The matrices and the verdicts of a probe result as text lines, and the findings.

    Raises:
        ValueError: ``doc`` is not a probe result.
    """
    from ringwatch.analyzers._probe import (
        RATIO,
        detect_probe_links,
        read_probe_matrix,
        row_labels,
    )

    pm = read_probe_matrix(doc)
    ratio = RATIO if ratio is None else ratio
    findings = detect_probe_links(pm.bw_MBps, pm.hosts, ratio=ratio, lat_us=pm.lat_us,
                                 ranks=pm.ranks, best=pm.bw_best_MBps)
    lines = [f"probe of {len(pm.hosts)} rank(s) on {len(set(pm.hosts))} host(s), "
             f"{pm.backend}, {pm.schedule}, {pm.size_bytes / 1024:g} KiB x {pm.repeats} "
             f"(median), {doc.get('started', '?')}, {doc.get('wall_s', '?')} s"]
    labels = row_labels(pm.hosts, pm.ranks)
    lines += matrix_lines("bandwidth, MB/s (median)", pm.bw_MBps, labels)
    lines += matrix_lines("latency, µs (round trip / 2, median)", pm.lat_us, labels)
    if not findings:
        lines.append(f"no slow link: no cell below {ratio:g} x the healthy level")
    else:
        lines.append(f"{len(findings)} finding(s):")
        for f in findings:
            lines.append(f"  {f.headline()}  (confidence {f.confidence:.2f})")
            lines += [f"      {e}" for e in f.evidence]
    return lines, findings


def run_and_print(args) -> dict | None:
    """Run the probe from parsed flags; rank 0 prints the report. Returns rank 0's result.

    Raises:
        ValueError: Bad settings, not under torchrun, or the probe failed (a peer gone or
            silent past ``--timeout-s``), in one line.
    """
    try:
        doc = run_probe(config_from_args(args))
    except RuntimeError as exc:  # torch's DistBackendError and kin
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"failed on rank {os.environ.get('RANK', '?')}: {first}") from exc
    if doc is not None:
        print("\n".join(report(doc, ratio=getattr(args, "ratio", None))[0]), flush=True)
        print(f"result: {args.out}", flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ringwatch._probe",
                                description="Pairwise point-to-point bandwidth and latency "
                                "over the job's ranks (run under torchrun, one rank per host).")
    add_probe_flags(p)
    args = p.parse_args(argv)
    try:
        run_and_print(args)
    except ValueError as exc:
        print(f"ringwatch probe: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

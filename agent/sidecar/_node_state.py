"""The sidecar's latest view of its node: what the samplers last read, shared with exporters.

Samplers replace whole frozen readings (one reference swap each, atomic under the GIL);
exporters take a consistent enough copy under the lock. Memory is fixed: one reading per GPU
and host, plus the power window (``power_window_s`` × the sampling rate, per GPU) and the
energy window (``phase_window_s`` × the sampling rate, per GPU).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

from ringwatch.collectors._types import FastReading, GpuIdentity, HostReading, SlowReading


@dataclass(slots=True)
class GpuState:
    identity: GpuIdentity
    fast: FastReading | None = None
    slow: SlowReading | None = None
    samples: int = 0
    #: (mono ns, instantaneous power mW) over the power window.
    window: deque = field(default_factory=deque)
    #: (wall ns, energy mJ) over the phase window (the energy counter, for the phase split).
    energy: deque = field(default_factory=deque)

    def power_extremes_mw(self) -> tuple[int | None, int | None]:
        values = [p for _, p in list(self.window)]
        return (max(values), min(values)) if values else (None, None)


class NodeState:
    """Latest readings of one node.

    Args:
        host: Host name, a label of every point.
        job: Job id for the node's GPU and host points ("" when the agent serves any job).
        replayed: Readings come from a recording (labelled in every output).
        source: Where GPU readings come from, as labelled.
        power_window_s: Span of the peak/min power gauges, seconds.
        phase_window_s: Span of the energy samples kept for the phase power split, seconds
            (the rank's rows arrive a flush interval late: it must be longer than that).
    """

    def __init__(self, *, host: str, job: str = "", replayed: bool = False,
                 source: str = "nvml", power_window_s: float = 10.0,
                 phase_window_s: float = 30.0):
        self.host = host
        self.job = job
        self.replayed = replayed
        #: ``source`` label of the GPU series: ``nvml``, ``replay:nvml``, ``replay:synthetic``.
        self.source = source
        self.power_window_ns = int(power_window_s * 1e9)
        self.phase_window_ns = int(phase_window_s * 1e9)
        self.gpus: dict[int, GpuState] = {}
        self.host_reading: HostReading | None = None
        self.ranks: dict = {}
        self.errors: Counter[str] = Counter()
        self.late_ticks = 0
        self.lock = threading.Lock()

    def set_devices(self, identities) -> None:
        with self.lock:
            self.gpus = {g.index: GpuState(g) for g in identities}

    def record_fast(self, index: int, reading: FastReading | None, mono_ns: int,
                    wall_ns: int | None = None) -> None:
        g = self.gpus[index]
        if reading is None:
            g.fast = None
            return
        g.fast = reading
        g.samples += 1
        if reading.power_instant_mw is not None:
            w = g.window
            w.append((mono_ns, reading.power_instant_mw))
            edge = mono_ns - self.power_window_ns
            while w and w[0][0] < edge:
                w.popleft()
        if reading.energy_mj is not None and wall_ns is not None:
            e = g.energy
            e.append((wall_ns, reading.energy_mj))
            edge = wall_ns - self.phase_window_ns
            while e and e[0][0] < edge:
                e.popleft()

    def record_slow(self, index: int, reading: SlowReading | None) -> None:
        self.gpus[index].slow = reading

    def count_error(self, cause: str, n: int = 1) -> None:
        with self.lock:
            self.errors[cause] += n

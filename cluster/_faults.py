"""Fault injectors, each acting on the training job from outside its processes.

Every injector has ``start()`` and ``stop()`` (idempotent, never raising for a process that is
already gone) and ``where``: a short description of what it acts on, for the ground truth.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ringwatch.cluster._netns import Host

HANG_SIGNAL = signal.SIGUSR1  # the workload blocks its main thread for good on this signal
SLOW_SIGNAL = signal.SIGUSR2  # the workload does more work per step from then on


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class DutyCycle:
    """Stop a process for ``severity`` of every ``period_s`` (SIGSTOP/SIGCONT) until stopped.

    Always leaves the process running (SIGCONT) when it ends.
    """

    def __init__(self, pid: int, severity: float, period_s: float = 0.1):
        if not 0 < severity < 1:
            raise ValueError(f"severity {severity}: expected 0 < severity < 1")
        self.pid, self.severity, self.period_s = pid, severity, period_s
        self.where = f"pid {pid}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        period = self.period_s
        stopped_s = self.severity * period
        next_t = time.monotonic()
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(max(0.0, next_t + stopped_s - time.monotonic()))
                os.kill(self.pid, signal.SIGCONT)
                next_t += period
                self._stop.wait(max(0.0, next_t - time.monotonic()))
        except ProcessLookupError:
            return
        finally:
            _kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)


class Hang:
    """Hang one rank for good: ``block`` freezes its main thread (the agent's threads go on, as
    in a rank stuck in its data loader); ``stop`` SIGSTOPs the whole process."""

    def __init__(self, pid: int, mode: str = "block"):
        self.pid, self.mode = pid, mode
        self.where = f"pid {pid}"

    def start(self) -> None:
        _kill(self.pid, HANG_SIGNAL if self.mode == "block" else signal.SIGSTOP)

    def stop(self) -> None:
        """Nothing to undo: the run ends the process (a stopped one gets SIGCONT first)."""


class SlowDown:
    """Make one rank a compute straggler: from its next step on it does more work per step
    (the workload's ``--slowdown-factor``), its communication untouched."""

    def __init__(self, pid: int):
        self.pid = pid
        self.where = f"pid {pid}"

    def start(self) -> None:
        _kill(self.pid, SLOW_SIGNAL)

    def stop(self) -> None:
        """Nothing to undo: the run ends the process."""


def tbf_args(rate_mbit: float) -> list[str]:
    """``tc`` arguments of a token-bucket limit at ``rate_mbit`` (20 ms of traffic per burst,
    at least one jumbo frame; 100 ms of queue)."""
    burst_bytes = max(16 * 1024, int(rate_mbit * 1e6 / 8 * 0.02))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes), "latency", "100ms"]


class LinkFault:
    """Degrade one emulated host's link: a tbf rate limit and/or random packet loss.

    ``egress`` acts on what leaves the host (tbf on its ``eth0``, an nftables ``output`` rule),
    ``ingress`` on what enters it (tbf on the root-side veth end, an nftables ``input`` rule);
    ``both`` on both.
    """

    TABLE = "ringwatch_fault"

    def __init__(self, host: Host, *, rate_mbit: float | None, loss_pct: float | None,
                 direction: str = "both"):
        if host.netns is None:
            raise ValueError("a link fault needs emulated hosts (network namespaces)")
        self.host, self.rate_mbit, self.loss_pct = host, rate_mbit, loss_pct
        self.egress = direction in ("both", "egress")
        self.ingress = direction in ("both", "ingress")
        self.where = f"{host.name} ({host.netns}: {host.ifname} <-> {host.veth})"
        self._applied: list[tuple] = []

    def start(self) -> None:
        from ringwatch.cluster._netns import _run

        h = self.host
        if self.rate_mbit is not None:
            if self.egress:
                h.run("tc", "qdisc", "add", "dev", h.ifname, "root", *tbf_args(self.rate_mbit))
                self._applied.append(("tc-ns",))
            if self.ingress:
                _run("tc", "qdisc", "add", "dev", h.veth, "root", *tbf_args(self.rate_mbit))
                self._applied.append(("tc-root",))
        if self.loss_pct is not None:
            per_10k = max(1, round(self.loss_pct * 100))
            h.run("nft", "add", "table", "inet", self.TABLE)
            self._applied.append(("nft",))
            for chain, hook in (("out", "output"), ("in", "input")):
                if (hook == "output" and self.egress) or (hook == "input" and self.ingress):
                    h.run("nft", "add", "chain", "inet", self.TABLE, chain,
                          f"{{ type filter hook {hook} priority 0; }}")
                    oif = "oifname" if hook == "output" else "iifname"
                    h.run("nft", "add", "rule", "inet", self.TABLE, chain, oif, h.ifname,
                          "numgen", "random", "mod", "10000", "<", str(per_10k), "drop")

    def stop(self) -> None:
        from ringwatch.cluster._netns import _run

        h = self.host
        for (what,) in reversed(self._applied):
            if what == "tc-ns":
                h.run("tc", "qdisc", "del", "dev", h.ifname, "root", check=False)
            elif what == "tc-root":
                _run("tc", "qdisc", "del", "dev", h.veth, "root", check=False)
            elif what == "nft":
                h.run("nft", "delete", "table", "inet", self.TABLE, check=False)
        self._applied.clear()

"""What a local cluster run is: its shape (:class:`ClusterSpec`) and its fault (:class:`FaultSpec`).

Frozen keyword-only dataclasses, validated on construction, so that a bad setting fails at
start-up with a one-line message and never half-way through a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

FAULT_KINDS = ("none", "straggler", "hang", "link", "imbalance")
HANG_MODES = ("block", "stop")
STRAGGLER_MODES = ("stop", "work")
LINK_DIRECTIONS = ("both", "egress", "ingress")
NETNS_MODES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSpec:
    """One fault, applied from outside the training processes.

    Attributes:
        kind: ``none``; ``straggler`` (``rank`` slowed: see ``straggler_mode``); ``hang``
            (``rank`` blocked for good: ``hang_mode`` ``block`` freezes its main thread before
            its next collective while the agent's threads go on, ``stop`` SIGSTOPs the whole
            process); ``link`` (``host``'s link limited to ``rate_mbit`` with tc tbf and/or
            ``loss_pct`` of its packets dropped with nftables); ``imbalance`` (``rank`` does
            ``factor`` times the work of its peers from the first step: a straggler from the
            start among replicas that do the same work).
        rank: The victim rank (straggler, hang, imbalance).
        host: The victim host index (link).
        at_step: Apply when the victim (or, for a link, the slowest rank) reaches this step.
        at_s: Apply this many seconds after the first step instead (when ``at_step`` is None).
        straggler_mode: ``stop``: SIGSTOP/SIGCONT duty cycle (the whole process, its
            communication threads too, as a host stall would); ``work``: ``factor`` times the
            compute and host-side work per step from the onset on (a slow GPU or a busy host:
            the rank arrives late, its transfers run at full speed).
        severity: Straggler (stop): fraction of every ``period_s`` the rank is stopped (0 < s < 1).
        period_s: Straggler duty-cycle period, seconds.
        rate_mbit: Link: bandwidth limit, Mbit/s (``None``: no limit).
        loss_pct: Link: random packet loss, percent (``None``: none).
        direction: Link: ``both``, ``egress`` (leaving the host) or ``ingress``.
        hang_mode: ``block`` or ``stop`` (see ``kind``).
        hold_s: Hang: seconds to leave the job hung before the cluster ends it.
        factor: Imbalance, straggler (work): the victim's work multiplier.
    """

    kind: str = "none"
    rank: int | None = None
    host: int | None = None
    at_step: int | None = 20
    at_s: float | None = None
    severity: float = 0.5
    period_s: float = 0.1
    rate_mbit: float | None = 20.0
    loss_pct: float | None = None
    direction: str = "both"
    hang_mode: str = "block"
    straggler_mode: str = "stop"
    hold_s: float = 15.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r}: expected one of {', '.join(FAULT_KINDS)}")
        if self.kind in ("straggler", "hang", "imbalance") and self.rank is None:
            raise ValueError(f"fault {self.kind}: a victim rank is needed")
        if self.kind == "link" and self.host is None:
            raise ValueError("fault link: a victim host is needed")
        if self.kind == "straggler" and not 0 < self.severity < 1:
            raise ValueError(f"severity {self.severity}: expected 0 < severity < 1")
        if self.period_s <= 0:
            raise ValueError(f"period_s {self.period_s}: expected > 0")
        if self.kind == "link":
            if self.rate_mbit is None and self.loss_pct is None:
                raise ValueError("fault link: give a rate limit, a loss percentage or both")
            if self.rate_mbit is not None and self.rate_mbit <= 0:
                raise ValueError(f"rate {self.rate_mbit} Mbit/s: expected > 0")
            if self.loss_pct is not None and not 0 < self.loss_pct < 100:
                raise ValueError(f"loss {self.loss_pct}%: expected 0 < loss < 100")
        if self.direction not in LINK_DIRECTIONS:
            raise ValueError(f"direction {self.direction!r}: expected one of "
                             f"{', '.join(LINK_DIRECTIONS)}")
        if self.straggler_mode not in STRAGGLER_MODES:
            raise ValueError(f"straggler mode {self.straggler_mode!r}: expected one of "
                             f"{', '.join(STRAGGLER_MODES)}")
        if self.kind in ("straggler", "imbalance") and self.factor <= 1 and (
                self.kind == "imbalance" or self.straggler_mode == "work"):
            raise ValueError(f"factor {self.factor}: expected > 1")
        if self.hang_mode not in HANG_MODES:
            raise ValueError(f"hang mode {self.hang_mode!r}: expected one of "
                             f"{', '.join(HANG_MODES)}")
        if self.kind == "imbalance" and self.factor < 1:
            raise ValueError(f"imbalance factor {self.factor}: expected >= 1")
        if self.at_step is None and self.at_s is None and self.kind not in ("none", "imbalance"):
            raise ValueError(f"fault {self.kind}: give at_step or at_s")

    def params(self) -> dict:
        """The settings that matter for this kind (for the ground truth)."""
        straggler = (("straggler_mode", "factor") if self.straggler_mode == "work"
                     else ("straggler_mode", "severity", "period_s"))
        keep = {"straggler": straggler, "hang": ("hang_mode", "hold_s"),
                "link": ("rate_mbit", "loss_pct", "direction"), "imbalance": ("factor",),
                "none": ()}[self.kind]
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterSpec:
    """The shape of a local cluster run.

    Attributes:
        run_dir: Where everything goes: ``logs/`` (ringwatch's per-rank logs),
            ``ground_truth.json``, ``cluster.json``, ``steps/`` (the job's own step marks) and
            ``out/`` (each launcher's output).
        nproc: Ranks in all.
        hosts: Emulated hosts; ranks are split evenly, ``nproc / hosts`` per host.
        netns: ``on``: one network namespace per host joined by a bridge (needs root);
            ``off``: all on loopback, hosts only as labels; ``auto``: ``on`` when root.
        tp: Ranks per "tensor-parallel" group (1: plain DDP; > 1: dp × tp process groups).
        pp: Pipeline stages (1: none; > 1: dp × tp × pp, send/recv between the stages, see
            :mod:`ringwatch.cluster._pipeline`).
        steps: Training steps.
        job_args: Extra arguments for the workload (``ringwatch.cluster._job``).
        job_id: ringwatch job id of the run (default: derived from the run folder's name).
        subnet: The emulated hosts' addresses, ``A.B.C`` of ``A.B.C.0/24``.
        timeout_s: End the run (as a failure) after this many seconds.
        flush_interval_s: The agent's flush interval in the ranks.
        attach: Attach ringwatch to the ranks (off only to measure the job bare).
    """

    run_dir: Path
    nproc: int = 4
    hosts: int = 1
    netns: str = "auto"
    tp: int = 1
    pp: int = 1
    steps: int = 60
    job_args: tuple[str, ...] = ()
    job_id: str | None = None
    subnet: str = "10.77.0"
    timeout_s: float = 600.0
    flush_interval_s: float = 0.5
    attach: bool = True
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.hosts < 1:
            raise ValueError(f"{self.nproc} ranks on {self.hosts} hosts: expected both >= 1")
        if self.nproc % self.hosts:
            raise ValueError(f"{self.nproc} ranks do not split evenly over {self.hosts} hosts")
        if self.hosts > 250:
            raise ValueError(f"{self.hosts} hosts: at most 250")
        if self.tp < 1 or self.nproc % self.tp:
            raise ValueError(f"tp {self.tp}: expected a divisor of {self.nproc} ranks")
        if self.pp < 1 or self.nproc % (self.tp * self.pp):
            raise ValueError(f"tp {self.tp} x pp {self.pp}: expected a divisor of "
                             f"{self.nproc} ranks")
        if self.netns not in NETNS_MODES:
            raise ValueError(f"netns {self.netns!r}: expected one of {', '.join(NETNS_MODES)}")
        if self.steps < 1:
            raise ValueError(f"steps {self.steps}: expected >= 1")

    @property
    def per_host(self) -> int:
        return self.nproc // self.hosts

    def host_of(self, rank: int) -> int:
        """The host index of a rank (torchrun numbers ranks node by node)."""
        return rank // self.per_host

"""One findings model for every analyzer: what is wrong, who, why, since when, and the proof.

Everything downstream (the ``ringwatch analyze`` summary and ``--json``, alerts, dashboards)
reads :class:`Finding`; analyzers return tuples of them and never print.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = ("hang", "straggler", "slow_link", "imbalance", "power_headroom")


@dataclass(frozen=True)
class Finding:
    """One thing that hurts (or stopped) the job.

    Attributes:
        kind: One of :data:`KINDS`.
        cls: The finer class within the kind, e.g. ``never arrived`` or ``stuck in the
            collective`` for a hang.
        ranks: Global ranks of the culprit (for a stuck group: its members).
        hosts: Their hosts, in the order of ``ranks`` (duplicates removed).
        local_ranks: Their ranks within their hosts (``LOCAL_RANK``: which GPU), in the
            order of ``ranks``, when known.
        pg: Process group the evidence comes from, when one.
        seq: Collective number within ``pg`` the evidence points at, when one.
        confidence: 0..1, how sure the analyzer is.
        since_ns: Wall clock (ns) when it started, when known.
        since_step: Training step when it started, when known.
        evidence: Short lines a person can check against the logs.
        gain_s_per_step: What fixing it would save per step (s), when estimated.
        detected_step: The step by which the evidence was conclusive (for detection latency).
        detected_ns: Wall clock (ns) by which the evidence was conclusive, when known (a
            hang: when its stall reached the threshold).
        until_step: The last step it was seen, when it ended before the data did (``None``:
            still there at the end).
    """

    kind: str
    cls: str
    ranks: tuple[int, ...]
    hosts: tuple[str, ...] = ()
    local_ranks: tuple[int | None, ...] = ()
    pg: str | None = None
    seq: int | None = None
    confidence: float = 1.0
    since_ns: int | None = None
    since_step: int | None = None
    evidence: tuple[str, ...] = field(default_factory=tuple)
    gain_s_per_step: float | None = None
    detected_step: int | None = None
    until_step: int | None = None
    detected_ns: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be within 0..1, not {self.confidence}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"], d["hosts"], d["evidence"] = list(self.ranks), list(self.hosts), \
            list(self.evidence)
        d["local_ranks"] = list(self.local_ranks)
        return d

    def headline(self) -> str:
        """One line: kind, class, who, where."""
        local = dict(zip(self.ranks, self.local_ranks, strict=False))
        who = ", ".join(f"rank {r}" + (f" (local {local[r]})" if local.get(r) is not None
                                        else "") for r in self.ranks[:8]) + (
            f" (+{len(self.ranks) - 8} more)" if len(self.ranks) > 8 else "")
        where = f" on {', '.join(self.hosts[:4])}" if self.hosts else ""
        at = f" at pg {self.pg} #{self.seq}" if self.pg is not None and self.seq is not None \
            else ""
        return f"{self.kind.upper()} ({self.cls}): {who}{where}{at}"


def with_local_ranks(findings: tuple[Finding, ...],
                     local_rank: dict[int, int | None]) -> tuple[Finding, ...]:
    """``findings`` with ``local_ranks`` filled from a ``rank -> local rank`` map."""
    from dataclasses import replace

    return tuple(replace(f, local_ranks=tuple(local_rank.get(r) for r in f.ranks))
                 for f in findings)

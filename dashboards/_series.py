"""PromQL built from the metric tables, never from hand-typed names.

An agent series is named by where its value comes from (``agent("gpu", "power_instant_mw")``:
the entity and field of :data:`ringwatch._metrics.METRICS`), a service series by its key in
:data:`ringwatch.service._api.SERVICE_METRICS`; either lookup fails at import when the table
lost it, so a renamed metric renames every query that reads it (and the drift test then shows
the regenerated JSON).

Selectors: a matcher value starting with ``$`` (a dashboard variable) matches as a regex
(``=~``), so single, multi and "All" (``.*``) selections all work; ``!``-prefixed values
exclude (``!=``), ``~``-prefixed ones are regexes; anything else is an exact match. Every
range is ``$__rate_interval``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringwatch._metrics import COUNTER, METRICS
from ringwatch.service._api import SERVICE_METRICS

RATE = "$__rate_interval"
#: Labels that name one physical GPU. Device-wide fields (power, energy, clocks, temperature,
#: ECC, XID, ...) are reduced with ``max by`` these before anything is summed: a MIG GPU's
#: instances, or one GPU seen under two rank labels while its rank changes, are copies of one
#: reading, never parts of it.
GPU_KEY = ("host", "gpu", "uuid")


def _matcher(label: str, value: str) -> str:
    if value.startswith("$"):
        return f'{label}=~"{value}"'
    if value.startswith("!"):
        return f'{label}!="{value[1:]}"'
    if value.startswith("~"):
        return f'{label}=~"{value[1:]}"'
    return f'{label}="{value}"'


@dataclass(frozen=True)
class Series:
    """One Prometheus series name and the fixed labels that pick it out of a shared name."""

    name: str
    kind: str
    fixed: tuple[tuple[str, str], ...] = ()

    def sel(self, *extra: tuple[str, str], **match: str) -> str:
        """``name{...}``: the fixed labels, then ``match``, then ``extra`` pairs (a label may
        appear twice there: ``("job", "!")`` beside ``job="$job"``)."""
        pairs = [*self.fixed, *match.items(), *extra]
        inner = ", ".join(_matcher(k, v) for k, v in pairs)
        return f"{self.name}{{{inner}}}" if inner else self.name

    def family(self) -> Series:
        """Every spec sharing this name (both directions, every error type): no fixed label."""
        return Series(self.name, self.kind)

    def range(self, *extra: tuple[str, str], **match: str) -> str:
        return f"{self.sel(*extra, **match)}[{RATE}]"

    def rate(self, *extra: tuple[str, str], **match: str) -> str:
        if self.kind != COUNTER:
            raise TypeError(f"rate() of {self.name}, a {self.kind}: use deriv()")
        return f"rate({self.range(*extra, **match)})"

    def increase(self, *extra: tuple[str, str], **match: str) -> str:
        if self.kind != COUNTER:
            raise TypeError(f"increase() of {self.name}, a {self.kind}")
        return f"increase({self.range(*extra, **match)})"

    def deriv(self, *extra: tuple[str, str], **match: str) -> str:
        if self.kind == COUNTER:
            raise TypeError(f"deriv() of {self.name}, a counter: use rate()")
        return f"deriv({self.range(*extra, **match)})"


def agent(entity: str, field: str) -> Series:
    """The agent's series whose value is ``entity.field``.

    Raises:
        LookupError: The metric table has no such spec (or it is OTLP-only: not on /metrics).
    """
    for m in METRICS:
        if (m.entity, m.field) == (entity, field):
            if m.otlp_only:
                raise LookupError(f"{m.prom} is OTLP-only: Prometheus never sees it")
            return Series(m.prom, m.kind, tuple(sorted(m.const_labels.items())))
    raise LookupError(f"no metric of {entity}.{field} in ringwatch._metrics.METRICS")


def service(name: str) -> Series:
    """The central service's series ``name``.

    Raises:
        LookupError: ``SERVICE_METRICS`` has no such series.
    """
    if name not in SERVICE_METRICS:
        raise LookupError(f"{name} is not in ringwatch.service._api.SERVICE_METRICS")
    return Series(name, SERVICE_METRICS[name][0])


def by(op: str, labels, expr: str) -> str:
    """``op by (labels) (expr)``."""
    return f"{op} by ({', '.join(labels)}) ({expr})"


def per_gpu(expr: str, *extra_labels: str) -> str:
    """A device-wide GPU field, one series per physical GPU (see :data:`GPU_KEY`)."""
    return by("max", (*GPU_KEY, *extra_labels), expr)


def bit(expr: str, mask: int) -> str:
    """1 where bit ``mask`` (a power of two) of ``expr`` is set, else 0 (PromQL has no
    bitwise operators)."""
    if mask <= 0 or mask & (mask - 1):
        raise ValueError(f"{mask:#x} is not a single bit")
    return f"floor({expr} / {mask}) % 2"


#: Bits of ``ringwatch_gpu_throttle_reasons`` (NVML's ``nvmlClocksEventReason*``), shown.
THROTTLE_BITS = {0x1: "idle", 0x2: "app clocks", 0x4: "SW power cap", 0x8: "HW slowdown",
                 0x10: "sync boost", 0x20: "SW thermal", 0x40: "HW thermal",
                 0x80: "HW power brake", 0x200: "board limit", 0x400: "reliability"}
#: The reasons that mean the hardware protected itself (not a policy or an idle GPU).
HW_THROTTLE_BITS = (0x8, 0x40, 0x80)

"""The policy after the detectors: what of their findings is shown.

* A straggler that ended within a few steps while the job went on is a hiccup, not a finding,
  and so is a slow link's episode that did (:func:`split_hiccups`); live, a straggler still
  too young to tell is held back, and so is a slow link on send/recv alone, which a late
  sender looks like (:func:`split_undecided`; a link's own episode is held back by the link
  pass: :func:`~ringwatch.analyzers._link_episodes.undecided`).
* A straggler or a slow link whose what-if gain is under a share of the job's step is the job's
  noise (:func:`significant`).

``ringwatch analyze`` and the live service apply the same policy.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._link_episodes import TRANSIENT_LINK_CLASS
from ringwatch.analyzers._links import _p2p_only
from ringwatch.analyzers._stragglers import HICCUP_CLASS
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D

#: Least what-if gain, as a share of the job's step time, a straggler must be worth
#: (:attr:`Thresholds.min_gain_share <ringwatch.analyzers._thresholds.Thresholds>`).
MIN_GAIN_SHARE = _D.min_gain_share


def split_hiccups(findings: tuple) -> tuple[tuple, tuple]:
    """``(findings, hiccups)``: the transient stragglers (:data:`HICCUP_CLASS`, ended within a
    few steps while the job went on) and transient slow links (:data:`TRANSIENT_LINK_CLASS`)
    apart from the rest.

    A rank that fell behind for a few steps and caught up (a page-cache flush, a scheduler
    hiccup, a garbage collection), or groups whose transfers slowed for a few steps and
    recovered (a burst of load on the cores Gloo's transfers share), is nothing to act on; a
    report lists hiccups as a tally per rank or group, so one that recurs still shows, and
    keeps the findings for what needs a person."""
    return (tuple(f for f in findings if not is_hiccup(f)),
            tuple(f for f in findings if is_hiccup(f)))


def split_undecided(findings: tuple, *, newest_step: int | None,
                    transient_steps: int = _D.transient_steps,
                    persist_steps: int = _D.persist_steps,
                    data_ended: bool = False) -> tuple[tuple, tuple]:
    """``(decided, undecided)``: a straggler still on (``until_step`` None) may yet end as a
    hiccup (:func:`split_hiccups`: late fewer than ``transient_steps`` steps), so a live
    reader holds it back until it cannot (or ``data_ended``: the job stopped sending steps,
    after which a post-mortem pass would call it a straggler still on at the end).

    Still on at ``newest_step`` means late in one of its last ``persist_steps + 1`` steps
    (``persist_steps + 1`` on-time steps in a row end it), so its lateness has lasted at least
    ``newest_step - persist_steps - since_step + 1`` steps: once that reaches
    ``transient_steps`` it is no hiccup. Holding back exactly what the post-mortem pass may
    still call a hiccup keeps the live findings and the post-mortem ones the same.

    A slow link that rests on send/recv alone is held back as long: a late sender's
    receivers wait for it as for a slow link, and such a link is folded into a straggler
    among its ranks (:func:`~ringwatch.analyzers._links.explain_by_links`). Four slow steps
    make the link, while the straggler behind it is shown only once it is no hiccup: shown
    at once, the link would stand for the straggler's first steps. (A link that may yet be
    a hiccup itself is held back by the link pass, which knows how far it fell:
    :func:`~ringwatch.analyzers._link_episodes.undecided`.)"""
    if data_ended or newest_step is None:
        return tuple(findings), ()

    def young(f: Finding) -> bool:
        waits = f.kind == "straggler" or _p2p_only(f)
        return (waits and f.until_step is None and f.since_step is not None
                and newest_step - persist_steps - f.since_step + 1 < transient_steps)

    return (tuple(f for f in findings if not young(f)),
            tuple(f for f in findings if young(f)))


def is_hiccup(f: Finding) -> bool:
    """Whether ``f`` is a transient straggler (:data:`HICCUP_CLASS`) or slow link
    (:data:`TRANSIENT_LINK_CLASS`)."""
    return ((f.kind == "straggler" and f.cls == HICCUP_CLASS)
            or (f.kind == "slow_link" and f.cls == TRANSIENT_LINK_CLASS))


def significant(findings: tuple, events: pl.DataFrame,
                min_share: float = MIN_GAIN_SHARE) -> tuple:
    """``findings`` less the stragglers and slow links whose what-if gain is under
    ``min_share`` of the job's typical step time (``events``' steps): a rank that costs the
    job 3% now and then on a noisy machine, or a group whose transfers lost 10 ms of a 300 ms
    step, is the job's noise, not a fault to act on. The online service and ``ringwatch
    analyze`` apply the same rule."""
    from ringwatch.analyzers._hangs import typical_step_s

    step_s = typical_step_s(events) if events.height and min_share else None
    if not step_s:
        return findings
    return tuple(f for f in findings if f.kind not in ("straggler", "slow_link")
                 or f.gain_s_per_step is None or f.gain_s_per_step >= min_share * step_s)


__all__ = ["MIN_GAIN_SHARE", "is_hiccup", "significant", "split_hiccups", "split_undecided"]

"""Steps for a rank that marks none (a serving engine, a custom loop), from its rhythm, live.

A job with no optimizer step and no ``ringwatch.mark_step`` has every row at one step number
(the agent's counter never moves). Post-mortem, ``ringwatch analyze`` numbers its iterations
from the rhythm of its collectives (:func:`ringwatch.analyzers._rhythm.assign_rhythm_steps`);
the sidecar does the same as the rows arrive, so the live service judges such a job by its
iterations as the post-mortem pass does:

* learning: while a rank's rows all carry one step number, the first ``LEARN_ROWS`` (then
  twice, four and eight times as many, until a rhythm shows) are read with the post-mortem
  :func:`~ringwatch.analyzers._rhythm.infer_rhythm`: its template (the period's signatures,
  sizes masked where they vary) and the start of each iteration; those rows get their
  iteration as their step at once;
* following: later rows, in issue order, are matched against the template a period at a time,
  as the post-mortem matcher does: a match is the next iteration; a row that starts no match
  is an interlude of the current one. After ``RELEARN_PERIODS`` periods of interludes in a row
  the rhythm is learnt again from the newest rows, numbering on from the last iteration.

A rank whose rows carry two step numbers marks its steps: :meth:`RhythmSteps.feed` then
hands every row back untouched, for good. Memory: the learning buffer (at most
``8 * LEARN_ROWS`` rows) and less than a period of rows waiting to be matched.
"""

from __future__ import annotations

#: Rows a rank shows before its rhythm is first looked for (then 2x, 4x, 8x).
LEARN_ROWS = 512
#: Periods of rows in a row that match nothing before the rhythm is learnt again.
RELEARN_PERIODS = 8
_SIG = ("pg", "op", "nbytes", "peer")


class RhythmSteps:
    """One rank's live iteration numbering (see the module). Not thread-safe; pure."""

    def __init__(self) -> None:
        self.marked = False  # the rank marks its own steps: rows pass through
        self.step_value: object = _UNSET  # the one step number its rows carried so far
        self.learning: list[dict] = []  # rows waiting for a rhythm (learning)
        self.waiting: list[dict] = []  # rows after the last matched iteration (following)
        self.template: tuple[tuple, ...] | None = None
        self.iteration = -1  # the newest iteration numbered
        self.misses = 0  # rows in a row that started no match
        self.attempts = 0

    @property
    def active(self) -> bool:
        """Whether this rank's steps come from the rhythm (a template was learnt)."""
        return self.template is not None

    def feed(self, rows: list[dict]) -> list[dict]:
        """Take ``rows`` (the rank's new rows, any order); return the rows whose step is known
        now, in issue order: all of them for a rank that marks its steps, else those the
        rhythm has numbered (``step`` replaced by the iteration)."""
        if self.marked:
            return rows
        for r in rows:
            value = r.get("step")
            if value is None:  # no number (rows recovered without one): says nothing
                continue
            if self.step_value is _UNSET:
                self.step_value = value
            elif value != self.step_value:
                self.marked = True
        if self.marked:  # hand back what was held, as it was
            held = self.learning + self.waiting + rows
            self.learning, self.waiting = [], []
            return sorted(held, key=_idx)
        rows = sorted(rows, key=_idx)
        if self.template is None:
            self.learning.extend(rows)
            return self._learn()
        self.waiting.extend(rows)
        return self._follow()

    # --- learning -----------------------------------------------------------------------------
    def _learn(self) -> list[dict]:
        need = LEARN_ROWS << min(self.attempts, 3)
        if len(self.learning) < need:
            return []
        from ringwatch.analyzers._rhythm import infer_rhythm

        self.attempts += 1
        rows = sorted(self.learning, key=_idx)
        rh = infer_rhythm(_frame(rows))
        if not rh.found:
            if len(rows) > 8 * LEARN_ROWS:  # keep the newest: memory stays bounded
                self.learning = rows[-4 * LEARN_ROWS:]
            return []
        self.template = rh.slots
        starts = list(rh.starts)
        last, base, k = starts[-1], self.iteration + 1, -1
        out: list[dict] = []
        for r in rows:
            if r["idx"] >= last:  # from the last start on: matched again by _follow
                break
            while k + 1 < len(starts) and r["idx"] >= starts[k + 1]:
                k += 1
            if k >= 0:  # rows before the first iteration (warm-up) get no step
                out.append({**r, "step": base + k})
        self.iteration = base + len(starts) - 2
        self.waiting = [r for r in rows if r["idx"] >= last]
        self.learning, self.misses = [], 0
        return out + self._follow()

    # --- following ----------------------------------------------------------------------------
    def _follow(self) -> list[dict]:
        period = len(self.template)
        out: list[dict] = []
        while len(self.waiting) >= period:
            head = self.waiting[:period]
            if all(_matches(slot, r) for slot, r in zip(self.template, head, strict=True)):
                self.iteration += 1
                out.extend({**r, "step": self.iteration} for r in head)
                del self.waiting[:period]
                self.misses = 0
                continue
            r = self.waiting.pop(0)  # an interlude of the current iteration
            if self.iteration >= 0:
                out.append({**r, "step": self.iteration})
            self.misses += 1
            if self.misses >= RELEARN_PERIODS * period:  # the rhythm changed: learn it again
                self.template = None
                self.learning, self.waiting = self.waiting, []
                self.attempts = 0
                return out + self._learn()
        return out


class _Unset:
    pass


_UNSET = _Unset()


def _idx(r: dict) -> int:
    return r["idx"] if r.get("idx") is not None else -1


def _matches(slot: tuple, r: dict) -> bool:
    pg, op, nbytes, peer = slot
    return (r["pg"] == pg and r["op"] == op and r.get("peer") == peer
            and (nbytes is None or r["nbytes"] == nbytes))


def _frame(rows: list[dict]):
    """The rows as :func:`infer_rhythm` reads them (host times stand in for monotonic ones:
    only the gaps between a rank's own collectives count)."""
    import polars as pl

    return pl.DataFrame({
        "idx": [r["idx"] for r in rows], "pg": [r["pg"] for r in rows],
        "op": [r["op"] for r in rows], "nbytes": [r["nbytes"] for r in rows],
        "peer": [r.get("peer") for r in rows],
        "mono_start_ns": [r["t_start_ns"] for r in rows],
        "mono_end_ns": [r["t_end_ns"] for r in rows], "step": [None] * len(rows),
    }, schema={"idx": pl.Int64, "pg": pl.Utf8, "op": pl.Utf8, "nbytes": pl.Int64,
               "peer": pl.Int32, "mono_start_ns": pl.Int64, "mono_end_ns": pl.Int64,
               "step": pl.Int64})


__all__ = ["LEARN_ROWS", "RhythmSteps"]

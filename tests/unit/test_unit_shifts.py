"""The two-level fit both baselines use (analyzers/_shifts.py): a rise that lasts to the end
and parts the values, not two halves of a noisy series that drifted apart."""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._links import usual_bandwidth
from ringwatch.analyzers._shifts import lasting_shifts


def _series(*ys: list[float]) -> pl.DataFrame:
    return pl.concat([pl.DataFrame({"k": [k] * len(y), "_i": list(range(len(y))),
                                    "_y": [float(v) for v in y], "_n": [len(y)] * len(y)})
                      for k, y in enumerate(ys)])


def _rose(df: pl.DataFrame, bar: float = 1.0) -> dict[int, int]:
    got = lasting_shifts(df, key="k", first=5, persist=4, bar=pl.lit(bar))
    return dict(got.select("k", "_j").iter_rows())


BEFORE = [0.1, -0.3, 0.4, 0.0, -0.2, 0.3, -0.1]


def test_a_rise_that_parts_the_values_is_found_at_its_first_step():
    clean = BEFORE + [1.6, 1.2, 1.9, 1.4, 1.5, 1.3, 1.8]
    one_low = BEFORE + [1.6, 1.2, 0.2, 1.4, 1.5, 1.3, 1.8]  # one step back among the before
    assert _rose(_series(clean, one_low)) == {0: 7, 1: 7}


def test_a_burst_before_the_onset_and_its_half_slow_step_leave_the_rise_where_it_is():
    """A real 4-rank run, its straggler's delays (ms) over the baseline steps 2-21: a 70 ms
    burst at step 8, the fault taking effect within step 11 (28.6 ms), ~70 ms from step 12.
    The best fit of all splits is at step 12, with two high values before it (the burst and
    the half step): no rise there. At step 11 the rise parts the values: found there, so the
    rank's usual is its steps before it (the whole baseline made it "late from the first
    steps": structural imbalance)."""
    delay = [-1.3, 5.0, -2.8, -7.1, -4.9, -4.9, 70.0, -2.0, -4.5, 28.6, 78.2, 71.2, 67.8, 67.4,
             71.9, 73.6, 65.9, 72.8, 68.4, 79.9]
    got = lasting_shifts(_series(delay), key="k", first=5, persist=3, bar=pl.lit(17.8))
    assert dict(got.select("k", "_j").iter_rows()) == {0: 9}  # step 11, the tenth value
    # the same without the half step: the best fit is the rise, as before
    assert _rose(_series(delay[:9] + delay[10:]), bar=17.8) == {0: 9}


def test_two_halves_as_far_apart_but_mingled_are_no_rise():
    """Levels 1.2 apart (above the bar of 1), but three of the later values lie among the
    earlier ones: a loaded machine's drift, not a fault that lifted every step after it."""
    mingled = [0.1, -0.3, 0.9, 0.0, -0.2, 0.8, -0.1] + [1.2, 0.3, 1.9, 0.6, 1.5, 0.2, 1.8]
    assert _rose(_series(mingled)) == {}
    # the same values parted: a rise
    parted = [0.1, -0.3, 0.9, 0.0, -0.2, 0.8, -0.1] + [1.2, 1.3, 1.9, 1.0, 1.5, 1.2, 1.8]
    assert _rose(_series(parted)) == {0: 7}


def test_a_short_noisy_run_whose_transfers_drifted_slower_keeps_its_usual_whole():
    """Fourteen steps of a loaded machine's transfers (MB/s), about 2.2x slower in the second
    half by their medians, but with slow steps among the first and fast ones among the last:
    no lasting fall: the usual is the median of all of them."""
    mbps = [21.0, 18.9, 24.1, 11.0, 22.9, 38.8, 21.3, 9.2, 12.1, 10.0, 19.5, 8.8, 20.6, 8.1]
    bw = pl.DataFrame({"pg": ["0"] * len(mbps), "step": list(range(2, 2 + len(mbps))),
                       "MBps": mbps})
    (got,) = usual_bandwidth(bw).iter_rows(named=True)
    assert got["usual_MBps"] == pl.Series(mbps).median(), got

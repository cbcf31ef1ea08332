"""A rank's usual delay follows slow drift and does not absorb a fault (analyzers/_drift.py)."""

from __future__ import annotations

import numpy as np

from ringwatch.analyzers._drift import follow_usual

NOISE_MS = 2.0
ARGS = dict(slack_ms=NOISE_MS, threshold_ms=6 * NOISE_MS, drift_steps=200, persist=3)


def _start(n: int, usual: float = 0.0) -> tuple[np.ndarray, ...]:
    return np.full(n, usual), np.zeros(n), np.full(n, 4), np.ones(n)


def _follow(rank, delays, start, judged, may_move, ratio=None, **over):
    """``follow_usual`` with no compute ratio known (or ``ratio``)."""
    ratio = np.full(rank.shape[0], np.nan) if ratio is None else ratio
    (usual, _), state = follow_usual(rank, delays, ratio, start, judged, may_move,
                                     **{**ARGS, **over})
    return usual, state


def _scan(delays: np.ndarray, **over):
    """(usual in force, usual after, CUSUM after, quiet after) of one rank."""
    n = delays.shape[0]
    ones = np.ones(n, bool)
    in_force, state = _follow(np.zeros(n, np.int64), delays, _start(n), ones, ones, **over)
    return in_force, *state[:3]


def _noise(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, NOISE_MS, n)


def _cusum(excess: np.ndarray) -> np.ndarray:
    out, c = np.empty_like(excess), 0.0
    for i, x in enumerate(excess):
        c = max(0.0, c + x - ARGS["slack_ms"])
        out[i] = c
    return out


def test_a_slow_drift_is_followed_and_never_sums_to_a_straggler():
    n = 3000
    drift = 0.3 * NOISE_MS / 200 * np.arange(n)  # 4.5 noise units over the run
    delays = drift + _noise(n)
    usual, after, cusum, _ = _scan(delays)
    # the usual is where the drift went, within a mean of ~200 steps' noise and its lag
    assert abs(after[-1] - drift[-1]) < NOISE_MS
    assert cusum.max() < ARGS["threshold_ms"]  # never a straggler
    assert np.allclose(cusum, _cusum(delays - usual))  # the sum the detector makes
    # kept from the start, the same usual makes it one: it sums past the threshold
    kept, _, kept_cusum, _ = _scan(delays, drift_steps=0)
    assert np.all(kept == 0.0)
    assert kept_cusum.max() > 10 * ARGS["threshold_ms"]


def test_a_fault_is_not_absorbed_however_long_it_lasts():
    n = 2000
    delays = _noise(n)
    delays[500:] += 5 * NOISE_MS  # a straggler from step 500 to the end
    usual, after, cusum, quiet = _scan(delays)
    # until the sum passes the threshold each step moves the usual by at most
    # threshold / drift_steps; then it holds still to the end
    detected = int(np.argmax(cusum >= ARGS["threshold_ms"]))
    assert 500 <= detected <= 503
    assert after[-1] - after[499] <= (detected - 499) * ARGS["threshold_ms"] / 200 + 1e-9
    assert np.all(np.diff(after[detected + 1:]) == 0)
    assert float(np.mean(delays[-200:] - usual[-200:])) > 4.5 * NOISE_MS
    assert quiet[-1] <= ARGS["persist"]


def test_after_a_fault_ends_the_usual_moves_again():
    n = 1500
    delays = _noise(n) + np.where(np.arange(n) >= 1000, 1.5 * NOISE_MS, 0.0)
    delays[300:600] += 5 * NOISE_MS  # a fault that ends, then a lasting shift below it
    _, after, _, _ = _scan(delays)
    assert np.all(np.diff(after[310:600]) == 0)  # held through the fault
    assert np.any(np.diff(after[620:1000]) != 0)  # moving again once it is over


def test_a_rank_without_a_usual_or_a_step_out_of_reach_keeps_its_state():
    n = 50
    delays = _noise(n) + 10.0
    ones = np.ones(n, bool)
    usual, (after, *_) = _follow(np.zeros(n, np.int64), delays, _start(n, np.nan), ones,
                                 ones)
    assert np.isnan(usual).all() and np.isnan(after).all()
    usual, (after, *_) = _follow(np.zeros(n, np.int64), delays, _start(n), ones,
                                 np.zeros(n, bool))
    assert np.all(usual == 0.0) and np.all(after == 0.0)  # may not move: the baseline's


def test_the_usual_in_force_is_never_below_zero_while_its_mean_is():
    usual, after, _, _ = _scan(_noise(2000) - 3.0)
    assert usual.min() == 0.0
    assert after[-1] < -2.0  # the mean went where the delays are; in force it is 0


def test_ranks_are_independent_and_a_scan_resumes_from_its_state():
    """Scanning steps in two pieces, the second from the first's state, gives the same usual
    as one scan: what the online window does as steps leave it."""
    rng = np.random.default_rng(3)
    ranks, steps, cut = 5, 400, 170
    rank = np.repeat(np.arange(ranks), steps)
    delays = rng.normal(0, NOISE_MS, ranks * steps) + np.tile(np.arange(steps), ranks) * 0.003
    delays[rank == 2] += np.where(np.arange(steps) >= 250, 4 * NOISE_MS, 0.0)
    ones = np.ones(ranks * steps, bool)
    whole, _ = _follow(rank, delays, _start(ranks * steps), ones, ones)
    first = np.tile(np.arange(steps) < cut, ranks)
    k = int(first.sum())
    a, state = _follow(rank[first], delays[first], _start(k), ones[:k], ones[:k])
    last_of = np.flatnonzero(np.r_[rank[first][1:] != rank[first][:-1], True])
    rest = ~first
    b, _ = _follow(rank[rest], delays[rest],
                   tuple(np.repeat(x[last_of], steps - cut) for x in state), ones[rest],
                   ones[rest])
    pieces = np.concatenate([a.reshape(ranks, -1), b.reshape(ranks, -1)], axis=1)
    assert np.allclose(pieces.ravel(), whole)
    # one rank's fault leaves the others' usual alone
    others = rank != 2
    m = int(others.sum())
    alone, _ = _follow(rank[others], delays[others], _start(m), ones[:m], ones[:m])
    assert np.allclose(alone, whole[others])


def test_the_usual_compute_ratio_follows_the_drift_of_a_rank_s_own_work():
    """A rank whose time outside collectives grows slowly is not "busier than its peers" by
    the end (the busy signal's reference drifts with it), while a fault's jump is not
    absorbed: the ratio stands still with the delay's usual."""
    n = 3000
    ones = np.ones(n, bool)
    ratio = 1.0 + 2.0 * np.arange(n) / n + np.random.default_rng(5).normal(0, 0.2, n)
    delays = _noise(n)
    (_, usual_ratio), _ = follow_usual(np.zeros(n, np.int64), delays, ratio, _start(n), ones,
                                       ones, **ARGS)
    assert abs(usual_ratio[-1] - 3.0) < 0.3 and usual_ratio[0] == 1.0
    delays[2000:] += 5 * NOISE_MS  # now a fault: late and twice as busy
    ratio[2000:] *= 2
    (_, usual_ratio), _ = follow_usual(np.zeros(n, np.int64), delays, ratio, _start(n), ones,
                                       ones, **ARGS)
    assert usual_ratio[-1] - usual_ratio[2000] < 0.05

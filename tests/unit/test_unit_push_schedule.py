"""When the agent pushes, and what a push carries: every finished step not yet delivered, early
when a fast job piles them up, in requests of bounded size."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import MetricExportResult

from ringwatch.agent.sidecar import _otlp_export as X
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._points import EARLY_PUSH_STEPS, PUSH_STEPS, unsent_steps
from ringwatch.agent.sidecar._rank_tail import KEEP_STEPS, RankSummary, StepTotals

SECOND = 1_000_000_000
INTERVAL = 10 * SECOND


def _state(ranks: int, finished: int) -> NodeState:
    """``ranks`` ranks of one job, each with steps ``0..finished - 1`` finished (one group)
    and step ``finished`` begun."""
    state = NodeState(host="h")
    for rank in range(ranks):
        s = state.ranks[("job", rank)] = RankSummary(job="job", rank=rank, host="h")
        for k in range(finished + 1):
            s.steps[k] = {"0": StepTotals(count=2, nbytes=1024)}
        s.step = finished
    return state


def _advance(state: NodeState, steps: int) -> None:
    for s in state.ranks.values():
        for k in range(s.step + 1, s.step + steps + 1):
            s.steps[k] = {"0": StepTotals(count=2, nbytes=1024)}
        s.step += steps


class _Exporter:
    """Records each request's (rank, steps) and answers as told (one answer per request)."""

    def __init__(self, answers=()):
        self.requests, self.answers = [], list(answers)

    def export(self, data, timeout_millis=None):
        got = {}
        for rm in data.resource_metrics:
            rank = rm.resource.attributes.get("ringwatch.rank")
            steps = {int(p.attributes["ringwatch.step"]) for sm in rm.scope_metrics
                     for m in sm.metrics if m.name == "ringwatch.step.collective.count"
                     for p in m.data.data_points}
            if rank is not None:
                got[rank] = sorted(steps)
        self.requests.append(got)
        ok = self.answers.pop(0) if self.answers else True
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def shutdown(self):
        pass


def _pusher(state, answers=()):
    p = X.OtlpPusher(state, "http://127.0.0.1:9/v1/metrics", start_ns=0)
    p.exporter = _Exporter(answers)
    return p


def test_the_tail_keeps_twice_what_a_push_carries_and_a_push_more_than_an_early_one_waits():
    assert KEEP_STEPS >= 2 * PUSH_STEPS and PUSH_STEPS >= 3 * EARLY_PUSH_STEPS


def test_a_push_carries_every_finished_step_it_has_not_delivered():
    state = _state(ranks=2, finished=100)  # 100 steps: a 10 s push of 0.1 s steps
    pusher = _pusher(state)
    assert pusher.push(0)
    assert pusher.exporter.requests == [{0: list(range(100)), 1: list(range(100))}]
    _advance(state, 7)
    assert pusher.push(SECOND)
    assert pusher.exporter.requests[-1] == {0: list(range(100, 107)), 1: list(range(100, 107))}


def test_finished_steps_piling_up_make_the_push_come_early_but_not_more_than_once_a_second():
    state = _state(ranks=1, finished=3)
    pusher = _pusher(state)
    assert pusher.due(0, INTERVAL)  # the first push: at once
    assert pusher.push(0)
    _advance(state, EARLY_PUSH_STEPS - 1)
    assert unsent_steps(state, pusher.steps_sent) == EARLY_PUSH_STEPS - 1
    assert not pusher.due(5 * SECOND, INTERVAL)  # too few waiting: the interval's push
    assert pusher.due(INTERVAL, INTERVAL)
    assert pusher.due(INTERVAL - 3_000_000, INTERVAL)  # a tick a few ms early is on time
    _advance(state, 1)
    assert not pusher.due(SECOND // 2, INTERVAL)  # enough wait, but a push half a second ago
    assert pusher.due(SECOND - 3_000_000, INTERVAL)
    assert pusher.push(SECOND) and unsent_steps(state, pusher.steps_sent) == 0
    assert not pusher.due(3 * SECOND, INTERVAL)


def test_no_early_push_while_backing_off_from_failures():
    state = _state(ranks=1, finished=3)
    pusher, every = _pusher(state, answers=[False]), 4 * SECOND
    assert not pusher.push(0, interval_ns=every)  # failed: the next try in one interval
    _advance(state, 2 * EARLY_PUSH_STEPS)
    assert not pusher.due(2 * SECOND, every) and not pusher.due(every - 1, every)
    assert pusher.due(every, every)
    assert pusher.push(every, interval_ns=every)
    assert pusher.exporter.requests[-1] == {0: list(range(3 + 2 * EARLY_PUSH_STEPS))}


def test_a_big_push_goes_as_several_requests_each_rank_whole(monkeypatch):
    monkeypatch.setattr(X, "MAX_POINTS_PER_REQUEST", 3 * 5 * 40)  # 3 ranks' steps a request
    state = _state(ranks=8, finished=40)
    pusher = _pusher(state, answers=[True, False])  # the second request fails
    assert not pusher.push(0)
    first, second = pusher.exporter.requests
    assert set(first) | set(second) <= set(range(8)) and not set(first) & set(second)
    assert all(steps == list(range(40)) for steps in (first | second).values())
    # what the first request delivered is not sent again; the rest is
    assert pusher.push(SECOND)
    again = {r: s for req in pusher.exporter.requests[2:] for r, s in req.items() if s}
    assert set(again) == set(range(8)) - set(first)
    assert all(steps == list(range(40)) for steps in again.values())


@pytest.mark.parametrize("limit", [1, 10, 1000])
def test_request_batches_keep_each_resource_whole_and_in_order(limit):
    from ringwatch.agent.sidecar._points import collect_points

    points = collect_points(_state(ranks=5, finished=4), now_wall_ns=0, steps_after={})
    batches = X.request_batches(points, limit)
    assert [p for b in batches for p in b] == sorted(
        points, key=lambda p: [q.resource for q in points].index(p.resource))
    for b in batches:
        assert len(b) <= limit or len({p.resource for p in b}) == 1
    owners = [{p.resource for p in b} for b in batches]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])

"""The communicator attach point at its seams: CUDA-event timing read by the writer's poll,
members from the object, methods that cannot be named, nothing wrapped without ringwatch."""

from __future__ import annotations

import pytest
import torch

from ringwatch.agent.capture import _communicator as cm
from ringwatch.agent.capture._nccl import poll_works
from ringwatch.agent.capture._state import STATE

from fakes import recorder


class FakeCudaEvent:
    """``torch.cuda.Event`` reduced to what the timing reads: done or not, elapsed ms."""

    def __init__(self, done: bool = False):
        self.done = done

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end) -> float:
        return 0.25  # ms


class Coordinator:
    def __init__(self):
        self.ranks, self.rank_in_group, self.unique_name = [4, 5, 6, 7], 1, "tp:1"
        self.calls = 0

    def all_reduce(self, input_):
        self.calls += 1
        return input_ * 4

    def all_gather(self, input_, dim=-1):
        return torch.cat([input_] * 4, dim=dim)


@pytest.fixture
def rec(monkeypatch):
    r = recorder(rank=5, world_size=8)
    monkeypatch.setattr(STATE, "recorder", r)
    return r


def test_calls_become_rows_of_the_objects_group(rec):
    c = Coordinator()
    restore = cm.attach_communicator(c)
    out = c.all_reduce(torch.ones(8))
    assert float(out[0]) == 4.0 and c.calls == 1
    c.all_gather(torch.ones(2, dtype=torch.float16), dim=0)
    done = rec.drain()
    assert [(e.op, e.seq, e.nbytes_in, e.dtype, e.api, e.async_op) for e in done] == [
        ("all_reduce", 1, 32, "float32", "communicator", False),
        ("all_gather", 2, 4, "float16", "communicator", False)]
    g = done[0].group
    assert (g.name, g.global_ranks, g.group_rank, g.backend) == (
        "tp:1", [4, 5, 6, 7], 1, "custom:Coordinator")
    restore()
    c.all_reduce(torch.ones(8))
    assert rec.drain() == [] and c.calls == 2


def test_a_cuda_call_is_finished_by_the_writers_poll_with_the_device_time(rec, monkeypatch):
    # no GPU here: the tensor says it is on CUDA and the events are stand-ins
    t = torch.ones(4)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: FakeCudaEvent())
    c = Coordinator()
    cm.attach_communicator(c)
    c.all_reduce(t)
    assert rec.drain() == []  # in flight until the device is past its end event
    (ev,) = rec.pending_snapshot()
    assert ev.async_op is True
    poll_works(rec)
    assert rec.drain() == []  # the end event not reached yet
    ev.work.end.done = True
    assert poll_works(rec) == 1
    (done,) = rec.drain()
    assert done.device_ns == 250_000 and done.end_source == "poll"


def test_without_ringwatch_nothing_is_wrapped(monkeypatch):
    monkeypatch.setattr(STATE, "recorder", None)
    c = Coordinator()
    restore = cm.attach_communicator(c)
    assert "all_reduce" not in vars(c)
    restore()


@pytest.mark.parametrize("methods", [("all_reduce", "fused"), {"fused": "not_an_op"}])
def test_a_method_without_an_op_is_refused_before_anything_is_wrapped(rec, methods):
    c = Coordinator()
    c.fused = lambda x: x
    with pytest.raises(ValueError, match="say which op"):
        cm.attach_communicator(c, methods=methods)
    assert "all_reduce" not in vars(c) and rec.groups == {}


def test_members_must_be_known(rec):
    class Bare:
        def all_reduce(self, x):
            return x

    with pytest.raises(ValueError, match="pass ranks"):
        cm.attach_communicator(Bare())
    cm.attach_communicator(Bare(), ranks=[0, 1], rank=0)

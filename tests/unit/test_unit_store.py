"""The service's findings store: lifecycle (open, update, resolve, re-open), identity keys,
Parquet persistence across restarts, corrupt state files, bounds and thread safety."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import polars as pl
import pytest

from ringwatch._clock import FakeClock
from ringwatch.analyzers._findings import Finding
from ringwatch.service._store import FindingsStore

S = 1_000_000_000


def hang(seq: int = 7, ranks=(1,), pg: str = "0", **kw) -> Finding:
    return Finding(kind="hang", cls="never arrived", ranks=ranks, hosts=("h1",), pg=pg,
                   seq=seq, confidence=0.9, since_ns=1, evidence=("rank 1 missing",), **kw)


def straggler(rank: int = 3, cls: str = "compute straggler", **kw) -> Finding:
    return Finding(kind="straggler", cls=cls, ranks=(rank,), hosts=("h2",),
                   local_ranks=(None,), since_step=10, gain_s_per_step=0.25, **kw)


def link(hosts=("h1", "h2"), ranks=(0, 4), pg: str = "3") -> Finding:
    return Finding(kind="slow_link", cls="slow communication", ranks=ranks, hosts=hosts,
                   pg=pg, confidence=0.5, since_step=5)


def whats(changes) -> list[str]:
    return [c.what for c in changes]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_open_update_quiet_resolve_and_reopen_as_new(clock):
    store = FindingsStore(None, clock=clock, resolve_after_s=30)
    (opened,) = store.update("j", [straggler()])
    assert opened.what == "opened" and opened.tracked.state == "open"
    first = opened.tracked.id
    clock.advance(5 * S)
    (upd,) = store.update("j", [straggler(confidence=0.4)])
    assert (upd.what, upd.tracked.id, upd.tracked.updates) == ("updated", first, 1)
    assert upd.tracked.finding.confidence == 0.4
    assert upd.tracked.last_seen_ns == clock.wall_ns()
    clock.advance(29 * S)
    assert store.update("j", []) == []  # quiet for 29 s: still open
    clock.advance(1 * S)
    (res,) = store.update("j", [])
    assert (res.what, res.tracked.id, res.tracked.resolved_ns) == ("resolved", first,
                                                                    clock.wall_ns())
    assert store.current("j", state="open") == []
    clock.advance(S)
    (again,) = store.update("j", [straggler(confidence=0.4)])
    assert again.what == "opened" and again.tracked.id != first
    assert [t.state for t in store.current("j")] == ["resolved", "open"]
    assert whats(store.history("j")) == ["opened", "updated", "resolved", "opened"]


def test_unchanged_report_only_moves_last_seen(clock):
    store = FindingsStore(None, clock=clock)
    store.update("j", [straggler()])
    clock.advance(20 * S)
    assert store.update("j", [straggler()]) == []
    (t,) = store.current("j")
    assert t.last_seen_ns == clock.wall_ns() and t.updates == 0
    clock.advance(20 * S)  # 40 s after opening, 20 s after last seen: still open
    assert store.update("j", []) == [] and store.current("j")[0].state == "open"


def test_until_step_resolves_at_once(clock):
    store = FindingsStore(None, clock=clock)
    store.update("j", [straggler()])
    (res,) = store.update("j", [straggler(until_step=40)])
    assert res.what == "resolved" and res.tracked.finding.until_step == 40
    # The same ended episode reported again by later windows: nothing new.
    assert store.update("j", [straggler(until_step=40)]) == []
    # A new key that already ended: opened and resolved in one round.
    changes = store.update("j", [straggler(rank=5, until_step=12)])
    assert whats(changes) == ["opened", "resolved"]
    assert changes[0].tracked.id == changes[1].tracked.id
    assert len(store.current("j", state="resolved")) == 2
    # A later episode of the same rank is a new occurrence.
    later = replace(straggler(), since_step=90, until_step=95)
    assert whats(store.update("j", [later])) == ["opened", "resolved"]


def test_a_straggler_that_ends_as_a_hiccup_resolves_the_open_one(clock):
    store = FindingsStore(None, clock=clock)
    (o,) = store.update("j", [straggler()])
    # it ends within a few steps: the analyzer now calls it transient, with its end
    (res,) = store.update("j", [straggler(cls="transient straggler", until_step=14)])
    assert (res.what, res.tracked.id) == ("resolved", o.tracked.id)
    assert res.tracked.finding.cls == "transient straggler"
    assert store.current("j", state="open") == [] and len(store.current("j")) == 1


def test_hang_keeps_its_id_while_seq_moves(clock):
    store = FindingsStore(None, clock=clock)
    (o,) = store.update("j", [hang(seq=7)])
    (u,) = store.update("j", [hang(seq=8)])
    assert (u.what, u.tracked.id, u.tracked.finding.seq) == ("updated", o.tracked.id, 8)
    assert store.update("j", [hang(seq=8)]) == []
    (other,) = store.update("j", [hang(seq=8), hang(pg="1")])
    assert other.what == "opened" and other.tracked.id != o.tracked.id


def test_slow_link_is_keyed_by_its_hosts(clock):
    store = FindingsStore(None, clock=clock)
    (o,) = store.update("j", [link()])
    (u,) = store.update("j", [link(hosts=("h2", "h1"), ranks=(0, 4, 8), pg="5")])
    assert (u.what, u.tracked.id) == ("updated", o.tracked.id)
    (n,) = store.update("j", [u.tracked.finding, link(hosts=("h3",))])
    assert n.what == "opened" and n.tracked.id != o.tracked.id


def test_jobs_are_independent(clock):
    store = FindingsStore(None, clock=clock)
    (a,) = store.update("a", [straggler()])
    (b,) = store.update("b", [straggler()])
    assert a.tracked.id != b.tracked.id
    clock.advance(60 * S)
    assert store.update("b", [straggler()]) == []  # b's round does not resolve a's finding
    assert store.current("a")[0].state == "open"
    assert whats(store.update("a", [])) == ["resolved"]
    assert store.current("b")[0].state == "open"
    assert store.jobs() == ["a", "b"]
    assert store.forget_job("a") == 1
    assert store.jobs() == ["b"] and store.history("a") == []


def test_resolve_by_hand(clock):
    store = FindingsStore(None, clock=clock)
    (o,) = store.update("j", [hang()])
    clock.advance(S)
    t = store.resolve(o.tracked.id)
    assert (t.state, t.resolved_ns) == ("resolved", clock.wall_ns())
    assert store.history()[-1].what == "resolved"
    assert store.resolve(o.tracked.id) == t  # already resolved: unchanged, no new change
    assert len(store.history()) == 2
    with pytest.raises(KeyError):
        store.resolve("j:hang:999")
    (again,) = store.update("j", [hang()])  # still reported: a new occurrence
    assert again.what == "opened" and again.tracked.id != o.tracked.id
    with pytest.raises(ValueError):
        store.current(state="closed")


def test_persistence_round_trip(tmp_path, clock):
    store = FindingsStore(tmp_path, clock=clock)
    store.update("j", [hang(), straggler()])
    clock.advance(2 * S)
    store.update("j", [hang(seq=9)])
    store.update("k", [link()])
    store.resolve(store.current("k")[0].id)
    store.close()
    assert (tmp_path / "findings.parquet").exists() and (tmp_path / "history.parquet").exists()
    assert pl.read_parquet(tmp_path / "findings.parquet").schema["ranks"] == pl.List(pl.Int64)

    again = FindingsStore(tmp_path, clock=clock)
    assert again.current() == store.current()
    assert again.history() == store.history()
    assert again.jobs() == ["j", "k"]
    clock.advance(S)
    assert again.update("j", [hang(seq=9), straggler()]) == []  # same identities
    again.flush()  # only last_seen moved: written by flush()
    seen = {t.id: t.last_seen_ns for t in FindingsStore(tmp_path, clock=clock).current("j")}
    assert set(seen.values()) == {clock.wall_ns()}
    (n,) = again.update("j", [hang(pg="2")])
    assert n.tracked.id not in {c.tracked.id for c in store.history()}


def test_changes_are_written_at_most_every_flush_interval(tmp_path, clock):
    store = FindingsStore(tmp_path, clock=clock, flush_interval_s=1.0)
    store.update("j", [hang()])
    store.update("j", [straggler()])  # within the interval: not written yet
    assert len(FindingsStore(tmp_path, clock=clock).current()) == 1
    clock.advance(S)
    store.update("j", [hang(), straggler()])  # no change, but the pending one is due
    assert len(FindingsStore(tmp_path, clock=clock).current()) == 2
    store.update("j", [hang(), straggler(), link()])
    store.flush()
    assert len(FindingsStore(tmp_path, clock=clock).current()) == 3


def test_corrupt_findings_file_is_set_aside(tmp_path, clock, caplog):
    store = FindingsStore(tmp_path, clock=clock)
    store.update("j", [hang()])
    store.close()
    (tmp_path / "findings.parquet").write_bytes(b"not parquet at all")
    with caplog.at_level(logging.WARNING, logger="ringwatch.service"):
        again = FindingsStore(tmp_path, clock=clock)
    assert again.current() == []
    assert [c.what for c in again.history()] == ["opened"]  # the history file was fine
    assert len(list(tmp_path.glob("findings.parquet.corrupt-*"))) == 1
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1
    (n,) = again.update("j", [hang()])
    assert n.tracked.id != store.current()[0].id  # ids still do not collide


def test_history_and_resolved_are_bounded(tmp_path, clock):
    store = FindingsStore(tmp_path, clock=clock, history_limit=5, max_resolved=2)
    for r in range(4):
        store.update("j", [straggler(rank=r, until_step=20)])  # 2 changes each
    assert len(store.history()) == 5
    assert store.history(limit=2) == store.history()[-2:] and store.history(limit=0) == []
    assert [t.finding.ranks for t in store.current("j")] == [(2,), (3,)]
    store.close()
    assert FindingsStore(tmp_path, clock=clock).history() == store.history()


def test_concurrent_update_and_read(clock):
    store = FindingsStore(None, clock=clock, resolve_after_s=0.0)
    errors: list[BaseException] = []
    stop = time.monotonic() + 0.3

    def writer() -> None:
        try:
            i = 0
            while time.monotonic() < stop:
                store.update("j", [hang(seq=i), straggler(rank=i % 5)])
                i += 1
        except BaseException as e:  # noqa: B036 - collected and asserted below
            errors.append(e)

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                store.current("j")
                store.history(limit=10)
        except BaseException as e:  # noqa: B036
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.current("j", state="open")) == 2


def test_memory_only_store_writes_nothing(tmp_path, clock, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = FindingsStore(None, clock=clock)
    store.update("j", [hang()])
    clock.advance(60 * S)
    store.update("j", [])
    store.flush()
    store.close()
    assert list(tmp_path.iterdir()) == []
    assert [c.what for c in store.history()] == ["opened", "resolved"]


def test_a_slow_link_whose_suspects_narrow_stays_one_finding():
    store = FindingsStore(None, clock=FakeClock())
    wide = Finding("slow_link", "slow communication", (0, 2), ("host0", "host2"), since_step=29)
    narrow = Finding("slow_link", "slow communication", (0, 2, 3), ("host2",), since_step=29)
    other = Finding("slow_link", "slow communication", (1,), ("host5",), since_step=40)
    (opened,) = store.update("j", [wide])
    changes = store.update("j", [narrow])
    assert [c.what for c in changes] == ["updated"]
    assert changes[0].tracked.id == opened.tracked.id
    assert changes[0].tracked.finding.hosts == ("host2",)
    assert [c.what for c in store.update("j", [narrow])] == []
    assert [c.what for c in store.update("j", [narrow, other])] == ["opened"]
    assert len(store.current("j", state="open")) == 2


def test_an_operator_resolve_is_written_before_it_returns(tmp_path, clock):
    store = FindingsStore(tmp_path, clock=clock, flush_interval_s=3600)
    (a,) = store.update("j", [hang()])  # the first change is written at once
    (b,) = store.update("j", [straggler()])  # within the interval: only in memory
    assert [t.id for t in FindingsStore(tmp_path, clock=clock).current()] == [a.tracked.id]
    store.resolve(b.tracked.id)  # no flush, no close: as if killed right after the answer
    back = {t.id: t.state for t in FindingsStore(tmp_path, clock=clock).current()}
    assert back == {a.tracked.id: "open", b.tracked.id: "resolved"}
    store.resolve(a.tracked.id, durable=False)  # the analysis loop's own: left to a flush
    back = {t.id: t.state for t in FindingsStore(tmp_path, clock=clock).current()}
    assert back[a.tracked.id] == "open"


def test_a_resolve_that_cannot_be_written_says_so(tmp_path, clock):
    store = FindingsStore(tmp_path, clock=clock)
    (o,) = store.update("j", [hang()])
    (tmp_path / "findings.parquet").unlink()
    (tmp_path / "findings.parquet").mkdir()  # the file cannot be replaced, even by root
    with pytest.raises(OSError):
        store.resolve(o.tracked.id)
    assert store.current("j")[0].state == "resolved"  # in memory all the same


def test_ids_stay_unique_when_both_state_files_are_lost(tmp_path, clock):
    import re

    first = FindingsStore(tmp_path, clock=clock)
    (a,) = first.update("j", [hang()])
    first.close()
    assert re.fullmatch(r"j:hang:[0-9a-z]{6}-1", a.tracked.id), a.tracked.id
    for name in ("findings.parquet", "history.parquet"):
        (tmp_path / name).unlink()
    clock.advance(5 * S)  # a restart takes seconds
    second = FindingsStore(tmp_path, clock=clock)
    (b,) = second.update("j", [hang()])
    assert b.tracked.id != a.tracked.id and b.tracked.id.endswith("-1")
    second.close()
    third = FindingsStore(tmp_path, clock=clock)  # files kept: the counter goes on
    (c,) = third.update("j", [hang(pg="9")])
    assert c.tracked.id.endswith("-2") and c.tracked.id != b.tracked.id

"""The analyzers' thresholds: one frozen object, validated, the detectors' only defaults, and
what ``ringwatch analyze``, ``ringwatch serve`` and its control API set.

The verdict tests use a real run (``tests/data/long/``): 4 Gloo ranks, 400 steps, rank 2 doing
twice the work from step 40 on."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_events, thresholds_from_args
from ringwatch._cli import build_parser, main
from ringwatch._config import ConfigError
from ringwatch.analyzers import DEFAULT_THRESHOLDS, ThresholdError, Thresholds
from ringwatch.analyzers._links import detect_slow_links
from ringwatch.analyzers._moe import detect_moe_skew
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._stragglers import detect_stragglers
from ringwatch.analyzers._thresholds import NAMES, describe, thresholds_markdown
from ringwatch.analyzers._work import detect_work_findings
from ringwatch.service._service import Service, ServiceConfig

from pushes import WALL
from pushes import agent_push as _push

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "data" / "long" / "straggler-work-400.parquet"


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("fn, args", [
    (detect_stragglers, DEFAULT_THRESHOLDS.straggler_args()),
    (detect_slow_links, DEFAULT_THRESHOLDS.link_args()),
    (detect_work_findings, DEFAULT_THRESHOLDS.work_args()),
    (detect_moe_skew, DEFAULT_THRESHOLDS.moe_args()),
])
def test_the_detectors_defaults_are_the_thresholds(fn, args):
    got = _defaults(fn)
    assert set(args) <= set(got), set(args) - set(got)
    assert {k: got[k] for k in args} == args


def test_every_threshold_is_documented_and_the_page_is_current():
    rows = describe()
    assert [n for n, _, _ in rows] == list(NAMES)
    assert all(len(text) > 20 for _, _, text in rows), [n for n, _, t in rows if len(t) <= 20]
    page = REPO / "docs" / "thresholds.md"
    assert page.read_text() == thresholds_markdown(), (
        "docs/thresholds.md is stale: ringwatch schema --thresholds > docs/thresholds.md")


@pytest.mark.parametrize("values, why", [
    ({"bogus": 1}, "unknown threshold"),
    ({"persist_steps": 0}, "integer >= 1"),
    ({"persist_steps": 2.5}, "integer"),
    ({"persist_steps": True}, "integer"),
    ({"cusum_threshold": -1.0}, "> 0"),
    ({"cusum_threshold": math.nan}, "a number"),
    ({"cusum_threshold": "8"}, "a number"),
    ({"min_gain_share": 1.0}, "share below 1"),
    ({"link_ratio": 1.0}, "> 1"),
    ({"min_baseline_steps": 30}, "min_baseline_steps 30 > baseline_steps 20"),
    ({"min_stall_s": 0}, "> 0"),
])
def test_bad_values_are_refused_with_their_name(values, why):
    with pytest.raises(ThresholdError, match=why):
        DEFAULT_THRESHOLDS.with_values(values)


def test_values_are_taken_typed_and_put_back():
    th = DEFAULT_THRESHOLDS.with_values({"persist_steps": 5.0, "min_stall_s": 120,
                                         "min_gain_share": 0})
    assert th.persist_steps == 5 and isinstance(th.persist_steps, int)
    assert th.changed() == {"persist_steps": 5, "min_stall_s": 120, "min_gain_share": 0}
    assert th.stall_s(step_s=1.0) == 120
    back = th.with_values({"persist_steps": None, "min_stall_s": "default"})
    assert back.changed() == {"min_gain_share": 0}
    assert DEFAULT_THRESHOLDS.stall_s(None) == 5.0 and DEFAULT_THRESHOLDS.stall_s(2.0) == 20.0
    with pytest.raises(AttributeError):
        th.persist_steps = 3  # frozen


def test_a_file_then_the_command_line(tmp_path):
    f = tmp_path / "th.toml"
    f.write_text("[thresholds]\ncusum_threshold = 8\npersist_steps = 4\n")
    args = build_parser().parse_args(["analyze", "x", "--thresholds", str(f),
                                      "--threshold", "persist-steps=6"])
    th = thresholds_from_args(args)
    assert th.changed() == {"cusum_threshold": 8, "persist_steps": 6}
    (tmp_path / "top.toml").write_text("min_stall_s = 90\n")
    assert DEFAULT_THRESHOLDS.with_file(tmp_path / "top.toml").min_stall_s == 90
    assert thresholds_from_args(build_parser().parse_args(["analyze", "x"])) is None
    (tmp_path / "bad.toml").write_text("cusum_threshold = [\n")
    for bad in (["--thresholds", str(tmp_path / "bad.toml")],
                ["--thresholds", str(tmp_path / "absent.toml")],
                ["--threshold", "cusum_threshold"], ["--threshold", "persist_steps=x"]):
        with pytest.raises(ConfigError):
            thresholds_from_args(build_parser().parse_args(["analyze", "x", *bad]))
    serve = build_parser().parse_args(["serve", "--thresholds", str(f)])
    assert thresholds_from_args(serve).cusum_threshold == 8


@pytest.fixture(scope="module")
def run():
    ev = pl.read_parquet(RUN)
    return ev, int(ev["t_end_ns"].max())


def _stragglers(ev, now, th=None):
    found, _ = split_hiccups(analyze_events(ev, now_ns=now, thresholds=th))
    return [(f.kind, f.ranks, f.since_step, f.detected_step) for f in found]


def test_the_thresholds_reach_the_detectors(run):
    ev, now = run
    assert _stragglers(ev, now) == [("straggler", (2,), 41, 43)]
    # needing 6 late steps of 7 detects it later, from the same onset
    assert _stragglers(ev, now, Thresholds(persist_steps=6)) == [("straggler", (2,), 41, 46)]
    # a gain of 90% of the step is more than it costs
    assert _stragglers(ev, now, Thresholds(min_gain_share=0.9)) == []
    # a baseline that starts after the onset sees it from the start: among its peers (no
    # pipeline), a straggler since the first step judged
    (kind, ranks, since, _), = _stragglers(ev, now, Thresholds(warmup_steps=50))
    assert (kind, ranks, since) == ("straggler", (2,), 50)


def test_analyze_prints_the_thresholds_it_was_given(tmp_path, capsys):
    assert main(["analyze", str(RUN), "--json", "--threshold", "min_gain_share=0.9"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["thresholds"] == {"min_gain_share": 0.9} and doc["findings"] == []
    assert main(["analyze", str(RUN), "--threshold", "persist_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "thresholds (not the defaults): persist_steps=6" in out
    assert "detected at step 46" in out
    assert main(["analyze", str(RUN), "--threshold", "nope=1"]) == 1
    assert "unknown threshold(s): nope" in capsys.readouterr().err


def test_the_service_takes_any_threshold_and_applies_it_live():
    svc = Service(ServiceConfig(state_dir=None))
    svc.jobs.ingest(_push("j", late_rank=2, late_ms=30.0), WALL)
    svc.analyze_once()
    assert [t.finding.ranks for t in svc.store.current("j")] == [(2,)]
    with pytest.raises(ValueError, match="persist_steps"):
        svc.control(thresholds={"persist_steps": 0.5, "min_stall_s": 9})
    assert svc.settings()["thresholds"] == DEFAULT_THRESHOLDS.to_dict()  # all or nothing
    settings = svc.control(thresholds={"min_gain_share": 0.95, "cusum_threshold": 8})
    assert settings["thresholds"]["cusum_threshold"] == 8
    assert svc.config.thresholds.changed() == {"min_gain_share": 0.95, "cusum_threshold": 8}
    svc.jobs.ingest(_push("k", late_rank=2, late_ms=30.0), WALL)
    svc.analyze_once()
    assert svc.store.current("k") == []  # the new job is judged with the new thresholds
    svc2 = Service(ServiceConfig(state_dir=None, thresholds=Thresholds(min_gain_share=0.95)))
    svc2.jobs.ingest(_push("k", late_rank=2, late_ms=30.0), WALL)
    svc2.analyze_once()
    assert svc2.store.current("k") == []

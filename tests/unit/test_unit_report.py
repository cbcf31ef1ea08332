"""The report's plots (pure figures), their SVG, the page, the terminal summary and the plain
lines, on the real H200 capture where it has what a test needs."""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_job, cmd_analyze, report_lines
from ringwatch._logs import open_job
from ringwatch._report._figures import job_plots, lateness_heatmap, step_starts_ns
from ringwatch._report._html import page_html, report_html
from ringwatch._report._model import Grid, LinePlot, Series
from ringwatch._report._power import power_plots
from ringwatch._report._progress import Bar, progress_for, quiet
from ringwatch._report._svg import nice_ticks, render
from ringwatch._report._term import print_reports
from ringwatch.analyzers import Finding
from ringwatch.collectors._recording import load_recording

H200 = Path(__file__).resolve().parents[1] / "data" / "h200"
LOGS = H200 / "logs" / "train-nccl-idle"
RECORDING = H200 / "nvml-ddp-nccl.jsonl.gz"


@pytest.fixture(scope="module")
def h200():
    events = open_job(LOGS).events(include_pending=True)
    return events, load_recording(RECORDING)


def test_ticks_cover_the_range():
    rng = random.Random(7)
    for _ in range(500):
        lo = rng.uniform(-1e4, 1e4)
        hi = lo + rng.choice([1e-3, 0.7, 13, 480, 9e5])
        ticks = nice_ticks(lo, hi, 6)
        assert ticks[0] <= lo and ticks[-1] >= hi, (lo, hi, ticks)
        assert 2 <= len(ticks) <= 14, (lo, hi, ticks)
        assert ticks == sorted(ticks)


def test_heatmap_bins_many_steps_and_keeps_the_latest_cell():
    ranks, steps = 3, 1000
    late = pl.DataFrame({"rank": [r for _ in range(steps) for r in range(ranks)],
                         "step": [s for s in range(steps) for _ in range(ranks)],
                         "late_ms": [0.0] * (ranks * steps)})
    late = late.with_columns(pl.when((pl.col("rank") == 2) & (pl.col("step") == 777))
                             .then(50.0).otherwise(pl.col("late_ms")).alias("late_ms"))
    g = lateness_heatmap(late)
    assert g.empty is None and len(g.rows) == ranks and len(g.cols) <= 240
    assert "binned" in g.note
    hot = [(i, j) for i, row in enumerate(g.values) for j, v in enumerate(row) if v == 50.0]
    assert len(hot) == 1 and hot[0][0] == 2
    lo, hi = (int(x) for x in g.cols[hot[0][1]].split("-"))
    assert lo <= 777 <= hi  # the bin that holds step 777


def test_power_lines_up_with_the_steps_of_the_same_run(h200):
    events, rec = h200
    steps = step_starts_ns(events)
    assert [s for s, _ in steps] == list(range(150))
    whole, within = power_plots([rec], steps)
    assert whole.empty is None and within.empty is None
    (line,) = whole.series
    # every reading from a second before the first step to a second after the last
    t0 = steps[0][1]
    assert min(line.xs) >= -1.0 and max(line.xs) <= (steps[-1][1] - t0) / 1e9 + 1.5
    assert line.points > 500  # 20 Hz over ~27 s
    # the job sleeps 60 ms of each ~175 ms step on the host: the GPU idles then
    ys = [y for y in within.series[0].ys if y is not None]
    assert len(ys) == 20 and max(ys) > 2 * min(ys), ys


def test_power_says_why_when_the_recording_misses_the_job(h200):
    _, rec = h200
    late_steps = [(s, 10**18 * 2 + s * 10**8) for s in range(5)]  # years after the recording
    plots = power_plots([rec], late_steps)
    assert [p.key for p in plots] == ["power", "power-step"]
    assert all(p.empty and "do not overlap" in p.empty for p in plots)
    assert power_plots([], late_steps) == ()


def test_plots_of_a_one_rank_job_say_why_they_are_empty(h200):
    events, rec = h200
    plots = {p.key: p for p in job_plots(events, (), recordings=[rec])}
    assert plots["lateness"].empty.startswith("one rank")
    assert "no straggler" in plots["timeline-wait"].empty
    html = render(plots["timeline-wait"])
    assert 'data-points="0"' in html and "Nothing to draw: no straggler" in html
    assert plots["bandwidth"].points == 150 and "probe" not in plots
    # the rank's GPU per step from the energy counter: the rank, then its two phases
    per_step = plots["power-per-step"]
    assert [x.name for x in per_step.series] == ["rank 0 (vm gpu0)", "computing (median rank)",
                                                 "in collectives (median rank)"]
    assert per_step.series[0].points >= 140  # of the 150 steps, those the readings cover


def test_svg_draws_what_the_plot_holds():
    line = LinePlot("x", "t", "step", "ms", (Series("a", (0, 1, 2, 3), (1.0, None, 2.0, 3.0)),
                                             Series("b", (0, 1), (4.0, 5.0), highlight=True)))
    html = render(line)
    assert line.points == 5 and 'data-points="5"' in html
    assert html.count('class="series"') == 3  # a's line breaks at the gap
    assert ">step</text>" in html and ">ms</text>" in html
    grid = Grid("g", "t", "receiver", "sender", "MB/s", ("a<b", "c"), ("a<b", "c"),
                ((None, 10.0), (20.0, None)), low_is_bad=True)
    html = render(grid)
    assert html.count('class="cell"') == 2 and "a&lt;b" in html and "a<b" not in html


def test_page_holds_findings_evidence_and_gain():
    f = Finding("straggler", "compute straggler", (3,), ("host1",), since_step=24,
                evidence=("rank 3 came <60> ms late",), gain_s_per_step=0.0627)
    report = {"job_id": "j<1>", "kind": "ringwatch logs", "path": "/x", "ranks": [0, 1],
              "collectives": 10, "as_of_ns": 0, "_findings": (f,), "_hiccups": (),
              "unreadable": ["/x/bad.parquet: unreadable"]}
    page = page_html([report_html(report, ())])
    assert "j&lt;1&gt;" in page and "rank 3 came &lt;60&gt; ms late" in page
    assert "fixing it saves ~62.7 ms per step" in page and "/x/bad.parquet" in page
    assert "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    out = io.StringIO()
    from rich.console import Console

    print_reports([report], console=Console(file=out, force_terminal=True, width=160))
    text = out.getvalue()
    assert "\x1b[" in text and "62.7 ms" in text and "compute straggler" in text
    assert "/x/bad.parquet" in text


def test_piped_output_is_the_plain_lines(capsys):
    args = argparse.Namespace(paths=[str(LOGS)], job=None, online=False, min_stall_s=None,
                              probe=None, json=False, html=None, gpu_recording=None)
    assert cmd_analyze(args) == 0
    out, err = capsys.readouterr()
    assert out == "\n".join(report_lines(analyze_job(open_job(LOGS)))) + "\n"
    assert err == ""  # no bar: stderr is not a terminal


def test_progress_is_quiet_off_a_terminal_and_a_bar_on_one():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    with progress_for(io.StringIO()) as p:
        assert p is quiet
    tty = Tty()
    with progress_for(tty) as bar:
        assert isinstance(bar, Bar)
        bar("reading", 3, 10)
    assert "reading" in tty.getvalue()


def test_the_terminal_says_how_the_job_was_read():
    from rich.console import Console

    report = {"job_id": "j", "kind": "ringwatch logs", "path": "/x", "ranks": [0, 1, 2, 3],
              "collectives": 10, "as_of_ns": 0, "_findings": (), "_hiccups": (),
              "unreadable": [], "steps_from_rhythm": True, "warmup_steps": 6,
              "thresholds": {"cusum_threshold": 8},
              "layout": {"dp": 1, "tp": 2, "pp": 2, "source": "inferred",
                         "text": "dp=1 x tp=2 x pp=2 (inferred)"}}
    out = io.StringIO()
    print_reports([report], console=Console(file=out, force_terminal=False, width=200))
    text = out.getvalue()
    for line in ("steps: the job marks none", "warm-up: the first 6 steps",
                 "thresholds (not the defaults): cusum_threshold=8",
                 "layout: dp=1 x tp=2 x pp=2"):
        assert line in text, (line, text)

"""``ringwatch analyze --html FILE``: one self-contained page (inline CSS and SVG, no script,
nothing fetched when it is viewed) with the findings and the plots of each report."""

from __future__ import annotations

from html import escape
from pathlib import Path

from ringwatch._report._svg import render

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
 margin:0 auto;max-width:1560px;padding:16px 24px;background:#fafafa}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:26px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:14px 0 4px}.meta{color:#555;margin:2px 0}
.finding{background:#fff;border-left:5px solid #d62728;padding:8px 12px;margin:8px 0;
 box-shadow:0 1px 2px #0002}.finding.hang{border-color:#7b1fa2}
.finding.slow_link{border-color:#f28e2b}.finding.imbalance{border-color:#4e79a7}
.finding .head{font-weight:600}.finding li{overflow-wrap:anywhere}
.finding .when{color:#444;font-size:13px}
.gain{color:#b71c1c;font-weight:600}.finding ul{margin:4px 0 0 0;padding-left:20px}
.ok{background:#e8f5e9;border-left:5px solid #43a047;padding:8px 12px}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure.plot{background:#fff;margin:0;padding:8px 10px;box-shadow:0 1px 2px #0002;width:740px;
 box-sizing:border-box}figure.plot svg{width:100%;height:auto;display:block}
figcaption{font-weight:600}.note{color:#555;font-size:12px;margin:2px 0 4px}
.why{color:#8a6d3b;background:#fcf8e3;padding:10px;margin:8px 0}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .axis-name{font-size:12px;fill:#111}
svg .grid{stroke:#e4e4e4}svg .tickmark{stroke:#888}svg .frame{fill:none;stroke:#999}
svg .band{fill:#4e79a7;fill-opacity:.16;stroke:none}
svg .mark{stroke:#555;stroke-dasharray:4 3;stroke-width:1}
.legend{list-style:none;padding:0;margin:4px 0 0;display:flex;flex-wrap:wrap;gap:4px 14px;
 font-size:12px}.legend .hot{font-weight:600}
.swatch{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}
.swatch.band{background:#4e79a733;height:10px}
.swatch.mark{border-top:2px dashed #555;height:0}
ul.files{font-family:ui-monospace,monospace;font-size:12px}
table.clocks td{padding:0 10px 0 0}
"""


def _when(ns) -> str:
    from ringwatch._analyze import _when as when

    return when(ns)


def _long(line: str, most: int = 400) -> str:
    """``line`` escaped; past ``most`` characters (thousands of ranks) the rest folded."""
    if len(line) <= most:
        return escape(line)
    return (f"{escape(line[:most])}… <details><summary>the whole line ({len(line)} "
            f"characters)</summary>{escape(line)}</details>")


def finding_html(f, hiccup: bool = False) -> str:
    from ringwatch._analyze import when_parts

    when = when_parts(f, until=True)
    gain = ""
    if f.gain_s_per_step is not None:
        gain = (f' <span class="gain">fixing it saves ~{f.gain_s_per_step * 1e3:.1f} ms per '
                "step</span>")
    evidence = "".join(f"<li>{_long(e)}</li>" for e in f.evidence)
    return (f'<div class="finding {escape(f.kind)}{" hiccup" if hiccup else ""}">'
            f'<div class="head">{escape(f.headline())}</div>'
            f'<div class="when">{escape(", ".join(when))}{gain}</div>'
            f"<ul>{evidence}</ul></div>")


def _clocks_html(offsets: list[dict]) -> str:
    """The host clock offsets: a table, folded away (with its range shown) beyond a few."""
    clocks = [c for c in offsets if c["error_ns"] != 0]
    if not clocks:
        return ""
    ref = next((c["host"] for c in offsets if c["error_ns"] == 0), "?")
    rows = "".join(
        f"<tr><td>{escape(c['host'])}</td><td>{c['offset_ns'] / 1e6:+.2f} ms</td><td>"
        + (f"±{c['error_ns'] / 1e6:.2f} ms" if c["error_ns"] is not None
           else "windows disagree") + "</td></tr>" for c in clocks)
    table = f'<table class="clocks">{rows}</table>'
    head = f"<h3>Host clocks against {escape(ref)}'s</h3>"
    if len(clocks) <= 8:
        return head + table
    ms = [c["offset_ns"] / 1e6 for c in clocks]
    return (f"{head}<details><summary>{len(clocks)} hosts, offsets from {min(ms):+.2f} to "
            f"{max(ms):+.2f} ms</summary>{table}</details>")


def report_html(report: dict, plots) -> str:
    """One report's section: what was read, findings, hiccups, unreadable files, plots."""
    from ringwatch._analyze import hiccup_lines

    kind = report.get("kind", "ringwatch logs")
    out = [f'<section class="report" data-job="{escape(str(report["job_id"]))}">'
           f'<h2>Job {escape(str(report["job_id"]))}</h2>'
           f'<p class="meta">{escape(kind)}: {escape(str(report["path"]))}</p>'
           f'<p class="meta">{len(report["ranks"])} rank(s), {report["collectives"]} '
           f"collective rows, as of {escape(_when(report['as_of_ns']))}</p>"]
    out.append(_clocks_html(report.get("clock_offsets", [])))
    bad = report.get("unreadable") or []
    if bad:
        out.append(f"<h3>{len(bad)} file(s) could not be read (left out of the analysis)</h3>"
                   '<ul class="files">' + "".join(f"<li>{escape(b)}</li>" for b in bad)
                   + "</ul>")
    findings = report["_findings"]
    if findings:
        out.append(f"<h3>{len(findings)} finding(s)</h3>")
        out += [finding_html(f) for f in findings]
    else:
        out.append('<p class="ok">No findings: no group is stuck, no rank or group slows the '
                   'job beyond its noise.</p>')
    hiccups = report.get("_hiccups", ())
    blocks: list[list[str]] = []
    for line in hiccup_lines(hiccups):  # a heading per tally, then its indented lines
        if line.startswith(" ") and blocks:
            blocks[-1].append(line.strip())
        else:
            blocks.append([line])
    out += [f"<h3>{escape(b[0])}</h3><ul>" + "".join(f"<li>{escape(x)}</li>" for x in b[1:])
            + "</ul>" for b in blocks]
    out.append('<h3>Plots</h3><div class="plots">' + "".join(render(p) for p in plots)
               + "</div></section>")
    return "".join(out)


def page_html(sections: list[str], *, unreadable: list[str] = (), title: str = "") -> str:
    from ringwatch._version import __version__

    head = ""
    if unreadable:
        head = (f"<h3>{len(unreadable)} file(s) could not be read</h3><ul class=\"files\">"
                + "".join(f"<li>{escape(b)}</li>" for b in unreadable) + "</ul>")
    title = title or "ringwatch analyze"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class=\"meta\">ringwatch {escape(__version__)}; "
            "a self-contained page: everything is in this file.</p>"
            + head + "".join(sections) + "</body></html>\n")


def write_html(path: str | Path, reports: list[dict], *, unreadable: list[str] = ()) -> Path:
    """Write the page for ``reports`` (each with its ``_plots``) to ``path``."""
    sections = [report_html(r, r.get("_plots", ())) for r in reports]
    jobs = ", ".join(str(r["job_id"]) for r in reports)
    path = Path(path)
    path.write_text(page_html(sections, unreadable=list(unreadable),
                              title=f"ringwatch analyze: {jobs}"), encoding="utf-8")
    return path


__all__ = ["finding_html", "page_html", "report_html", "write_html"]

"""The ``ringwatch analyze`` summary on a terminal: coloured, findings in a table.

Only for a terminal: piped or redirected, ``ringwatch analyze`` prints the plain lines of
:func:`ringwatch._analyze.report_lines`, which scripts parse.
"""

from __future__ import annotations

KIND_STYLE = {"hang": "bold magenta", "straggler": "bold red", "slow_link": "bold yellow",
              "imbalance": "bold blue"}


def _when(ns) -> str:
    from ringwatch._analyze import _when as when

    return when(ns)


def report_renderables(report: dict) -> list:
    """One report as rich renderables: a header, clocks, unreadable files, a findings table
    with each finding's evidence, the hiccups."""
    from rich.table import Table
    from rich.text import Text

    from ringwatch._analyze import context_lines, hiccup_lines

    kind = report.get("kind", "ringwatch logs")
    head = Text.assemble(("job ", "bold"), (str(report["job_id"]), "bold cyan"),
                         "" if kind == "ringwatch logs" else f" ({kind}, {report['path']})",
                         f": {len(report['ranks'])} rank(s), {report['collectives']} "
                         f"collective rows, as of {_when(report['as_of_ns'])}")
    out: list = [head]
    out += [Text(line, style="dim") for line in context_lines(report)]
    clocks = [c for c in report.get("clock_offsets", []) if c["error_ns"] != 0]
    if len(clocks) > 8:
        ms = [c["offset_ns"] / 1e6 for c in clocks]
        out.append(Text(f"host clocks: {len(clocks)} hosts, offsets from {min(ms):+.2f} to "
                        f"{max(ms):+.2f} ms (--json lists them)", style="dim"))
    elif clocks:
        out.append(Text("host clocks: " + ", ".join(
            f"{c['host']} {c['offset_ns'] / 1e6:+.2f} ms"
            + (f" (±{c['error_ns'] / 1e6:.2f})" if c["error_ns"] is not None
               else " (windows disagree)") for c in clocks), style="dim"))
    bad = report.get("unreadable") or []
    if bad:
        out.append(Text(f"{len(bad)} file(s) could not be read (left out of the analysis):",
                        style="yellow"))
        out += [Text(f"  {line}", style="yellow") for line in bad]
    findings = report["_findings"]
    if not findings:
        out.append(Text("no findings: no group is stuck, no rank or group slows the job "
                        "beyond its noise",
                        style="bold green"))
    else:
        table = Table(title=f"{len(findings)} finding(s)", title_justify="left",
                      show_lines=True, expand=False)
        for name, kw in (("kind", {"no_wrap": True}), ("who", {"no_wrap": True}),
                         ("since step", {"justify": "right"}),
                         ("detected", {"justify": "right"}),
                         ("confidence", {"justify": "right"}),
                         ("saves per step", {"justify": "right", "style": "bold"}),
                         ("evidence", {"ratio": 1, "overflow": "fold"})):
            table.add_column(name, **kw)
        for f in findings:
            who = f.headline().split(": ", 1)[-1]
            table.add_row(
                Text(f"{f.kind} ({f.cls})", style=KIND_STYLE.get(f.kind, "bold")), who,
                "" if f.since_step is None else str(f.since_step),
                "" if f.detected_step is None else str(f.detected_step),
                f"{f.confidence:.2f}",
                "" if f.gain_s_per_step is None else f"{f.gain_s_per_step * 1e3:.1f} ms",
                "\n".join(f"• {e}" for e in f.evidence))
        out.append(table)
    lines = hiccup_lines(report.get("_hiccups", ()))
    if lines:
        out.append(Text(lines[0], style="dim"))
        out += [Text(x, style="dim") for x in lines[1:]]
    return out


def print_reports(reports: list[dict], unreadable: list[str] = (), console=None) -> None:
    """Every report to ``console`` (default: a rich console on stdout)."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    if unreadable:
        console.print(Text(f"{len(unreadable)} file(s) could not be read:", style="yellow"))
        for line in unreadable:
            console.print(Text(f"  {line}", style="yellow"))
    for i, report in enumerate(reports):
        if i:
            console.print()
        for r in report_renderables(report):
            console.print(r)


__all__ = ["print_reports", "report_renderables"]

"""ringwatch itself: the central service's ingest, connections and analysis, and the agents.

The agents export no count of their pushes: a push's arrival is counted by the service that
receives it (OTLP requests by status), and a failed one by the agent (errors, cause
``otlp_export``).
"""

from __future__ import annotations

from ringwatch.dashboards._frame import board, label_var
from ringwatch.dashboards._panels import q, timeseries_panel
from ringwatch.dashboards._series import agent, by, service

REQUESTS = service("ringwatch_serve_requests_total")
RECEIVED = service("ringwatch_serve_received_bytes_total")
POINTS = service("ringwatch_serve_points_total")
REJECTED = service("ringwatch_serve_rejected_points_total")
ACTIVE = service("ringwatch_serve_connections_active")
REFUSED = service("ringwatch_serve_connections_refused_total")
TIMEOUTS = service("ringwatch_serve_request_timeouts_total")
API_REQUESTS = service("ringwatch_serve_api_requests_total")
LAG = service("ringwatch_serve_analysis_lag_seconds")
ANALYSIS = service("ringwatch_serve_analysis_seconds")
ROUNDS = service("ringwatch_serve_analysis_rounds_total")
ERRORS = service("ringwatch_serve_analysis_errors_total")
JOBS = service("ringwatch_serve_jobs")
EVICTED = service("ringwatch_serve_jobs_evicted_total")
AGENT_ERRORS = agent("agent", "errors")
LATE_TICKS = agent("agent", "late_ticks")
AGENT_CPU = agent("agent", "cpu_ns")
LOG_AGE = agent("rank", "log_age_ns")

H = {"host": "$host"}


def build():
    b = board("self", "ringwatch / ringwatch itself",
              "Health of ringwatch: what the central service receives and drops, the "
              "connections it refuses or times out, how far behind its analysis runs, and "
              "the node agents' errors, pushes, timing and CPU.",
              label_var("host", "Agent host", f"label_values({AGENT_CPU.name}, host)",
                        multi=True, description="Host name the agent reports."))
    b.row("Service ingest")
    b.add(timeseries_panel("OTLP pushes received, by status", "Agents' pushes the service "
                           "answered per second, per protocol and status (200: taken).",
                           "reqps", q(by("sum", ["protocol", "code"], REQUESTS.rate()),
                                      "{{protocol}} {{code}}"), min_val=0), w=8)
    b.add(timeseries_panel("Points decoded and rejected", "OTLP data points per second the "
                           "service decoded, and those it rejected.", "cps",
                           q(f"sum({POINTS.rate()})", "decoded"),
                           q(f"sum({REJECTED.rate()})", "rejected"), min_val=0), w=8)
    b.add(timeseries_panel("Bytes received", "OTLP body bytes per second.", "Bps",
                           q(f"sum({RECEIVED.rate()})", "received"), min_val=0), w=8)
    b.row("Connections")
    b.add(timeseries_panel("Connections open", "HTTP connections being handled, per server "
                           "(otlp_http, api).", "none",
                           q(by("max", ["server"], ACTIVE.sel()), "{{server}}"), min_val=0),
          w=8)
    b.add(timeseries_panel("Connections refused and timed out", "Per second, per server: "
                           "connections refused (503) at the connection cap, and requests "
                           "that did not arrive within the read timeout (408).", "cps",
                           q(by("sum", ["server"], REFUSED.rate()), "{{server}} refused"),
                           q(by("sum", ["server"], TIMEOUTS.rate()), "{{server}} timed out"),
                           min_val=0), w=8)
    b.add(timeseries_panel("API requests, by status", "API and /metrics requests answered "
                           "per second, per HTTP status.", "reqps",
                           q(by("sum", ["code"], API_REQUESTS.rate()), "{{code}}"), min_val=0),
          w=8)
    b.row("Analysis")
    b.add(timeseries_panel("Analysis lag per job", "Age of each job's newest push at its "
                           "last analysis.", "s", q(by("max", ["job"], LAG.sel()), "{{job}}"),
                           min_val=0), w=8)
    b.add(timeseries_panel("Analysis duration per job", "How long each job's last analysis "
                           "took.", "s", q(by("max", ["job"], ANALYSIS.sel()), "{{job}}"),
                           min_val=0), w=8)
    b.add(timeseries_panel("Analysis rounds and errors", "Analysis rounds run per second, "
                           "and the analyses that failed.", "cps",
                           q(f"sum({ROUNDS.rate()})", "rounds"),
                           q(f"sum({ERRORS.rate()})", "errors"), min_val=0), w=8)
    b.add(timeseries_panel("Jobs held and evicted", "Jobs the service holds, and jobs it "
                           "dropped (with their state) in each interval to stay within "
                           "--max-jobs.", "none", q(f"sum({JOBS.sel()})", "held"),
                           q(f"sum({EVICTED.increase()})", "evicted"), min_val=0), w=24, h=6)
    b.row("Agents")
    b.add(timeseries_panel("Agent errors, by cause", "Reads or exports each agent could not "
                           "do, per second and cause (otlp_export: a failed push).", "cps",
                           q(by("sum", ["host", "cause"], AGENT_ERRORS.rate(**H)),
                             "{{host}} {{cause}}"), min_val=0), w=8)
    b.add(timeseries_panel("Agent late ticks", "Fast-sampling ticks per second that started "
                           "over a period behind schedule.", "cps",
                           q(by("sum", ["host"], LATE_TICKS.rate(**H)), "{{host}}"),
                           min_val=0), w=8)
    b.add(timeseries_panel("Agent CPU", "CPU time of each agent process, as a share of one "
                           "core.", "percentunit",
                           q(by("sum", ["host"], AGENT_CPU.rate(**H)), "{{host}}"), min_val=0),
          w=8)
    b.add(timeseries_panel("Rank log age", "Seconds since each rank's log was last written, "
                           "as the agent following it sees.", "s",
                           q(by("max", ["host", "job", "rank"], LOG_AGE.sel(**H)),
                             "{{host}} {{job}} rank {{rank}}"), min_val=0), w=24, h=7)
    return b.build()

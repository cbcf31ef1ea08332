"""Fleet: every job, node and GPU at a glance, with links down to the job and node views."""

from __future__ import annotations

from ringwatch.dashboards._frame import board, url
from ringwatch.dashboards._panels import db, dm, q, stat_panel, table_panel, timeseries_panel
from ringwatch.dashboards._series import HW_THROTTLE_BITS, agent, bit, by, per_gpu, service

RANK_STEP = agent("rank", "step")
GPU_INFO = agent("gpu", "info")
SAMPLES = agent("gpu", "samples")
XID = agent("gpu", "xid_total")
ECC_UNCORRECTED = agent("gpu", "ecc_uncorrected_total")
THROTTLE = agent("gpu", "throttle_reasons_mask")
ENERGY = agent("gpu", "energy_mj")
AGENT_CPU = agent("agent", "cpu_ns")
FINDING = service("ringwatch_finding_open")
LAG = service("ringwatch_serve_analysis_lag_seconds")

# One series per GPU (host, gpu, uuid) for each problem, present only while it is one.
XID_NOW = f"{per_gpu(XID.increase())} > 0"
ECC_NOW = f"{per_gpu(ECC_UNCORRECTED.increase())} > 0"
HW_THROTTLE_NOW = per_gpu(" + ".join(bit(THROTTLE.sel(), b) for b in HW_THROTTLE_BITS)) + " > 0"
# A GPU the driver lost (fell off the bus) answers no reading: the agent keeps its identity
# (ringwatch_gpu_info) but counts no sample. There is no "GPU lost" metric; this is it.
LOST_NOW = f"({per_gpu(SAMPLES.increase())} == bool 0) > 0"
PROBLEMS = {"XID": XID_NOW, "uncorrected ECC": ECC_NOW, "HW throttle": HW_THROTTLE_NOW,
            "lost (no reading)": LOST_NOW}


def build():
    b = board("fleet", "ringwatch / Fleet",
              "Jobs, open findings, GPUs with problems and the agents reporting, across the "
              "fleet. Job and host names link to the job and node views.")
    b.builder = (b.builder
                 .link(db.DashboardLink("Job view").type(dm.DashboardLinkType.LINK)
                       .url(url("job")).keep_time(True))
                 .link(db.DashboardLink("Node / GPU view").type(dm.DashboardLinkType.LINK)
                       .url(url("node")).keep_time(True)))
    b.row("Now")
    b.add(stat_panel("Jobs running", "Training jobs with at least one rank whose log an agent "
                     "follows.", "none", q(f"count({by('count', ['job'], RANK_STEP.sel())})",
                                           "jobs")), w=4, h=5)
    b.add(stat_panel("Open findings by kind", "Findings the central service holds open now "
                     "(straggler, hang, slow_link, imbalance).", "none",
                     q(by("count", ["kind"], FINDING.sel()), "{{kind}}"), red_from=1),
          w=8, h=5)
    b.add(stat_panel("GPUs with problems", "GPUs with an XID event or an uncorrected ECC "
                     "error in the last interval, a hardware throttle reason set, or no "
                     "reading at all (lost: fallen off the bus).", "none",
                     q(f"count({' or '.join(f'({e})' for e in PROBLEMS.values())})", "GPUs"),
                     red_from=1), w=4, h=5)
    b.add(stat_panel("Agents up", "Node agents Prometheus scraped last (each always exports "
                     "its own CPU time).", "none", q(f"count({AGENT_CPU.sel()})", "agents")),
          w=4, h=5)
    b.add(stat_panel("GPUs", "GPUs the agents see (identity series: one per GPU).", "none",
                     q(f"count({per_gpu(GPU_INFO.sel())})", "GPUs")),
          w=4, h=5)
    b.row("Jobs and nodes")
    b.add(table_panel(
        "Jobs", "Each job's last step (highest over its ranks), ranks, open findings and the "
        "service's analysis lag. The job links to its view.", "none",
        q(by("max", ["job"], RANK_STEP.sel()), instant=True),
        q(by("count", ["job"], RANK_STEP.sel()), instant=True),
        q(by("count", ["job"], FINDING.sel()), instant=True),
        q(by("max", ["job"], LAG.sel()), instant=True),
        columns={"job": "job", "Value #A": "last step", "Value #B": "ranks",
                 "Value #C": "open findings", "Value #D": "analysis lag"},
        links={"job": ("Job view", url("job", job="${__data.fields.job}"))},
        units={"analysis lag": "s"}))
    b.add(table_panel(
        "Nodes", "GPUs per host and their mean power over the last interval (from the "
        "energy counters). The host links to its node view.", "none",
        q(by("count", ["host"], per_gpu(GPU_INFO.sel())), instant=True),
        q(by("sum", ["host"], per_gpu(ENERGY.rate())), instant=True),
        columns={"host": "host", "Value #A": "GPUs", "Value #B": "power"},
        links={"host": ("Node view", url("node", host="${__data.fields.host}"))},
        units={"power": "watt"}))
    b.row("Problems")
    b.add(timeseries_panel("Open findings by kind", "Open findings of the central service "
                           "over time.", "none",
                           q(by("count", ["kind"], FINDING.sel()), "{{kind}}"), min_val=0))
    b.add(timeseries_panel("GPUs with problems, by kind", "GPUs with each problem over "
                           "time (see 'GPUs with problems').", "none",
                           *(q(f"count({e})", kind) for kind, e in PROBLEMS.items()),
                           min_val=0))
    b.add(table_panel(
        "GPUs with problems", "Per GPU: XID events since its agent started, uncorrected ECC "
        "errors since the driver loaded, hardware throttle reasons set now (count), and 1 if "
        "it gave no reading in the last interval. The host links to the node view.", "none",
        q(by("sum", ["host", "gpu", "uuid"], per_gpu(XID.sel(), "xid")) + " > 0",
          instant=True),
        q(f"{per_gpu(ECC_UNCORRECTED.sel())} > 0", instant=True),
        q(HW_THROTTLE_NOW, instant=True),
        q(LOST_NOW, instant=True),
        columns={"host": "host", "gpu": "gpu", "uuid": "uuid", "Value #A": "XID events",
                 "Value #B": "uncorrected ECC", "Value #C": "HW throttle reasons",
                 "Value #D": "lost"},
        links={"host": ("Node view", url("node", host="${__data.fields.host}",
                                         gpu="${__data.fields.gpu}"))}), w=24)
    return b.build()

"""Power: what each job and node draws, how hard it swings, and the energy of a step.

A job's GPUs are the ones its agent attributes to it (the agent labels a node's GPUs with the
job whose ranks write there), so job power and energy per step exist only where an agent
follows the job's logs. The headroom rows read the agent's window figures (enforced limit minus
the 99th percentile of the power over its power window), the time held down for power or heat,
and each GPU's power while its rank computes and while it is in collectives.
"""

from __future__ import annotations

from ringwatch.dashboards._frame import board, label_var
from ringwatch.dashboards._panels import q, timeseries_panel
from ringwatch.dashboards._series import agent, by, per_gpu

RANK_STEP = agent("rank", "step")
AGENT_CPU = agent("agent", "cpu_ns")
ENERGY = agent("gpu", "energy_mj")
POWER = agent("gpu", "power_instant_mw")
PEAK = agent("gpu", "power_peak_mw")
TROUGH = agent("gpu", "power_min_mw")
LIMIT = agent("gpu", "power_limit_enforced_mw")
P99 = agent("gpu", "power_p99_mw")
HEADROOM = agent("gpu", "power_headroom_mw")
RAMP = agent("gpu", "power_ramp_mw_per_s")
COMPUTE = agent("gpu", "power_compute_mw")
COMM = agent("gpu", "power_comm_mw")
THROTTLE_TIME = agent("gpu", "throttle_time_ns")
#: Violation counters that mean held down for power or heat.
HELD = "~power|board_limit|thermal"

IN_JOB = (("job", "$job"), ("job", "!"))  # the selected jobs, never GPUs of no job
H = {"host": "$host"}
GPU_LEGEND = "{{host}} GPU {{gpu}}"
#: Mean power of each job's GPUs over the interval (W), from their energy counters.
JOB_POWER = by("sum", ["job"], per_gpu(ENERGY.rate(*IN_JOB), "job"))
JOB_STEP_RATE = by("max", ["job"], f"({RANK_STEP.deriv(*IN_JOB)} > 0)")


def build():
    b = board("power", "ringwatch / Power",
              "Job and node power over time (mean power from the GPUs' energy counters), "
              "each GPU's peak-to-trough swing, and the energy of one training step.",
              label_var("job", "Job", f"label_values({RANK_STEP.name}, job)", multi=True,
                        description="Training job id."),
              label_var("host", "Host", f"label_values({AGENT_CPU.name}, host)", multi=True,
                        description="Host name the agent reports."))
    b.row("Jobs")
    b.add(timeseries_panel("Job power", "Mean power of each job's GPUs over the interval "
                           "(their energy counters' rate, each GPU once).", "watt",
                           q(JOB_POWER, "{{job}}"), min_val=0))
    b.add(timeseries_panel("Energy per step", "Energy of the job's GPUs per training step: "
                           "job power over steps per second. Known only where the agent "
                           "follows the job's logs (its GPUs carry the job's label).", "joule",
                           q(f"{JOB_POWER} / on (job) {JOB_STEP_RATE}", "{{job}}"), min_val=0))
    b.row("Nodes")
    b.add(timeseries_panel("Node power", "Mean power of each host's GPUs over the interval.",
                           "watt", q(by("sum", ["host"], per_gpu(ENERGY.rate(**H))), "{{host}}"),
                           min_val=0))
    b.add(timeseries_panel("Node power, instantaneous, and its limit", "Sum of each host's "
                           "GPUs' last instantaneous power, and of their enforced limits "
                           "(dashed).", "watt",
                           q(by("sum", ["host"], per_gpu(POWER.sel(**H))), "{{host}}"),
                           q(by("sum", ["host"], per_gpu(LIMIT.sel(**H))), "{{host}} limit"),
                           min_val=0, dashed=".* limit$"))
    b.row("Swing")
    b.add(timeseries_panel("Peak-to-trough per GPU", "Highest minus lowest instantaneous "
                           "power of each GPU over the agent's power window (default 10 s): "
                           "how hard the training step swings the load.", "watt",
                           q(f"{per_gpu(PEAK.sel(**H))} - {per_gpu(TROUGH.sel(**H))}",
                             GPU_LEGEND), min_val=0))
    b.add(timeseries_panel("Peak and trough per GPU", "The window's highest and lowest "
                           "instantaneous power of each GPU (trough dashed).", "watt",
                           q(per_gpu(PEAK.sel(**H)), GPU_LEGEND + " peak"),
                           q(per_gpu(TROUGH.sel(**H)), GPU_LEGEND + " trough"), min_val=0,
                           dashed=".* trough$"))
    # Grafana has no W/s unit: watts, with "per second" in the title
    b.add(timeseries_panel("Ramp rate per GPU, per second", "Largest change of each GPU's "
                           "instantaneous power between two updates over the power window, "
                           "in watts per second.",
                           "watt", q(per_gpu(RAMP.sel(**H)), GPU_LEGEND), min_val=0))
    b.row("Headroom")
    b.add(timeseries_panel("Headroom per GPU", "Enforced limit minus the 99th percentile of "
                           "each GPU's power over the agent's power window.", "watt",
                           q(per_gpu(HEADROOM.sel(**H)), GPU_LEGEND)))
    b.add(timeseries_panel("Node headroom", "Each host's summed enforced limits minus its "
                           "GPUs' summed 99th percentiles: a lower bound (the GPUs' peaks "
                           "need not coincide; `ringwatch power` gives the quantile of the "
                           "sum).", "watt",
                           q(f"{by('sum', ['host'], per_gpu(LIMIT.sel(**H)))} - "
                             f"{by('sum', ['host'], per_gpu(P99.sel(**H)))}", "{{host}}")))
    b.add(timeseries_panel("Time held down for power or heat", "Share of each interval each "
                           "GPU's clocks were held down by its power cap, the board limit or "
                           "heat (NVML violation counters).", "percentunit",
                           q(per_gpu(THROTTLE_TIME.rate(reason=HELD, **H), "reason"),
                             GPU_LEGEND + " {{reason}}"), min_val=0))
    b.add(timeseries_panel("Power computing and in collectives", "Each GPU's power while its "
                           "rank computes and while it is in collectives (dashed), from the "
                           "energy counter over the agent's phase window and the rank's "
                           "newest collectives. Only GPUs whose rank the agent follows.",
                           "watt", q(per_gpu(COMPUTE.sel(**H)), GPU_LEGEND + " computing"),
                           q(per_gpu(COMM.sel(**H)), GPU_LEGEND + " in collectives"),
                           min_val=0, dashed=".* in collectives$"))
    return b.build()

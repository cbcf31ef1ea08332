"""Pure analyzers over ringwatch's documented polars frames (no I/O, no globals).

Each analyzer splits into ``compute_<metric>(df)`` and ``check_/detect_<thing>(...)`` returning
frozen dataclasses; thresholds are arguments whose defaults are the fields of one frozen object,
:class:`Thresholds` (``_thresholds``). The job analyzers' pass, in order: steps from the rhythm
where the job marks none (``_rhythm``), the job's warm-up (``_warmup``), hangs (``_hangs``),
stragglers and imbalance by lateness within each island of ranks (``_stragglers``, ``_islands``)
or, with a pipeline, by unblocked work per role (``_layout``, ``_work``, ``_replay``), MoE skew
(``_moe``), slow links (``_links``), then the policy that decides what is shown (``_policy``).
"""

from ringwatch.analyzers._capture import (
    ConsistencyReport,
    FrComparison,
    GroupCheck,
    check_consistency,
    compare_flight_recorder,
    compute_collective_signatures,
    compute_signature_bytes,
)
from ringwatch.analyzers._clocks import align_clocks, compute_host_pairs, estimate_clock_offsets
from ringwatch.analyzers._findings import KINDS, Finding
from ringwatch.analyzers._hangs import compute_frontier, detect_hangs
from ringwatch.analyzers._links import (
    compute_group_bandwidth,
    compute_slow_groups,
    detect_slow_links,
    suspect_hosts,
)
from ringwatch.analyzers._online import OnlineWindow
from ringwatch.analyzers._power_headroom import PowerThresholds
from ringwatch.analyzers._power_report import PowerReport, analyze_power
from ringwatch.analyzers._power_throttle import attribute_throttling
from ringwatch.analyzers._probe import detect_probe_links, read_probe_matrix
from ringwatch.analyzers._rhythm import (
    Rhythm,
    assign_rhythm_steps,
    compute_iteration_times,
    infer_rhythm,
)
from ringwatch.analyzers._steps import (
    compute_phase_comm,
    compute_step_comm,
    compute_step_wait,
    phase_masks,
    pivot_step_comm,
)
from ringwatch.analyzers._stragglers import (
    compute_step_lateness,
    compute_straggler_scores,
    detect_stragglers,
)
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS, ThresholdError, Thresholds

__all__ = [
    "ConsistencyReport", "FrComparison", "GroupCheck", "check_consistency",
    "compare_flight_recorder", "compute_collective_signatures", "compute_signature_bytes",
    "compute_phase_comm", "compute_step_comm", "compute_step_wait", "phase_masks",
    "pivot_step_comm", "KINDS", "Finding", "compute_frontier", "detect_hangs",
    "compute_step_lateness", "compute_straggler_scores", "detect_stragglers", "Rhythm",
    "compute_iteration_times", "infer_rhythm", "compute_group_bandwidth",
    "compute_slow_groups", "detect_slow_links", "suspect_hosts", "align_clocks",
    "compute_host_pairs", "estimate_clock_offsets", "OnlineWindow",
    "assign_rhythm_steps", "detect_probe_links", "read_probe_matrix", "PowerThresholds",
    "DEFAULT_THRESHOLDS", "Thresholds", "ThresholdError",
    "PowerReport", "analyze_power", "attribute_throttling",
]

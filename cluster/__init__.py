"""A local multi-host cluster with fault injection: real Gloo training jobs under ``torchrun``
with ringwatch attached, optionally on emulated hosts (network namespaces), and faults applied
from outside the job at a chosen step, with a ground-truth record beside the logs.

Used by the demo, the tests and the detection benchmarks; ``ringwatch cluster`` is its CLI.
"""

from ringwatch.cluster._run import (
    GROUND_TRUTH,
    Cluster,
    RunResult,
    leftovers,
    read_steps,
    run_cluster,
    sweep,
)
from ringwatch.cluster._spec import FAULT_KINDS, ClusterSpec, FaultSpec

__all__ = ["FAULT_KINDS", "GROUND_TRUTH", "Cluster", "ClusterSpec", "FaultSpec", "RunResult",
           "leftovers", "read_steps", "run_cluster", "sweep"]

"""ringwatch's per-node agent, in two parts that run in different places.

* :mod:`ringwatch.agent.capture`: the in-process capture, loaded into every training or serving
  process (by ``ringwatch.attach()`` or ``ringwatch run``): the collective hooks, the recorder
  and the background writer of the per-rank logs.
* :mod:`ringwatch.agent.sidecar`: the node sidecar (``ringwatch agent``), a process of its own
  beside the job: NVML, host and NIC counters, the ranks' log summaries, ``/metrics`` and OTLP.

Public names (the capture's): :func:`attach`, :func:`detach`, :func:`mark_step`,
:func:`attach_communicator`. Importing this
package imports neither torch nor anything of the sidecar.
"""

from __future__ import annotations

from ringwatch.agent.capture import attach, attach_communicator, detach, mark_step

__all__ = ["attach", "attach_communicator", "detach", "mark_step"]

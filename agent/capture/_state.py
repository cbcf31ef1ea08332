"""The agent's process-wide state: one recorder at most, set by ``attach()``.

Library code receives what it needs as arguments; this single slot exists because the patched
``ProcessGroup`` methods are module-level functions called by PyTorch, with no way to pass a
recorder to them.
"""

from __future__ import annotations

from typing import Any


class AgentState:
    """Mutable singleton holding the live recorder and its runtime."""

    __slots__ = ("recorder", "config", "runtime", "patched", "attached", "start_failed", "handles",
                 "untimed_groups", "nccl_untimed", "native", "native_module")

    def __init__(self) -> None:
        self.recorder: Any = None  # Recorder while capturing, else None
        self.config: Any = None  # CaptureConfig
        self.runtime: Any = None  # Runtime (writer thread, exit handlers)
        self.patched: dict[tuple[Any, str], Any] = {}  # (owner, attr) -> original
        self.attached = False
        self.start_failed = False  # recording impossible (unwritable log dir): do not retry
        self.handles: list[Any] = []  # removable hook handles (optimizer step hook)
        #: Process groups created before NCCL work timing was on (no completion hook on them).
        self.untimed_groups: set[Any] = set()
        self.nccl_untimed = False  # the job turned NCCL work timing off: no group is timed
        self.native: Any = None  # NativeFeed while Gloo groups are recorded natively
        self.native_module: Any = None  # the loaded extension (CaptureConfig.native)


STATE = AgentState()

"""Clocks, injected wherever time is read so tests can drive loops instantly."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of time. Both readings are in nanoseconds."""

    def mono_ns(self) -> int:
        """Monotonic clock (CLOCK_MONOTONIC), for intervals."""

    def wall_ns(self) -> int:
        """Wall clock, ns since the Unix epoch, for cross-host alignment."""


class SystemClock:
    """The production clock: ``time.monotonic_ns`` and ``time.time_ns``.

    CPython's ``monotonic_ns`` reads CLOCK_MONOTONIC on Linux, the clock behind C++
    ``std::chrono::steady_clock``, so times handed over by PyTorch's C++ side (NCCL
    completion hooks) are on the same scale.
    """

    mono_ns = staticmethod(time.monotonic_ns)
    wall_ns = staticmethod(time.time_ns)


class FakeClock:
    """A clock that only moves when told to (tests)."""

    def __init__(self, mono_ns: int = 1_000_000_000, wall_ns: int = 1_700_000_000_000_000_000):
        self._mono = mono_ns
        self._offset = wall_ns - mono_ns

    def mono_ns(self) -> int:
        return self._mono

    def wall_ns(self) -> int:
        return self._mono + self._offset

    def advance(self, ns: int) -> None:
        self._mono += int(ns)

"""Figures several analyzers read from the same rows, computed once per frame.

``ringwatch analyze`` and the service's window hand one frame to every detector; several of
them need the job's step time (the hang's stall threshold, the straggler's floors and gain,
the policy's significance, the MoE skew's share) or each rank's first start per step (the
warm-up). Each of those is a pass over every row (millions in a whole log). :func:`per_frame`
keeps a function's result for as long as the frame it was computed from lives: the frame is
the key by identity (frames are never changed in place here), so a new window or a filtered
copy is computed afresh.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

import polars as pl

T = TypeVar("T")

def per_frame(fn: Callable[[pl.DataFrame], T]) -> Callable[[pl.DataFrame], T]:
    """``fn(frame)``, computed once per frame object (held by a weak reference)."""
    held: dict[int, tuple[weakref.ref, T]] = {}

    # no lock: single dict operations are atomic, and a lock would be taken again by a
    # weak reference's callback run while it is held (a frame freed mid-operation)
    def forget(key: int) -> None:
        held.pop(key, None)

    @functools.wraps(fn)
    def cached(frame: pl.DataFrame) -> T:
        key = id(frame)
        hit = held.get(key)
        if hit is not None and hit[0]() is frame:
            return hit[1]
        value = fn(frame)
        ref = weakref.ref(frame, lambda _ref, key=key: forget(key))
        held[key] = (ref, value)
        return value

    cached.held = held  # for tests: what is kept
    return cached


__all__ = ["per_frame"]

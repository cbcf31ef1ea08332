"""In-process capture of collectives (``ringwatch.agent``).

Public names: :func:`attach`, :func:`detach`, :func:`mark_step`. Importing this package does
not import torch; the names load their implementation on first use.
"""

from __future__ import annotations


def attach(**kwargs) -> bool:
    """See :func:`ringwatch.agent._attach.attach`."""
    from ringwatch.agent._attach import attach as _attach

    return _attach(**kwargs)


def detach() -> None:
    """See :func:`ringwatch.agent._attach.detach`."""
    from ringwatch.agent._attach import detach as _detach

    _detach()


def mark_step(step: int | None = None) -> int | None:
    """See :func:`ringwatch.agent._attach.mark_step`."""
    from ringwatch.agent._state import STATE

    rec = STATE.recorder
    return None if rec is None else rec.mark_step(step)


__all__ = ["attach", "detach", "mark_step"]

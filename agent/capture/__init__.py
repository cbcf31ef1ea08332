"""In-process capture of collectives (``ringwatch.agent.capture``): the code that runs inside
the job's processes.

Public names: :func:`attach`, :func:`detach`, :func:`mark_step`, :func:`attach_communicator`.
Importing this package does
not import torch; the names load their implementation on first use.
"""

from __future__ import annotations


def attach(**kwargs) -> bool:
    """See :func:`ringwatch.agent.capture._attach.attach`."""
    from ringwatch.agent.capture._attach import attach as _attach

    return _attach(**kwargs)


def detach() -> None:
    """See :func:`ringwatch.agent.capture._attach.detach`."""
    from ringwatch.agent.capture._attach import detach as _detach

    _detach()


def mark_step(step: int | None = None) -> int | None:
    """See :func:`ringwatch.agent.capture._attach.mark_step`."""
    from ringwatch.agent.capture._state import STATE

    rec = STATE.recorder
    return None if rec is None else rec.mark_step(step)


def attach_communicator(comm, **kwargs):
    """See :func:`ringwatch.agent.capture._communicator.attach_communicator`."""
    from ringwatch.agent.capture._communicator import attach_communicator as _attach

    return _attach(comm, **kwargs)


__all__ = ["attach", "attach_communicator", "detach", "mark_step"]

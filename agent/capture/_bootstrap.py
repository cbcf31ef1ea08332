"""Zero-code attach: what ``ringwatch run``'s ``sitecustomize`` shim calls in every child."""

from __future__ import annotations

import sys

from ringwatch.agent.capture._import_hook import when_imported


def _attach_after_torch(_module) -> None:
    try:
        from ringwatch.agent.capture._attach import attach

        attach()
    except Exception as exc:  # noqa: BLE001 - never break the child's `import torch`
        sys.stderr.write(f"[ringwatch] not attached: {exc}\n")


def install() -> None:
    """Attach as soon as this process imports torch."""
    when_imported("torch", _attach_after_torch)

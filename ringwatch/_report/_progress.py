"""Progress of a long load or analysis: a bar on stderr when stderr is a terminal, else nothing.

Library code reports through a plain callback, ``progress(what, done, total)`` (``total``
``None``: unknown), and never imports rich; :func:`progress_for` builds the callback the
command line passes down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

#: ``(what is being done, units done, units in all or None)``.
ProgressFn = Callable[[str, int, "int | None"], None]


def quiet(what: str, done: int, total: int | None) -> None:
    """Reports nothing (stderr is not a terminal: a log or a pipe)."""


class Bar:
    """One rich progress bar on ``stream``, re-labelled as the work moves on.

    Use as a context manager; calling it updates the bar (the description is ``what``, the
    bar fills ``done`` of ``total``, or pulses when ``total`` is None). Transient: the bar is
    erased when done, leaving the terminal to the report.
    """

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                  BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(file=stream), transient=True)
        self._task = None
        self._what: str | None = None

    def __enter__(self) -> Bar:
        self._progress.start()
        self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, what: str, done: int, total: int | None) -> None:
        self._progress.update(self._task, description=what, completed=done, total=total)
        if what != self._what or done == total:
            # Drawn at once, not at the next of the 10 redraws a second: a stage shorter
            # than that is still seen, and so is its end.
            self._what = what
            self._progress.refresh()


class _Quiet:
    def __enter__(self) -> ProgressFn:
        return quiet

    def __exit__(self, *exc) -> None:
        pass


def progress_for(stream: TextIO | None = None):
    """A context manager giving the progress callback for ``stream`` (default stderr): a
    :class:`Bar` on a terminal, :func:`quiet` otherwise."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return Bar(stream)
    return _Quiet()


__all__ = ["Bar", "ProgressFn", "progress_for", "quiet"]

"""Run a callback right after a module finishes importing, without importing it first.

Used by the zero-code path: ``ringwatch run`` cannot import torch in every child Python process
(2 s, and most children never use it), so it arranges for ``attach()`` to run the moment the
child itself imports torch, before the child's next line sees ``torch.distributed``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


class PostImportFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that finds nothing itself: when ``name`` is being imported, it asks
    the other finders for the spec and wraps that spec's loader's ``exec_module`` so that
    ``callback(module)`` runs after the module body."""

    def __init__(self, name: str, callback: Callable[[object], None]):
        self.name = name
        self.callback = callback
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        orig = loader.exec_module
        finder = self

        def exec_module(module):
            try:
                orig(module)
            finally:
                try:
                    del loader.exec_module  # back to the class's method
                except AttributeError:
                    pass
            finder.remove()
            finder.callback(module)

        loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def when_imported(name: str, callback: Callable[[object], None]) -> None:
    """Call ``callback(module)`` once ``name`` is imported (at once if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    sys.meta_path.insert(0, PostImportFinder(name, callback))

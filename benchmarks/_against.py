"""Another revision's analyzer module, loaded from a file beside the current one, for the
benchmarks that time both interleaved (``--against FILE``)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def load_revision(path: str, name: str) -> ModuleType:
    """The module in ``path`` (e.g. ``git show REV:analyzers/_work.py > /tmp/old_work.py``),
    registered as ``name`` (its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

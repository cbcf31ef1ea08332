"""Importing ringwatch is cheap and inert: no torch/polars for the top package, and no thread,
file or network activity from importing any of its modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGWATCH_", "TORCH"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


TOP_LEVEL = r"""
import json, sys
import ringwatch
heavy = sorted(m for m in ("torch", "polars", "numpy", "pyarrow") if m in sys.modules)
print(json.dumps({"heavy": heavy, "all": sorted(ringwatch.__all__)}))
"""


def test_import_ringwatch_loads_neither_torch_nor_polars(tmp_path):
    out = _run(TOP_LEVEL, tmp_path)
    assert out["heavy"] == []
    assert {"attach", "detach", "mark_step", "read_events", "COLUMNS"} <= set(out["all"])
    assert list(tmp_path.iterdir()) == []


ALL_MODULES = r"""
import importlib, importlib.util, json, os, pkgutil, socket, sys, threading

calls = []

def _spy(name, orig):
    def f(*a, **k):
        calls.append(name)
        return orig(*a, **k)
    return f

for name in ("connect", "connect_ex", "bind", "sendto"):
    setattr(socket.socket, name, _spy(name, getattr(socket.socket, name)))
for name in ("create_connection", "getaddrinfo", "gethostbyname", "create_server"):
    setattr(socket, name, _spy(name, getattr(socket, name)))

import pynvml
nvml_calls = []

def _no_driver(*a, **k):
    nvml_calls.append("nvmlInit")
    raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

pynvml.nvmlInit = pynvml.nvmlInitWithFlags = _no_driver

threads_before = threading.active_count()
meta_path_before = len(sys.meta_path)

import ringwatch

roots = ["ringwatch"]
for sub in ("agent", "analyzers", "collectors", "dashboards"):
    if importlib.util.find_spec("ringwatch." + sub) is not None:
        roots.append("ringwatch." + sub)
names = []
for root in roots:
    pkg = importlib.import_module(root)
    names.append(root)
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, root + ".")]
failed = {}
for name in sorted(set(names)):
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = repr(exc)
import torch.distributed as dist
from ringwatch.agent.capture._state import STATE
wrapped = [n for n, v in vars(dist.ProcessGroup).items() if getattr(v, "_ringwatch", False)]
wrapped += [n for n, v in vars(dist.Work).items() if getattr(v, "_ringwatch", False)]
print(json.dumps({
    "modules": sorted(set(names)), "failed": failed, "net": calls,
    "state": [STATE.attached, STATE.recorder is None, STATE.runtime is None, wrapped],
    "threads": [threads_before, threading.active_count(),
                [t.name for t in threading.enumerate()]],
    "meta_path": [meta_path_before, len(sys.meta_path)],
    "nvml": nvml_calls,
}))
"""


def test_every_module_imports_without_side_effects(tmp_path):
    out = _run(ALL_MODULES, tmp_path)
    assert out["failed"] == {}
    mods = set(out["modules"])
    # The walk really reached every code folder, including the torch-side agent.
    assert {"ringwatch._schema", "ringwatch._logs", "ringwatch.agent.capture._recorder",
            "ringwatch.agent.capture._pg_hooks", "ringwatch.agent.capture._nccl",
            "ringwatch.agent.capture._writer", "ringwatch.agent.sidecar._sidecar",
            "ringwatch.analyzers._capture", "ringwatch.analyzers._steps",
            "ringwatch.collectors._nvml", "ringwatch.collectors._host",
            "ringwatch.agent.sidecar._otlp_export",
            "ringwatch.agent.sidecar._prom_export"} <= mods
    assert out["nvml"] == [], "importing a module initialised NVML"
    before, after, names = out["threads"]
    assert after == before, names
    assert out["net"] == []
    assert out["meta_path"][0] == out["meta_path"][1]  # no import hook installed
    assert list(tmp_path.iterdir()) == [], "importing created files in the working directory"
    # Nothing attached, nothing patched: capture starts only with attach().
    assert out["state"] == [False, True, True, []]

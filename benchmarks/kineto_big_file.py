"""One very large profiler trace: ringwatch's streaming reader, time and peak memory.

    .venv/bin/python benchmarks/kineto_big_file.py --gb 2 [--keep /tmp/big.json]

Writes one rank's trace of about ``--gb`` GB of JSON (plain, or ``--gzip``) by repeating the
events of a real trace (``tests/data/kineto/gloo-ddp-2ranks/rank-0.json.gz``, its times shifted
so that each copy comes after the last), then reads it with ``read_rank_trace`` in a child
process and prints the file's size, the rows found, the wall time and the child's max RSS,
against ``json.load`` of a tenth of it (what loading it whole would cost, per GB).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "data" / "kineto" / "gloo-ddp-2ranks" / "rank-0.json.gz"

READ = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.monotonic()
if sys.argv[2] == "ringwatch":
    from ringwatch.inputs._kineto import read_rank_trace
    n = len(read_rank_trace(Path(sys.argv[1])).rows)
else:
    n = len(json.load(open(sys.argv[1]))["traceEvents"])
print(json.dumps({"rows": n, "s": time.monotonic() - t0,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_big(path: Path, target_bytes: int, gz: bool) -> tuple[int, int]:
    """The trace, ``target_bytes`` of JSON or a little more; (bytes, copies)."""
    doc = json.loads(gzip.decompress(SOURCE.read_bytes()))
    events = doc.pop("traceEvents")
    ts = [e["ts"] for e in events if isinstance(e.get("ts"), (int, float))]
    span = max(ts) - min(ts) + 1000.0
    head = json.dumps(doc)[:-1] + ', "traceEvents": [\n'
    opener = gzip.open if gz else open
    written, copies = 0, 0
    with opener(path, "wt") as f:
        f.write(head)
        first = True
        while written < target_bytes:
            parts = []
            for e in events:
                if e.get("ph") == "M" and copies:
                    continue
                e = dict(e)
                if isinstance(e.get("ts"), (int, float)):
                    e["ts"] = e["ts"] + copies * span
                if e.get("name", "").startswith("ProfilerStep#"):
                    n = int(e["name"].split("#")[1])
                    e["name"] = f"ProfilerStep#{n + 4 * copies}"
                parts.append(json.dumps(e, indent=2))
            text = ("" if first else ",\n") + ",\n".join(parts)
            first = False
            f.write(text)
            written += len(text)
            copies += 1
        f.write("\n]}\n")
    return os.path.getsize(path), copies


def child(path: Path, tool: str) -> dict:
    out = subprocess.run([sys.executable, "-c", READ, str(path), tool], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--gzip", action="store_true", help="write .json.gz")
    p.add_argument("--keep", metavar="FILE", help="write the trace here and keep it")
    args = p.parse_args(argv)
    suffix = ".json.gz" if args.gzip else ".json"
    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / f"rank-0{suffix}"
    try:
        t0 = time.monotonic()
        size, copies = write_big(path, int(args.gb * 1e9), args.gzip)
        print(f"wrote {path}: {size / 1e9:.2f} GB on disk, {copies} copies of the source's "
              f"events ({time.monotonic() - t0:.0f} s)", flush=True)
        rw = child(path, "ringwatch")
        print(f"ringwatch read_rank_trace: {rw['rows']} rows, {rw['s']:.1f} s, "
              f"max RSS {rw['maxrss_mib']:.0f} MiB", flush=True)
        if not args.gzip:
            tenth = path.with_name("tenth.json")
            write_big(tenth, int(args.gb * 1e8), False)
            whole = child(tenth, "json")
            print(f"json.load of a tenth ({os.path.getsize(tenth) / 1e9:.2f} GB): "
                  f"{whole['s']:.1f} s, max RSS {whole['maxrss_mib']:.0f} MiB "
                  f"(~{whole['maxrss_mib'] * 1.048576 / (os.path.getsize(tenth) / 1e6):.1f}x "
                  "the file)")
            tenth.unlink()
    finally:
        if not args.keep and path.exists():
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Every GPU check of ringwatch in one run, on a machine with NVIDIA GPUs, their driver and a
# CUDA build of PyTorch. It never changes the GPUs' settings (no power limit, no clock lock).
#
#   OUT=/some/dir benchmarks/gpu_check.sh        # from the repository root
#
# 1. NCCL capture: benchmarks/nccl_ops.py (every collective API once, sync and async, and DDP's
#    C++-issued bucket all-reduces) with ringwatch attached; each call must be recorded with
#    the device-side duration the NCCL completion hook reports. Then the same attached late,
#    with untimed collectives in flight: the job must go on, every later call recorded.
# 2. A training-like load under `ringwatch run`: the cluster's DDP job on NCCL (--device cuda),
#    a compute-heavy phase, an idle gap, then an idle-heavy phase (host sleeps each step), while
#    `ringwatch agent --record` samples NVML at 20 Hz: the recording lands in
#    $OUT/nvml-recording.jsonl.gz; `ringwatch logs --check` and `ringwatch analyze` read the
#    job's logs back.
# 3. The hot path on CUDA tensors: benchmarks/overhead.py (b) on NCCL, bare vs ringwatch vs
#    torch.profiler, CPU per collective on the calling thread.
#    3b. A stand-in serving communicator (vLLM's GroupCoordinator methods) on CUDA tensors
#    through ringwatch.attach_communicator: each call recorded with its CUDA-event time.
# 4. One `ringwatch agent --once` exposition of the real GPU.
# Output under $OUT: report.txt (everything printed), nvml-recording.jsonl.gz, power-<job>.json
# (`ringwatch power` over the recording and each phase's logs), nccl-ops.json,
# nccl-late-attach.json, hook-cost.json, agent-once.prom, logs.tar.gz (the ringwatch logs of steps 1 and 2).
# Missing Python packages may travel as wheels in .whl/ (installed to a private folder), ringwatch's
# own among them: `pip wheel --no-deps -w .whl .` here, so the GPU machine builds nothing.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
exec > >(tee "$OUT/report.txt") 2>&1
say() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }
PY=${PYTHON:-python3}
SITE="$WORK/site"
fail=0

say "machine"
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,clocks.sm,temperature.gpu \
    --format=csv
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name())'

say "install ringwatch (no dependencies fetched)"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
# ringwatch itself: its wheel when one travels in .whl/ (built from this tree), else from source
if ! compgen -G ".whl/ringwatch-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . || exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
RW="$PY $SITE/bin/ringwatch"
$RW --version || exit 1
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node 1"

say "1. NCCL capture: every collective API and DDP"
LOGS="$WORK/logs"
timeout 180 $TORCHRUN benchmarks/nccl_ops.py --log-dir "$LOGS" --out "$OUT/nccl-ops.json" \
    || fail=1
$RW logs "$LOGS" --job nccl-ops --check || fail=1

say "1b. NCCL capture attached late: 300 untimed all-reduces in flight when ringwatch arrives"
timeout 180 $TORCHRUN benchmarks/nccl_ops.py --log-dir "$LOGS" --late-attach \
    --out "$OUT/nccl-late-attach.json" || fail=1
$RW logs "$LOGS" --job nccl-late-attach --check || fail=1

say "2. training-like load on NCCL with the NVML recording"
$RW agent --record "$OUT/nvml-recording.jsonl.gz" --log-dir "$LOGS" --prometheus off \
    --job-id train-nccl --duration-s 150 &
AGENT=$!
sleep 5  # idle before the job: the GPU's resting power
JOB="-m ringwatch.cluster._job --device cuda --layers 8 --width 4096 --batch 4096"
timeout 120 $RW run --log-dir "$LOGS" --job-id train-nccl -- $TORCHRUN $JOB --steps 400 \
    --result "$WORK/heavy.json" || fail=1
cat "$WORK/heavy.json"
sleep 5  # idle between the phases
timeout 120 $RW run --log-dir "$LOGS" --job-id train-nccl-idle -- $TORCHRUN $JOB --steps 150 \
    --step-sleep-ms 60 --result "$WORK/idle.json" || fail=1
cat "$WORK/idle.json"
sleep 5
kill -TERM "$AGENT"; wait "$AGENT"
ls -la "$OUT/nvml-recording.jsonl.gz"
for job in train-nccl train-nccl-idle; do
    $RW logs "$LOGS" --job "$job" --check || fail=1
    $RW analyze "$LOGS" --job "$job" --gpu-recording "$OUT/nvml-recording.jsonl.gz" || fail=1
    # power: headroom, phase power, energy per step, swing and the cap what-if (docs/power.md)
    $RW power "$OUT/nvml-recording.jsonl.gz" "$LOGS" --job "$job" || fail=1
    $RW power "$OUT/nvml-recording.jsonl.gz" "$LOGS" --job "$job" --json \
        > "$OUT/power-$job.json" || fail=1
done
# (from $WORK: the repository's own ringwatch/ folder must not shadow the installed package)
(cd "$WORK" && "$PY" - "$LOGS") <<'EOF'
import sys

import polars as pl

import ringwatch

for job in ("train-nccl", "train-nccl-idle"):
    df = ringwatch.read_events(f"{sys.argv[1]}/{job}")
    print(job, df.height, "rows")
    with pl.Config(tbl_rows=30, tbl_width_chars=160):
        print(df.group_by("api", "op", "end_source", "status").agg(
            pl.len().alias("rows"),
            pl.col("device_duration_ns").is_not_null().sum().alias("with_device"),
            (pl.col("device_duration_ns").median() / 1e3).alias("device_us_median"),
            (pl.col("duration_ns").median() / 1e3).alias("host_us_median"),
            ((pl.col("duration_ns") - pl.col("device_duration_ns")).median() / 1e3)
            .alias("host_minus_device_us_median")).sort("api", "op"))
EOF

say "3. hook cost per collective on CUDA tensors (NCCL)"
timeout 300 "$PY" benchmarks/overhead.py --skip-step --hook-backend nccl --hook-world 1 \
    --rounds 9 --k 2000 --json "$OUT/hook-cost.json" || fail=1

say "3b. a serving engine's own communicator on CUDA tensors (attach_communicator)"
# a stand-in with vLLM's GroupCoordinator methods whose all_reduce runs a matmul on the GPU
# (no torch.distributed inside, as a custom all-reduce kernel): every call must come back with
# the device time the CUDA events measured
(cd "$WORK" && timeout 120 "$PY" - "$WORK/logs/communicator") <<'EOF' || fail=1
import sys

import torch

import ringwatch


class Coordinator:
    ranks, rank_in_group, unique_name = [0], 0, "tp:0"

    def all_reduce(self, input_):
        return input_ @ input_


import torch.distributed as dist

ringwatch.attach(log_dir=sys.argv[1], job_id="communicator")
# a serving process has torch.distributed up (recording starts with it); one rank here
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
c = Coordinator()
ringwatch.attach_communicator(c)
x = torch.randn(2048, 2048, device="cuda")
for _ in range(50):
    x = c.all_reduce(x) / 2048
torch.cuda.synchronize()
ringwatch.detach()
df = ringwatch.read_events(sys.argv[1], "communicator")
mine = df.filter(df["api"] == "communicator")
timed = mine["device_duration_ns"].drop_nulls()
print("communicator rows", mine.height, "with device time", timed.len(),
      "median device us", timed.median() / 1e3 if timed.len() else None)
assert mine.height == 50 and timed.len() == 50, "every call with its device time"
dist.destroy_process_group()
EOF

say "4. one agent round on the real GPU"
$RW agent --once --log-dir off --prometheus off > "$OUT/agent-once.prom" || fail=1
grep -c '^ringwatch_gpu\|^hw_' "$OUT/agent-once.prom"
head -c 3000 "$OUT/agent-once.prom"

tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
say "done: $( [ $fail = 0 ] && echo every check passed || echo SOME CHECK FAILED )"
exit $fail

"""The native hot path: Gloo groups recorded by a C++ backend wrapper, rows built in bulk.

``_csrc/hotpath.cpp`` is a c10d ``Backend`` that wraps a group's own CPU backend (Gloo) and
writes one fixed-size record per call into a preallocated ring, in C++: no Python, no lock, no
allocation on the calling thread beyond the completion callback on the work's future. It sees
every call that reaches the backend, from Python and from C++ alike (DDP's reducer, functional
collectives), so with it neither the Python front door (``_pg_hooks``) nor the DDP comm hook
(``_ddp``) is installed. NCCL groups are left to the NCCL completion hook, which reports every
work from the watchdog thread without touching the calling thread.

This module builds the extension against the installed torch (``torch.utils.cpp_extension``:
a C++ compiler, Python's headers and ninja; cached per torch version and source), and turns
the drained records into log rows with numpy and polars on the writer thread: sequence numbers
as the Python path gives them (the backend's counter minus this rank's own send/recv; one
counter per (sender, receiver) pair for send/recv), global ranks for roots and peers, the
step in force at issue. Where the extension cannot be built or loaded, :func:`load` says why
once and returns None, and the caller records through the Python hooks instead.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ringwatch._log import warn_once
from ringwatch._schema import COLUMN_NAMES

SOURCE = Path(__file__).with_name("_csrc") / "hotpath.cpp"
ENV_NATIVE_DIR = "RINGWATCH_NATIVE_DIR"
RING_RECORDS = 1 << 17  # per ring: ~10 MB of issue records, several seconds of a busy job
DRAIN_MAX = 1 << 17

# Op codes, in the order of ``rw::Op`` in hotpath.cpp (None: a marker, not a row).
OP_NAMES: tuple[str | None, ...] = (
    "all_reduce", "all_reduce_coalesced", "all_reduce", "broadcast", "reduce", "all_gather",
    "all_gather_into_tensor", "all_gather_coalesced", "all_gather_into_tensor_coalesced",
    "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced", "all_to_all_single", "all_to_all", "send", "recv",
    "recv", "barrier", "monitored_barrier", None, None, None,
)
OP_SEND, OP_RECV, OP_RECV_ANY, OP_MONITORED = 16, 17, 18, 20
OP_BATCH_START, OP_BATCH_END, OP_MONITORED_DONE = 21, 22, 23
_IS_ROW = np.array([name is not None for name in OP_NAMES])
F_ASYNC, F_THREW, F_END_FOLLOWS, F_IN_BATCH, F_BLOCKING = 1, 2, 4, 8, 16
SOURCES = ("future", "wait", "poll")
# A receive or send is blocking when ``dist.send``/``dist.recv`` issued it (the wrappers of
# :func:`blocking_p2p` mark it: F_BLOCKING). One issued otherwise (a reference to the function
# taken before the capture attached, a C++ caller) counts as blocking when the rank waited on it
# before issuing anything else, and within this long of the issuing call's return (a code
# path's gap on the host, not a property of the job's timing).
BLOCKING_WAIT_NS = 1_000_000

_ISSUE_FIELDS = (("mono", "<i8"), ("step", "<i8"), ("seq_before", "<i8"), ("seq_after", "<i8"),
                 ("nbytes_in", "<i8"), ("nbytes_out", "<i8"), ("numel", "<i8"), ("op", "<i4"),
                 ("group", "<i4"), ("peer", "<i4"), ("root", "<i4"), ("dtype", "<i4"),
                 ("flags", "<u4"))
_END_FIELDS = (("id", "<u8"), ("mono_end", "<i8"), ("mono_wait", "<i8"), ("wait_gap", "<i8"),
               ("status", "<i4"), ("source", "<i4"), ("peer", "<i4"))
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}


def build_dir() -> Path:
    """Where the extension is built: ``$RINGWATCH_NATIVE_DIR``, else the user's cache, one
    folder per torch version, Python version and source."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    root = os.environ.get(ENV_NATIVE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ringwatch", "native")
    return Path(root) / tag.replace("+", "_")


def load(*, quiet: bool = False):
    """The extension module, built on first use (about 20 s; ranks of one host share the
    build, one compiles while the others wait). None, with the reason said once, when it
    cannot be built or loaded here."""
    with _LOCK:
        if "module" in _LOADED:
            return _LOADED["module"]
        mod = None
        try:
            mod = _build()
            _check_layout(mod)
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers, another torch ...
            if not quiet:
                warn_once("native", "the native hot path is unavailable "
                          f"({type(exc).__name__}: {str(exc).strip()[:300]}); "
                          "recording through the Python hooks")
            mod = None
        _LOADED["module"] = mod
        return mod


def _build():
    from torch.utils import cpp_extension

    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    name = "ringwatch_hotpath_" + d.name.rsplit("-", 1)[-1]
    return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(d),
                              extra_cflags=["-O2"], verbose=False)


def blocking_p2p(mod, orig):
    """``orig`` (``dist.send`` or ``dist.recv``) marking the send/recv it issues as blocking
    (two calls into the extension, ~0.2 µs, on these two functions only)."""
    import functools

    mark = mod.mark_blocking

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        mark(True)
        try:
            return orig(*args, **kwargs)
        finally:
            mark(False)  # used by the backend call, or none came (a rank not in the group)

    wrapper._ringwatch = True
    return wrapper


def _dtype(fields, offsets, size) -> np.dtype:
    return np.dtype({"names": [n for n, _ in fields], "formats": [f for _, f in fields],
                     "offsets": list(offsets), "itemsize": size})


def _check_layout(mod) -> None:
    lay = mod.layout()
    if len(lay["issue_fields"]) != len(_ISSUE_FIELDS) or len(lay["end_fields"]) != len(
            _END_FIELDS):
        raise RuntimeError("the extension's record layout does not match this module")
    _LOADED["issue"] = _dtype(_ISSUE_FIELDS, lay["issue_fields"], lay["issue_size"])
    _LOADED["end"] = _dtype(_END_FIELDS, lay["end_fields"], lay["end_size"])


def _scalar_names(mod) -> dict[int, str]:
    import torch

    names = {}
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
              torch.complex64, torch.complex128):
        names[int(mod.scalar_type_of(torch.empty(0, dtype=d)))] = str(d).removeprefix("torch.")
    return names


class NativeFeed:
    """The rows of the groups the extension records, for one rank's writer thread.

    Args:
        mod: The loaded extension (:func:`load`).
        recorder: The rank's recorder (identity, issue order, step, counters).
    """

    def __init__(self, mod, recorder):
        self.mod = mod
        self.rec = recorder
        self.groups: list = []  # GroupInfo by the extension's group id
        self.handles: list = []
        self.names = _scalar_names(mod)
        self.issue_dtype: np.dtype = _LOADED["issue"]
        self.end_dtype: np.dtype = _LOADED["end"]
        self.pending: dict[str, np.ndarray] | None = None  # issued, end not seen yet
        self.early = np.zeros(0, dtype=self.end_dtype)  # ends whose issue is not drained yet
        self.drained = -1  # the highest issue id drained so far
        self.stale_ends = 0  # ends of no issue this feed holds (counted, dropped)
        self.rows = 0
        self.lock = threading.Lock()
        mod.start(RING_RECORDS)

    # ---- groups and steps ---------------------------------------------------------------------
    def register(self, pg, info) -> bool:
        """Record ``pg`` (a Gloo group) natively from now on; False if it cannot be."""
        with self.lock:
            gid = len(self.groups)
            if not self.mod.wrap_group(pg, gid):
                return False
            self.groups.append(info)
            self.handles.append(pg)
            info.native = True
            return True

    def set_step(self, step: int | None) -> None:
        self.mod.set_step(self.mod.STEP_NONE if step is None else int(step))

    def release(self) -> None:
        """Give every group its own backend back (detach)."""
        with self.lock:
            for pg in self.handles:
                try:
                    self.mod.unwrap_group(pg)
                except Exception as exc:  # noqa: BLE001
                    warn_once("native_unwrap", f"could not restore a group's backend: {exc!r}")
            self.handles = []

    def counters(self) -> dict[str, int]:
        c = dict(self.mod.counters())
        return {"native_issues_dropped": int(c["issues_dropped"]),
                "native_ends_dropped": int(c["ends_dropped"]) + self.stale_ends,
                "native_rows": self.rows}

    # ---- rows ------------------------------------------------------------------------------------
    def poll(self, *, final: bool = False, grace_s: float = 0.0):
        """Drain the rings: a frame of the rows finished since the last poll (all rows when
        ``final``, the unfinished ones as ``pending``), or None when there are none.

        ``grace_s``: when ``final``, how long rows whose work records its end may take to get
        it (a future's waiter can wake, and the job exit, before the callback has run)."""
        with self.lock:
            self._drain()
            deadline = time.monotonic() + grace_s
            while final and self._awaiting() and time.monotonic() < deadline:
                time.sleep(0.005)
                self._drain()
            return self._take(final=final)

    def _drain(self) -> None:
        while True:
            raw_i, raw_ids, raw_e = self.mod.drain(DRAIN_MAX)
            self._add_issues(np.frombuffer(raw_i, dtype=self.issue_dtype),
                             np.frombuffer(raw_ids, dtype="<u8"))
            self._add_ends(np.frombuffer(raw_e, dtype=self.end_dtype))
            full = len(raw_ids) == 8 * DRAIN_MAX or len(raw_e) == (
                self.end_dtype.itemsize * DRAIN_MAX)
            if not full:
                return

    def _awaiting(self) -> bool:
        """Whether some row still waits for an end that its work will record."""
        p = self.pending
        return p is not None and bool(
            ((p["source"] < 0) & ((p["flags"] & F_END_FOLLOWS) != 0)).any())

    def pending_columns(self):
        """A frame of the rows still in flight (for the pending snapshot), or None."""
        with self.lock:
            p = self.pending
            if p is None or not len(p["id"]):
                return None
            return self._columns(p, np.ones(len(p["id"]), dtype=bool))

    def _add_issues(self, recs: np.ndarray, ids: np.ndarray) -> None:
        if not len(recs):
            return
        self.drained = max(self.drained, int(ids[-1]))
        keep = _IS_ROW[np.clip(recs["op"], 0, len(OP_NAMES) - 1)] & (recs["op"] >= 0) & (
            recs["op"] < len(OP_NAMES))
        seq, peer, root = self._number(recs)
        rows = recs[keep]
        n = len(rows)
        with self.rec.lock:
            first = self.rec.reserve_idx(n)
        new = {
            "id": ids[keep].astype(np.uint64), "idx": np.arange(first, first + n, dtype=np.int64),
            "seq": seq[keep], "peer": peer[keep], "root": root[keep],
            "mono": rows["mono"], "step": rows["step"], "nbytes_in": rows["nbytes_in"],
            "nbytes_out": rows["nbytes_out"], "numel": rows["numel"], "op": rows["op"],
            "group": rows["group"], "dtype": rows["dtype"], "flags": rows["flags"],
            "end": np.full(n, -1, dtype=np.int64), "wait": np.full(n, -1, dtype=np.int64),
            "gap": np.full(n, -1, dtype=np.int64),
            "status": np.zeros(n, dtype=np.int32), "source": np.full(n, -1, dtype=np.int32),
        }
        self.pending = new if self.pending is None else {
            k: np.concatenate([self.pending[k], v]) for k, v in new.items()}
        if len(self.early):
            early, self.early = self.early, np.zeros(0, dtype=self.end_dtype)
            self._add_ends(early)

    def _add_ends(self, ends: np.ndarray) -> None:
        if not len(ends):
            return
        p = self.pending
        if p is None or not len(p["id"]):
            ahead = ends["id"].astype(np.int64) > self.drained
            self.stale_ends += int((~ahead).sum())
            self.early = np.concatenate([self.early, ends[ahead]])
            return
        pos = np.searchsorted(p["id"], ends["id"])
        pos_c = np.minimum(pos, len(p["id"]) - 1)
        hit = p["id"][pos_c] == ends["id"]
        at = pos_c[hit]
        e = ends[hit]
        p["end"][at], p["wait"][at], p["gap"][at] = e["mono_end"], e["mono_wait"], e["wait_gap"]
        p["status"][at], p["source"][at] = e["status"], e["source"]
        for i, src in zip(at.tolist(), e["peer"].tolist(), strict=True):
            if src >= 0 and p["op"][i] == OP_RECV_ANY and p["peer"][i] < 0:
                self._learn_source(p, i, src)
        if not hit.all():
            # An end whose issue is not drained yet waits for it; one whose issue was drained
            # and is not pending any more belongs to nothing this feed holds.
            miss = ends[~hit]
            ahead = miss["id"].astype(np.int64) > self.drained
            self.stale_ends += int((~ahead).sum())
            self.early = np.concatenate([self.early, miss[ahead]])

    def _learn_source(self, p: dict[str, np.ndarray], i: int, src: int) -> None:
        """A receive from any source learnt its sender: its peer, and the next number of
        that pair (as the Python path numbers it, at completion)."""
        g = self.groups[int(p["group"][i])]
        peer = g.to_global(src)
        if peer is None:
            return
        me = g.my_global_rank
        k = g.pair_seq.get((peer, me), 0) + 1
        g.pair_seq[(peer, me)] = k
        p["peer"][i], p["seq"][i] = peer, k

    def _number(self, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequence numbers, peers and roots (global ranks; -1 for none), in record order,
        advancing each group's counters as the Python path does."""
        n = len(recs)
        seq = np.full(n, -1, dtype=np.int64)
        peer = np.full(n, -1, dtype=np.int64)
        root = np.full(n, -1, dtype=np.int64)
        for gid in np.unique(recs["group"]).tolist():
            if not 0 <= gid < len(self.groups):
                continue
            g = self.groups[gid]
            at = np.flatnonzero(recs["group"] == gid)
            r = recs[at]
            table = np.asarray(g.global_ranks, dtype=np.int64)
            ok = (r["peer"] >= 0) & (r["peer"] < g.size)
            peer[at[ok]] = table[r["peer"][ok]]
            ok = (r["root"] >= 0) & (r["root"] < g.size)
            root[at[ok]] = table[r["root"][ok]]
            if (np.isin(r["op"], (OP_MONITORED, OP_MONITORED_DONE, OP_BATCH_START,
                                  OP_BATCH_END)).any()
                    or (r["flags"] & F_IN_BATCH).any()):
                seq[at] = self._number_slowly(g, r, peer[at])
            else:
                seq[at] = self._number_fast(g, r, peer[at])
        return seq, peer, root

    def _number_fast(self, g, r: np.ndarray, peer: np.ndarray) -> np.ndarray:
        p2p = np.isin(r["op"], (OP_SEND, OP_RECV, OP_RECV_ANY))
        before, after = r["seq_before"], r["seq_after"]
        adjust = g.p2p_adjust + np.cumsum(np.where(p2p, after - before, 0))
        seq = np.full(len(r), -1, dtype=np.int64)
        coll = np.flatnonzero(~p2p)
        if len(coll):
            # The backend's counter less this rank's send/recv, and never below the previous
            # number plus one: s_i = max(raw_i, s_(i-1) + 1), i.e. s_i - i is a running max.
            i = np.arange(len(coll))
            raw = np.where(after[coll] >= 0, after[coll] - adjust[coll], -1)
            seq[coll] = np.maximum.accumulate(np.maximum(raw - i, g.coll_seq + 1)) + i
            g.coll_seq = int(seq[coll[-1]])
        g.p2p_adjust = int(adjust[-1])
        if after[-1] >= 0:
            g.last_backend_seq = int(after[-1])
        me = g.my_global_rank
        for i in np.flatnonzero(p2p & (peer >= 0)).tolist():
            src, dst = (me, int(peer[i])) if r["op"][i] == OP_SEND else (int(peer[i]), me)
            k = g.pair_seq.get((src, dst), 0) + 1
            g.pair_seq[(src, dst)] = k
            seq[i] = k
        return seq

    def _number_slowly(self, g, r: np.ndarray, peer: np.ndarray) -> np.ndarray:
        """One record at a time: coalescing blocks and monitored barriers."""
        from ringwatch.agent.capture._pg_hooks import MONITORED_BARRIER_WIDTH

        seq = np.full(len(r), -1, dtype=np.int64)
        me = g.my_global_rank
        for i, (op, before, after, flags) in enumerate(zip(
                r["op"].tolist(), r["seq_before"].tolist(), r["seq_after"].tolist(),
                r["flags"].tolist(), strict=True)):
            if op == OP_BATCH_START:
                g.batch_seq = None
            elif op == OP_BATCH_END:
                if after >= 0:
                    g.coll_seq = max(g.coll_seq, after - g.p2p_adjust)
                    g.last_backend_seq = after
                g.batch_seq = None
            elif op == OP_MONITORED:  # recorded before the call: its numbers, not the counter
                g.coll_seq += MONITORED_BARRIER_WIDTH
                seq[i] = g.coll_seq
            elif op == OP_MONITORED_DONE:  # the rest of the counter's step was its messages
                if before >= 0 and after >= 0:
                    g.p2p_adjust += after - before - MONITORED_BARRIER_WIDTH
            elif op in (OP_SEND, OP_RECV, OP_RECV_ANY):
                if not flags & F_IN_BATCH and before >= 0 and after >= 0:
                    g.p2p_adjust += after - before
                if peer[i] >= 0:
                    src, dst = (me, int(peer[i])) if op == OP_SEND else (int(peer[i]), me)
                    k = g.pair_seq.get((src, dst), 0) + 1
                    g.pair_seq[(src, dst)] = k
                    seq[i] = k
            elif flags & F_IN_BATCH:
                if g.batch_seq is None:
                    g.coll_seq += 1
                    g.batch_seq = g.coll_seq
                seq[i] = g.batch_seq
            else:
                g.coll_seq = max(g.coll_seq + 1, after - g.p2p_adjust)
                seq[i] = g.coll_seq
            if after >= 0 and not flags & F_IN_BATCH:
                g.last_backend_seq = after
        return seq

    def _take(self, *, final: bool):
        p = self.pending
        if p is None or not len(p["id"]):
            return None
        done = (p["source"] >= 0) | ((p["flags"] & F_END_FOLLOWS) == 0)
        if final:
            out, self.pending = p, None
            unfinished = ~done
        else:
            out = {k: v[done] for k, v in p.items()}
            self.pending = {k: v[~done] for k, v in p.items()}
            unfinished = np.zeros(int(done.sum()), dtype=bool)
        if not len(out["id"]):
            return None
        self.rows += len(out["id"])
        return self._columns(out, unfinished)

    def _columns(self, p: dict[str, np.ndarray], unfinished: np.ndarray):
        """Rows ``p`` as a polars frame in schema order (``unfinished``: still in flight),
        built column-wise: per-group values taken by index, sentinels made null by one
        expression pass."""
        import polars as pl

        from ringwatch._schema import polars_schema

        ident = self.rec.identity
        gid = p["group"]
        anchor = self.rec.clock.wall_ns() - self.rec.clock.mono_ns()
        op = p["op"]
        p2p = np.isin(op, (OP_SEND, OP_RECV, OP_RECV_ANY))
        threw = (p["flags"] & F_THREW) != 0
        end = np.where(p["source"] >= 0, p["end"], -1)
        # Send/recv waited on at once: the next thing the rank did after issuing it (an issue,
        # or a wait on another send/recv) was to wait on it. dist.send/dist.recv do exactly
        # that; isend, irecv and batches wait later or on several works in turn.
        waited = (p["source"] == 1) & (p["wait"] >= 0)
        marks = np.sort(np.concatenate([p["mono"], p["wait"][waited]]))
        nxt = marks[np.minimum(np.searchsorted(marks, p["mono"], side="right"), len(marks) - 1)]
        blocking_p2p = p2p & (((p["flags"] & F_BLOCKING) != 0) | (
            waited & (nxt == p["wait"]) & (p["gap"] >= 0) & (p["gap"] <= BLOCKING_WAIT_NS)))
        failed = threw | (p["status"] != 0)

        start = p["mono"]
        nin, nout = p["nbytes_in"], p["nbytes_out"]
        step = np.where(p["step"] == int(self.mod.STEP_NONE), -1, p["step"])
        source = np.where((p["source"] >= -1) & (p["source"] < len(SOURCES)), p["source"], -1)
        num = pl.DataFrame({
            "_gid": gid, "idx": p["idx"], "seq": p["seq"], "_op": op, "is_p2p": p2p,
            "peer": p["peer"], "root": p["root"], "_dtype": p["dtype"], "numel": p["numel"],
            "nbytes_in": nin, "nbytes_out": nout, "nbytes": np.maximum(nin, nout),
            "async_op": np.where(p2p, ~blocking_p2p, (p["flags"] & F_ASYNC) != 0),
            "_status": np.where(unfinished, 2, np.where(failed, np.where(threw, 3, 1), 0)),
            "t_issue_ns": start + anchor, "t_start_ns": start + anchor,
            "t_end_ns": np.where(end >= 0, end + anchor, -1), "mono_start_ns": start,
            "mono_end_ns": end, "duration_ns": np.where(end >= 0, end - start, -1),
            "_source": source + 1, "step": step,
        })
        # Per-group and per-code strings: small tables joined on their code.
        groups = pl.DataFrame({
            "_gid": np.arange(len(self.groups), dtype=gid.dtype),
            "backend": [g.backend for g in self.groups], "pg": [g.name for g in self.groups],
            "pg_desc": [g.desc for g in self.groups],
            "pg_ranks": [g.ranks_spec for g in self.groups],
            "pg_size": [g.size for g in self.groups],
            "group_rank": [g.group_rank for g in self.groups]}, schema_overrides={
            "pg_desc": pl.Utf8})
        codes = {
            "_op": ("op", OP_NAMES), "_dtype": ("dtype", tuple(
                self.names.get(i) for i in range(max(self.names) + 1))),
            "_status": ("status", ("ok", "error", "pending", "error")),
            "_source": ("end_source", ("none",) + SOURCES)}
        df = num.join(groups, on="_gid", how="left")
        for code, (name, values) in codes.items():
            table = pl.DataFrame({code: np.arange(len(values), dtype=num[code].to_numpy().dtype),
                                  name: list(values)}, schema_overrides={name: pl.Utf8})
            df = df.join(table, on=code, how="left")
        nulls = ("seq", "peer", "root", "t_end_ns", "mono_end_ns", "duration_ns", "step")
        df = df.with_columns(
            [pl.when(pl.col(c) >= 0).then(pl.col(c)).otherwise(None).alias(c) for c in nulls]
            + [pl.lit(ident.job_id).alias("job_id"), pl.lit(ident.rank).alias("rank"),
               pl.lit(ident.local_rank).alias("local_rank"),
               pl.lit(ident.world_size).alias("world_size"), pl.lit(ident.host).alias("host"),
               pl.lit(ident.pid).alias("pid"), pl.lit("native").alias("api"),
               pl.when(pl.col("_status") == 3).then(pl.lit("the backend call raised"))
               .when(pl.col("_status") == 1).then(pl.lit("the work failed"))
               .otherwise(None).alias("error"),
               pl.lit(None).alias("device_duration_ns")])
        return df.select(COLUMN_NAMES).cast(polars_schema()).sort("idx")

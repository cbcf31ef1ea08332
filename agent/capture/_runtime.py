"""The agent's background side: a writer thread, and flushing at exit and on SIGTERM.

The writer thread wakes every ``flush_interval_s``: it polls NCCL works that have no completion
hook, notices collectives issued from C++ since the last recorded one, fills them from the
Flight Recorder (rate-limited), writes finished events as a segment and the in-flight ones as
the pending snapshot. Nothing on this path can raise into the job: a failing write is logged
once per cause (a full disk said plainly) and its events are counted as dropped, in
``meta.json`` too; when space comes back, the next flush writes again.

Exit: ``atexit`` and SIGTERM both run one final flush, which also closes in-flight events as
``pending``. A Python SIGTERM handler only runs when the main thread returns to the
interpreter, which a rank stuck in a collective never does; so a wakeup-fd watcher thread also
sees the signal, flushes, and, where SIGTERM would have killed the process (no other handler),
ends it after a short grace period.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

from ringwatch._log import error_counts, warn_once
from ringwatch.agent.capture._recorder import Recorder
from ringwatch.agent.capture._writer import SegmentWriter, disk_full

SIGTERM_GRACE_S = 1.0
FINAL_FLUSH_WAIT_S = 2.0
#: At the final flush, how long ends already due may take to be recorded: a future's waiter
#: can wake, and the job exit, before the callback that records the end has run.
FINAL_END_GRACE_S = 0.2
BACKFILL_RETRIES = 3  # flushes that look again for a collective missing from the FR
CLOSE_WAIT_S = 20.0  # the SIGTERM handler's wait for the watcher's final flush
#: How long a flush waits for the recorder's lock before it writes only its heartbeat.
RECORDER_WAIT_S = 1.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Runtime:
    """Owns the writer thread of one recorder.

    Args:
        recorder: The recorder to drain.
        writer: Where segments go.
        config: ``CaptureConfig``.
        read_seq: ``group handle -> backend counter`` (None where unavailable).
        fr_dump: ``() -> dict | None``, this process's Flight Recorder content.
    """

    def __init__(self, recorder: Recorder, writer: SegmentWriter, config, *, read_seq,
                 fr_dump, native=None):
        self.rec = recorder
        self.writer = writer
        self.config = config
        self.read_seq = read_seq
        self.fr_dump = fr_dump
        self.native = native  # NativeFeed: rows of the natively recorded groups
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        self._last_meta: dict = {}
        self._backfill_due = False
        self._last_backfill = 0.0
        self._closed = False
        self._backfill_tries = 0
        self._close_lock = threading.RLock()
        self.closed_event = threading.Event()  # set once the final flush is written
        self.write_failures = 0  # flushes that could not write everything
        self.write_dropped = 0  # rows lost with them (also in the recorder's ``dropped``)
        self.write_disk_full = False  # whether any of them failed on a full disk
        self.write_error: str | None = None  # the latest failure, one line
        self.thread = threading.Thread(target=self._loop, name="ringwatch-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def request_backfill(self) -> None:
        """Ask for a Flight Recorder read at the next wake-up (e.g. after DDP's init)."""
        self._backfill_due = True
        self._wake.set()

    def _loop(self) -> None:
        try:
            import polars  # noqa: F401 - pay the import now, not at the first flush
        except Exception as exc:  # noqa: BLE001
            warn_once("polars", f"polars unavailable, logs cannot be written: {exc!r}")
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        """Write what is finished (and, if ``final``, close what is still in flight)."""
        # The final flush may run in a signal handler on the main thread while the writer
        # thread, inside its own flush, waits for the recorder lock that the interrupted main
        # thread holds: waiting for the writer would never end, so the final flush goes on
        # without it after a short wait (the writer is frozen behind the main thread anyway).
        got = self._flush_lock.acquire(timeout=FINAL_FLUSH_WAIT_S if final else -1)
        try:
            self._flush(final)
        finally:
            if got:
                self._flush_lock.release()

    def _flush(self, final: bool) -> None:
        rec = self.rec
        if not final and not self._recorder_free():
            self._heartbeat()
            return
        try:
            if any(e.work is not None for e in list(rec.pending.values())):
                from ringwatch.agent.capture._nccl import poll_works

                poll_works(rec)
            for g in rec.groups_snapshot():
                if g.handle is not None and not g.nccl_hook and not g.native:
                    rec.check_tail(g, self.read_seq(g.handle))
            self._maybe_backfill(final)
        except Exception as exc:  # noqa: BLE001
            warn_once("flush_prep", f"flush bookkeeping failed: {exc!r}")
        # one grace for both paths: ends already due may take this long in all
        deadline = time.monotonic() + FINAL_END_GRACE_S
        while final and rec.ends_due() and time.monotonic() < deadline:
            time.sleep(0.005)
        native = None
        if self.native is not None:
            try:
                native = self.native.poll(
                    final=final, grace_s=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001
                warn_once("native_poll", f"could not read the native records: {exc!r}")
        events = rec.drain()
        if final:
            events.extend(rec.finish_pending())
        w = self.writer
        failed: list[Exception] = []
        written = w.rows_written
        for write in (lambda: w.write(events, native),
                      lambda: w.write_pending([] if final else rec.pending_snapshot(),
                                              None if final else self._native_pending()),
                      lambda: w.compact() if final and w.small else None):
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - disk full, folder removed, ...
                failed.append(exc)
        # The events are lost only when their segment is not on disk (a failed compaction
        # or pending snapshot loses nothing).
        lost = (len(events) + (0 if native is None else len(native))
                if w.rows_written == written else 0)
        if failed:
            self._write_failed(next((e for e in failed if disk_full(e)), failed[0]), lost)
        try:
            w.write_meta(self._meta(final))
        except Exception as exc:  # noqa: BLE001
            if not failed:
                self._write_failed(exc, 0)
            return
        if self.write_failures and not failed and w.rows_written > written:
            warn_once("write_back", f"log writes to {w.dir} succeed again; "
                      f"{self.write_dropped} rows were dropped meanwhile (meta.json says so)")

    def _native_pending(self):
        return None if self.native is None else self.native.pending_columns()

    def _write_failed(self, exc: Exception, lost: int) -> None:
        """Count one flush whose writes failed, and say why (once per cause)."""
        self.write_failures += 1
        self.write_dropped += lost
        self.rec.dropped += lost
        full = disk_full(exc)
        self.write_disk_full |= full
        self.write_error = "disk full" if full else _one_line(exc)
        if full:
            warn_once("write_full", f"log folder {self.writer.dir} is full (no space left on "
                      f"device): {self.write_dropped} rows dropped, the job goes on")
        else:
            warn_once("write", f"cannot write logs to {self.writer.dir}: {_one_line(exc)}; "
                      f"{self.write_dropped} rows dropped, the job goes on")

    def _maybe_backfill(self, final: bool) -> None:
        if not self.config.fr_backfill:
            return
        now = time.monotonic()
        if not (final or self._backfill_due
                or now - self._last_backfill >= self.config.fr_backfill_interval_s):
            return
        gaps = self.rec.take_gaps()
        if not gaps:
            return
        from ringwatch.agent.capture._backfill import backfill

        self._backfill_due = False
        self._last_backfill = now
        dump = None
        try:
            dump = self.fr_dump()
        except Exception as exc:  # noqa: BLE001
            warn_once("fr_dump", f"cannot read the Flight Recorder: {exc!r}")
        n = sum(len(v) for v in gaps.values())
        # The FR can lag the backend's counter: look again at the next flushes before
        # settling for a placeholder.
        self._backfill_tries += 1
        give_up = final or self._backfill_tries > BACKFILL_RETRIES
        found, missed = backfill(self.rec, gaps, dump, give_up=give_up)
        if missed:
            self.rec.return_gaps(missed)
            self._backfill_due = True
            return
        self._backfill_tries = 0
        if found < n:
            warn_once("fr_missing", f"{n - found} collective(s) issued outside ringwatch's "
                      "hooks were not in the Flight Recorder (TORCH_FR_BUFFER_SIZE?)")

    def _recorder_free(self) -> bool:
        """Whether the recorder's lock can be had within :data:`RECORDER_WAIT_S`. Hooks hold
        it for microseconds, unless the main thread froze inside one (a signal handler that
        never returns, a debugger's breakpoint): a flush would then wait behind it for good,
        and with no heartbeat the rank would read as stopped while only its main thread is.
        (A hook that freezes in the microseconds between this check and the flush's own use
        of the recorder still stops the flushes.)"""
        if not self.rec.lock.acquire(timeout=RECORDER_WAIT_S):
            return False
        self.rec.lock.release()
        return True

    def _heartbeat(self) -> None:
        """``meta.json`` as last written with this flush's time: the agent runs; its
        recorder is held (rows wait for the next flush that can have it)."""
        warn_once("recorder_held", "the recorder has been held for over "
                  f"{RECORDER_WAIT_S:g} s (the main thread stopped inside a hook?): flushes "
                  "write only their heartbeat until it is free")
        try:
            self.writer.write_meta({**self._last_meta, "recorder_held": True,
                                    "written_ns": self.rec.clock.wall_ns()})
        except Exception as exc:  # noqa: BLE001
            self._write_failed(exc, 0)

    def _meta(self, final: bool) -> dict:
        self._last_meta = self._meta_now(final)
        return self._last_meta

    def _meta_now(self, final: bool) -> dict:
        return {
            "groups": [g.describe() for g in self.rec.groups_snapshot()],
            "counters": self.rec.counters() | (
                self.native.counters() if self.native is not None else {}),
            "write_failures": self.write_failures,
            "write_dropped": self.write_dropped,
            "write_disk_full": self.write_disk_full,
            "write_error": self.write_error,
            "warnings": error_counts(),
            "final": final,
            "written_ns": self.rec.clock.wall_ns(),  # a heartbeat: the flush's wall time
            "config": {k: str(v) for k, v in dataclasses.asdict(self.config).items()},
        }

    def save_flight_recorder(self) -> Path | None:
        """Copy this process's Flight Recorder beside the log (at exit)."""
        try:
            dump = self.fr_dump()
        except Exception as exc:  # noqa: BLE001
            warn_once("fr_save", f"cannot read the Flight Recorder: {exc!r}")
            return None
        if not dump:
            return None
        try:
            return self.writer.write_flight_recorder(json.dumps(dump))
        except Exception as exc:  # noqa: BLE001
            why = ("its log folder is full (no space left on device)" if disk_full(exc)
                   else _one_line(exc))
            warn_once("fr_save", f"cannot save the Flight Recorder: {why}")
            return None

    def close(self, *, wait: bool = True) -> bool:
        """Stop the thread and write everything (idempotent, never raises).

        SIGTERM can reach it from two threads at once (the watcher thread and the handler on
        the main thread): a second caller waits until the first has written everything, or,
        with ``wait=False``, returns False at once.
        """
        if not self._close_lock.acquire(blocking=wait):
            return False
        try:
            if not self._closed:
                self._closed = True
                self._close()
            return True
        finally:
            self._close_lock.release()

    def _close(self) -> None:
        try:
            self._stop.set()
            self._wake.set()
            if self.thread.is_alive() and threading.current_thread() is not self.thread:
                self.thread.join(timeout=5.0)
            self.flush(final=True)
            if self.config.fr_dump:
                self.save_flight_recorder()
            self.writer.release_reserve()  # (the final meta gave it up unless it failed early)
            self.rec.closed = True
            self.rec.release()
            if self.native is not None:  # the groups get their own backends back
                self.native.release()
        except Exception as exc:  # noqa: BLE001
            warn_once("close", f"final flush failed: {exc!r}")
        finally:
            self.closed_event.set()


class ExitHandlers:
    """atexit + SIGTERM flushing for one runtime (install from the main thread)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.prev_handler = None
        self._watch_r: int | None = None

    def install(self) -> None:
        atexit.register(self.runtime.close)
        if threading.current_thread() is not threading.main_thread():
            warn_once("sigterm", "attach() called off the main thread: SIGTERM will not flush "
                      "the log (atexit still does)")
            return
        try:
            prev = signal.getsignal(signal.SIGTERM)
            if prev is signal.SIG_IGN:
                return
            self.prev_handler = prev
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except (ValueError, OSError) as exc:
            warn_once("sigterm", f"cannot handle SIGTERM: {exc}")
            return
        self._install_watcher()

    def _install_watcher(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return
        if old != -1:  # someone (asyncio) owns the wakeup fd: leave it to them
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._watch_r = r
        threading.Thread(target=self._watch, name="ringwatch-sigterm", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._watch_r, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self.runtime.close()
                if self.prev_handler in (signal.SIG_DFL, None):
                    # The main thread will normally re-raise SIGTERM itself; if it is stuck
                    # in a collective it cannot, so end the process as SIGTERM would have.
                    time.sleep(SIGTERM_GRACE_S)
                    os._exit(128 + signal.SIGTERM)
                return

    def _on_sigterm(self, signum, frame) -> None:
        prev = self.prev_handler
        if not self.runtime.close(wait=False):
            # The watcher thread is writing the final flush. It may need the recorder lock
            # that this interrupted thread holds: then return and let it finish (it ends the
            # process); otherwise wait for it, so that nothing runs unrecorded meanwhile.
            if self.runtime.rec.lock._is_owned():
                if prev in (signal.SIG_DFL, None):
                    return
            else:
                self.runtime.closed_event.wait(CLOSE_WAIT_S)
        if callable(prev):
            prev(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

"""One run at a time per output folder: OUTPUT/_lock.json names the run that holds it.

Two runs writing the same output would commit the same shards twice. A lock is stale (taken
over) when its run's process is gone from this host, or when it has not been refreshed for
STALE_AFTER_S (a machine that died, or a run paused, on any host).

The lock's run id is also a fencing token: before every commit record, manifest write and
cleanup (and before a worker writes a data file) the run reads the lock back and stops if
it is no longer its own, so a run that was paused past the stale limit and then resumed
cannot write over the run that took over. (pyarrow offers no conditional writes, so a write
racing the takeover within one read-to-write gap, milliseconds, is not excluded.)
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import time

import pyarrow.fs as pafs

from pipeline.engine.processes import identity_alive, process_identity
from pipeline.errors import InputError, LostLockError  # noqa: F401 (LostLockError: re-exported)
from pipeline.io.store_retry import Policy, StoreUnavailableError

LOCK = "_lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class OutputBusyError(InputError):
    """Another live run holds the output folder."""


def read_holder(fs: pafs.FileSystem, root: str) -> dict | None:
    """The lock's content, None when nobody holds it, {} when it is not whole JSON. A store
    that keeps failing raises StoreUnavailableError (an OSError): that is no evidence of
    who holds the lock."""
    try:
        with fs.open_input_stream(posixpath.join(root, LOCK)) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def check_holder(fs: pafs.FileSystem, root: str, run_id: str) -> None:
    """The fencing check: raise LostLockError when the lock names another run or is gone.
    A lock that cannot be read (the store keeps failing, or its content is not whole after
    a few reads) raises StoreUnavailableError: the run stops, but nobody took over."""
    policy, start, attempt = Policy(), time.monotonic(), 0
    while (holder := read_holder(fs, root)) == {}:
        if not policy.wait(attempt, start):
            raise StoreUnavailableError(f"the lock file {posixpath.join(root, LOCK)} could not be read whole "
                                        f"in {attempt + 1} reads, so this run cannot tell that it still holds it")
        attempt += 1
    if holder is None or holder.get("run_id") != run_id:
        who = (holder or {}).get("run_id") or "nobody: the lock file is gone"
        raise LostLockError(
            f"run {run_id} lost the lock on {root} (now held by {who}): it was paused or cut off "
            f"for longer than {STALE_AFTER_S / 60:.0f} min and another run took over. This run "
            f"stopped without writing anything more; the other run's output stands. Rerun the "
            f"same command once that run has finished to complete whatever is left.")


class OutputLock:
    """Hold OUTPUT/_lock.json for a run; refreshed in the background until released."""

    def __init__(self, fs: pafs.FileSystem, root: str, run_id: str):
        self.fs, self.root, self.run_id = fs, root, run_id
        self.path = posixpath.join(root, LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.previous: dict | None = None  # the stale lock this run took over, if any
        self._identity = process_identity()

    def _record(self) -> bytes:
        # host, boot, pid namespace, pid and start time: a pid is judged only where it means
        # the same process (not in another container that shares the host name).
        return json.dumps({"run_id": self.run_id, **self._identity, "heartbeat_at": time.time()}).encode()

    def holder(self) -> dict | None:
        """The lock's current content, None when nobody holds it, {} when unreadable."""
        return read_holder(self.fs, self.root)

    def previous_alive_here(self) -> str | None:
        """The run id of the lock taken over when its process still lives on this host
        (paused, not dead): fenced, it stops by itself once it wakes up."""
        p = self.previous or {}
        return p.get("run_id") if identity_alive(p) else None

    def verify(self) -> None:
        """The fencing check: raise LostLockError if another run took the lock over."""
        check_holder(self.fs, self.root, self.run_id)

    def stale_reason(self, holder: dict) -> str | None:
        """Why a lock no longer protects a live run, or None when it does."""
        if not holder.get("run_id"):
            # Half-written or garbled: not proof that its run died. Judge it by its age.
            mtime = self.fs.get_file_info(self.path).mtime
            age = time.time() - (mtime.timestamp() if mtime else 0)
            return (f"the lock file is unreadable and {age / 60:.0f} min old" if age > STALE_AFTER_S
                    else None)
        if identity_alive(holder) is False:
            return f"run {holder['run_id']} (pid {holder.get('pid')} on this host) is no longer running"
        age = time.time() - float(holder.get("heartbeat_at", 0))
        if age > STALE_AFTER_S:
            return f"run {holder['run_id']} on {holder.get('host')} has not been seen for {age / 60:.0f} min"
        return None

    def acquire(self) -> str | None:
        """Take the lock, or raise OutputBusyError naming the run that holds it. Returns a
        note when a stale lock was taken over."""
        note = None
        holder = self.holder()
        if holder is not None:
            reason = self.stale_reason(holder)
            if reason is None and not holder:
                raise OutputBusyError(
                    f"output.path {self.root}: the lock file {self.path} cannot be read (a run may be "
                    f"writing it right now). Rerun in a minute; if no run is writing there, delete it. "
                    f"It counts as stale {STALE_AFTER_S / 60:.0f} min after it was last written.")
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["heartbeat_at"])))
                raise OutputBusyError(
                    f"output.path {self.root} is being written by another run ({holder['run_id']}, pid "
                    f"{holder.get('pid')} on {holder.get('host')}, last seen {started}). Wait for it to finish "
                    f"and rerun (finished shards are kept), or write elsewhere. If that run is dead, delete "
                    f"{self.path}; a lock also expires {STALE_AFTER_S / 60:.0f} min after its run was last seen.")
            note = f"took over a stale lock on {self.root}: {reason}"
            self.previous = holder
            self.fs.delete_file(self.path)
        self._create()
        self._thread = threading.Thread(target=self._beat, name="qwen-batch-lock", daemon=True)
        self._thread.start()
        return note

    def _create(self) -> None:
        if isinstance(self.fs, pafs.LocalFileSystem):  # atomic: exactly one of two racing runs wins
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise OutputBusyError(f"output.path {self.root}: another run took the lock a moment ago; "
                                      f"wait for it to finish and rerun") from None
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return
        # Object stores have no create-if-absent here: write, then check that ours stuck.
        self._write()
        time.sleep(1.0)
        if (self.holder() or {}).get("run_id") != self.run_id:
            raise OutputBusyError(f"output.path {self.root}: another run took the lock a moment ago; "
                                  f"wait for it to finish and rerun")

    def _write(self) -> None:
        """Replace the lock's content whole (a reader never sees half of it)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):  # an upload is published whole; one request
            with self.fs.open_output_stream(self.path) as f:
                f.write(self._record())
            return
        staged = f"{self.path}.{self.run_id}"
        with self.fs.open_output_stream(staged) as f:
            f.write(self._record())
        self.fs.move(staged, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (self.holder() or {}).get("run_id") == self.run_id:
                    self._write()
            except OSError:  # a full disk or a store that kept failing (after retries): the
                pass  # run reports it where it writes; an unreadable lock is never overwritten

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.holder() or {}).get("run_id") == self.run_id:
                self.fs.delete_file(self.path)
        except OSError:
            pass

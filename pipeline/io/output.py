"""The output folder and its commit protocol, the same on local disks and object stores.

    OUTPUT/_commits/NAME.json                 one commit record per input shard, written last
    OUTPUT/results/NAME/RUN-UID.parquet       result rows   (NAME: the shard's path relative
    OUTPUT/errors/NAME/RUN-UID.parquet        error rows     to input.path)
    OUTPUT/metrics/NAME/RUN-UID.parquet       one metrics row
    OUTPUT/_manifest.json                     the last run: settings, outcome, per-shard status
    OUTPUT/_lock.json                         the run writing here now (pipeline.io.output_lock)

Object stores have no atomic rename and no atomic multi-file commit, so nothing is renamed:
workers write data files under names no other attempt can use, and a shard becomes visible
only when its commit record, one small object naming exactly its files, is written. Readers
(and resume) trust commit records only; files no record names are leftovers of killed
attempts, deleted by the next run that holds the lock. A record or manifest appears whole:
object stores publish an object when its upload completes, local disks rename a finished
temporary file into place. A record is written only once the files it names are known to be
there whole: fsynced with their folders on a local disk (the record too, and its folder after
the rename), found with the size their writer wrote on an object store.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import JobError, OutputWriteError
from pipeline.io.shards import resolve_filesystem

KINDS = ("results", "errors", "metrics")
COMMITS = "_commits"
MANIFEST = "_manifest.json"
RESERVE = "_reserve"  # room kept on a local disk so the final manifest fits when it is full
# The name of every data file our writers produce (part_name): RUN_ID-UID.parquet.
DATA_FILE = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}-[0-9a-f]{12}\.parquet$")


def new_run_id() -> str:
    """A run's id: its start time and six random hex digits (part of its data files' names)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


class UnverifiedFiles(RuntimeError):
    """A file a commit record would name is missing or not the size written."""


def _json(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, default=str).encode()


def _no_space(e: OSError) -> bool:
    # pyarrow's local writes may say it only in words, without an errno
    return e.errno == errno.ENOSPC or "No space left" in str(e)


def _cannot_write(e: OSError) -> bool:
    return _no_space(e) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in str(e)


@contextmanager
def typed_write_errors(uri: str):
    """A full disk or a refused write becomes OutputWriteError (the run stops: the next writes
    would fail the same way); other errors pass as they are."""
    try:
        yield
    except OSError as e:
        if isinstance(e, JobError) or not _cannot_write(e):
            raise
        why = "No space left on device" if _no_space(e) else "Permission denied"
        raise OutputWriteError(f"cannot write to {uri}: {why}. Free space or fix permissions there") from e


class OutputStore:
    """One job's output folder: committed shards, their files, the manifest."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = resolve_filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.sizes: dict[str, int] = {}  # bytes of each data file written through this store

    def abs(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    # -- data files (written by workers) --------------------------------------------------

    @staticmethod
    def part_name(kind: str, shard: str, run_id: str) -> str:
        """A data file's path relative to the output: unique to this attempt."""
        return f"{kind}/{shard}/{run_id}-{uuid.uuid4().hex[:12]}.parquet"

    def write_table(self, rel: str, table: pa.Table) -> str:
        """Write a Parquet file (no rename, so no 5 GiB copy limit on S3); returns rel and
        keeps its size in self.sizes[rel] for the commit's check. On a local disk the file and
        its folders are fsynced before this returns. A full disk: OutputWriteError."""
        with typed_write_errors(self.uri):
            return self._write_table(rel, table)

    def _write_table(self, rel: str, table: pa.Table) -> str:
        path = self.abs(rel)
        if self.local:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            try:
                with open(path, "wb") as f:
                    pq.write_table(table, f)
                    f.flush()
                    os.fsync(f.fileno())
                    size = f.tell()
            except BaseException:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                raise
            self._sync_folders(posixpath.dirname(path))
        else:
            # Serialized first, so a table that cannot be written never starts an upload.
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            data = sink.getvalue()
            self._upload(path, data, fresh=True)
            size = data.size
        self.sizes[rel] = size
        return rel

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open_input_file(self.abs(rel)) as f:
            return pq.read_table(f)

    # -- whole-object writes -------------------------------------------------------------

    def _upload(self, path: str, data, *, fresh: bool) -> None:
        """Upload one object. pyarrow can neither abort an upload nor leave one unpublished
        (close and garbage collection both complete it), so a failed upload of a fresh name
        is deleted; an existing object (a record, the manifest) is never deleted."""
        f = self.fs.open_output_stream(path)
        try:
            f.write(data)
            f.close()
        except BaseException:
            if fresh:
                try:
                    f.close()
                except Exception:
                    pass
                try:
                    self.fs.delete_file(path)
                except OSError:
                    pass
            raise

    def _sync_folders(self, folder: str) -> None:
        """fsync a local folder and each one above it up to the output root, so the entries
        of files and folders just made in them survive a power loss."""
        while True:
            try:
                fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                return
            try:
                os.fsync(fd)
            except OSError as e:  # some filesystems cannot fsync a folder
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                    raise
            finally:
                os.close(fd)
            if folder.rstrip("/") == self.root.rstrip("/") or posixpath.dirname(folder) == folder:
                return
            folder = posixpath.dirname(folder)

    def _put(self, rel: str, data: bytes) -> None:
        """Write an object that readers see whole or not at all (and, on a local disk, that
        survives a power loss once this returns). A full disk: OutputWriteError."""
        with typed_write_errors(self.uri):
            self._put_whole(rel, data)

    def _put_whole(self, rel: str, data: bytes) -> None:
        path = self.abs(rel)
        if not self.local:  # an upload is published when it completes
            self._upload(path, data, fresh=False)
            return
        folder = posixpath.dirname(path)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            fd = os.open(tmp, os.O_RDONLY)  # fsync reaches the file's data through any descriptor
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fs.move(tmp, path)  # rename: atomic
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._sync_folders(folder)

    def _get_json(self, rel: str) -> dict | None:
        """A JSON object, None if absent or not whole (an upload cut short by an error is
        still published by pyarrow: such a record commits nothing)."""
        try:
            with self.fs.open_input_stream(self.abs(rel)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    # -- commit records -------------------------------------------------------------------

    @staticmethod
    def record_name(shard: str) -> str:
        return f"{COMMITS}/{shard}.json"

    def commit(self, record: dict, sizes: dict[str, int] | None = None) -> None:
        """Publish a shard: its record names its files, rows and ids. Written last, after
        checking that each file of sizes (relative path: bytes written) is there whole."""
        self.check_sizes(record["name"], sizes or {})
        self._put(self.record_name(record["name"]), json.dumps(record, indent=1).encode())

    def check_sizes(self, shard: str, sizes: dict[str, int]) -> None:
        """Raise UnverifiedFiles unless every file exists with the size its writer wrote."""
        if not sizes:
            return
        rels = sorted(sizes)
        infos = self.fs.get_file_info([self.abs(r) for r in rels])
        bad = [f"{rel} is missing" if info.type == pafs.FileType.NotFound
               else f"{rel} has {info.size} bytes, {sizes[rel]} were written"
               for rel, info in zip(rels, infos) if not (info.is_file and info.size == sizes[rel])]
        if bad:
            raise UnverifiedFiles(f"shard {shard} was not committed: in {self.uri}, " + "; ".join(bad[:5])
                                  + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
                                  + ". Rerun the same command: the shard is computed again")

    def records(self) -> dict[str, dict]:
        """Every committed shard's record, by shard name."""
        base = self.abs(COMMITS)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        rels = [posixpath.relpath(i.path, self.root) for i in infos
                if i.is_file and i.path.endswith(".json") and not posixpath.basename(i.path).startswith(".")]
        with ThreadPoolExecutor(16) as pool:  # one request each on an object store
            found = list(pool.map(self._get_json, rels))
        return {r["name"]: r for r in found if r}

    def read_committed(self, kind: str, records: dict[str, dict] | None = None) -> pa.Table | None:
        """All committed rows of one kind (results, errors or metrics), or None if none."""
        records = self.records() if records is None else records
        rels = [f for name in sorted(records) for f in records[name]["files"][kind]]
        with ThreadPoolExecutor(8) as pool:
            tables = list(pool.map(self.read_table, rels))
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def files(self) -> list[str]:
        """Every file under results/, errors/ and metrics/, relative to the output (ours or not)."""
        out = []
        for kind in KINDS:
            sel = pafs.FileSelector(self.abs(kind), recursive=True, allow_not_found=True)
            out += [posixpath.relpath(i.path, self.root) for i in self.fs.get_file_info(sel) if i.is_file]
        return out

    def _shard_folders(self, records: dict[str, dict], shard_names) -> set[str]:
        """Shard names our writers may have written under: committed, planned, or in the manifest."""
        manifest = self.read_manifest() or {}
        listed = [e.get("name") for e in manifest.get("shards", [])] + list(manifest.get("orphaned") or [])
        return set(records) | set(shard_names) | {n for n in listed if n}

    @staticmethod
    def _is_ours(rel: str, folders: set[str]) -> bool:
        kind, _, rest = rel.partition("/")
        folder, _, base = rest.rpartition("/")
        return kind in KINDS and folder in folders and bool(DATA_FILE.match(base))

    def _unnamed(self, records: dict[str, dict] | None, shard_names) -> tuple[list[str], list[str]]:
        """(files of ours no record names, files we did not write) under the data folders."""
        records = self.records() if records is None else records
        named = {f for r in records.values() for kind in KINDS for f in r["files"][kind]}
        folders = self._shard_folders(records, shard_names)
        unnamed = [f for f in self.files() if f not in named]
        return [f for f in unnamed if self._is_ours(f, folders)], [f for f in unnamed if not self._is_ours(f, folders)]

    def garbage(self, records: dict[str, dict] | None = None, shard_names=()) -> list[str]:
        """Data files of ours that no commit record names: left by killed or superseded
        attempts. Ours: a name our writers produce, in a shard's folder (shard_names: the
        plan's shards, besides the committed ones and the manifest's); nothing else is touched."""
        return self._unnamed(records, shard_names)[0]

    def foreign(self, records: dict[str, dict] | None = None, shard_names=()) -> list[str]:
        """Files under results/, errors/ and metrics/ that qwen-batch did not write (kept, never
        deleted; `status` lists them)."""
        return self._unnamed(records, shard_names)[1]

    def delete(self, rels: list[str]) -> None:
        def rm(rel):
            try:
                self.fs.delete_file(self.abs(rel))
            except FileNotFoundError:
                pass

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(rm, rels))

    def clear(self, shard_names=()) -> None:
        """Remove every committed shard, commit records first (a crash half-way then leaves
        files no record names, which the next run deletes, never records without files).
        Files qwen-batch did not write stay."""
        from pipeline.io.ledger import POISON

        folders = self._shard_folders(self.records(), shard_names)
        self.fs.delete_dir_contents(self.abs(COMMITS), missing_dir_ok=True)
        self.fs.delete_dir_contents(self.abs(POISON), missing_dir_ok=True)  # a new start for every row
        self.delete([f for f in self.files() if self._is_ours(f, folders)])

    def legacy_files(self) -> list[str]:
        """Output files of the layout before commit records (results/NAME.parquet)."""
        out = []
        for kind in KINDS:
            sel = pafs.FileSelector(self.abs(kind), allow_not_found=True)
            out += [i.path for i in self.fs.get_file_info(sel) if i.is_file and i.path.endswith(".parquet")]
        return out

    # -- manifest ------------------------------------------------------------------------

    def read_manifest(self) -> dict | None:
        return self._get_json(MANIFEST)

    def reserve_for(self, manifest: dict, run_id: str) -> None:
        """Keep room on a local disk for the final manifest (see write_manifest): twice the
        starting manifest's size, plus a page."""
        if self.local:
            try:
                with self.fs.open_output_stream(self.abs(f"{RESERVE}.{run_id}")) as f:
                    f.write(b"\0" * (2 * len(_json(manifest)) + 4096))
            except OSError:
                pass  # no room even for that: the manifest may not be updated at the end

    def release_reserve(self, run_id: str) -> None:
        if self.local:
            try:
                self.fs.delete_file(self.abs(f"{RESERVE}.{run_id}"))
            except FileNotFoundError:
                pass

    def write_manifest(self, manifest: dict) -> None:
        """Replace _manifest.json whole. On a full local disk the run's reserve is given up
        and the write tried once more, so a run stopped by a full disk still says why; the
        old manifest is never left half-written."""
        data = _json(manifest)
        try:
            self._put(MANIFEST, data)
        except OSError as e:
            if not (_no_space(e) and manifest.get("run_id")):
                raise
            self.release_reserve(manifest["run_id"])
            self._put(MANIFEST, data)

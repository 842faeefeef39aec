"""The durable state of `qwen-batch serve`, under --state (a local folder or s3://...):

    files/FILE_ID.json         the file object (OpenAI's shape)
    files/FILE_ID.jsonl        its content (an uploaded batch file, or a batch's output or errors)
    batches/BATCH_ID.json      the batch object, and under "_run" what the server needs to run it
    batches/BATCH_ID.work/     the batch's job (run-batch's work folder: its shard and committed rows)

Every JSON is written whole (a temporary file renamed; one put on an object store), so a server
killed at any moment leaves each record as it was before or after a change.
"""

from __future__ import annotations

import json
import posixpath
import threading
import time
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

from pipeline.io.shards import resolve_filesystem
from pipeline.ops.openai_batch import read_if_exists, write_whole

PRIVATE = "_run"  # the batch record's key the API never shows


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class BatchStore:
    """Files and batch records as JSON under one root; one lock for read-modify-write."""

    def __init__(self, uri: str):
        self.root_uri = uri.rstrip("/")
        self.fs, self.root = resolve_filesystem(self.root_uri)
        if "://" not in self.root_uri:
            self.root_uri = self.root  # absolute: the batch jobs run in another working directory
        self.lock = threading.RLock()
        for folder in ("files", "batches"):
            self.fs.create_dir(posixpath.join(self.root, folder), recursive=True)

    def uri(self, *parts: str) -> str:
        """The URI of a path under the root (what a batch job is given)."""
        return "/".join([self.root_uri, *parts])

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _read_json(self, *parts: str) -> dict | None:
        data = read_if_exists(self.uri(*parts))
        return json.loads(data) if data is not None else None

    def _write_json(self, obj: dict, *parts: str) -> None:
        write_whole(self.uri(*parts), json.dumps(obj, sort_keys=True).encode())

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, content: bytes, *, filename: str, purpose: str, file_id: str | None = None) -> dict:
        """Store CONTENT as a new file; returns its file object."""
        file_id = file_id or new_id("file-")
        write_whole(self.content_uri(file_id), content)
        return self.record_file(file_id, filename=filename, purpose=purpose, size=len(content))

    def record_file(self, file_id: str, *, filename: str, purpose: str, size: int) -> dict:
        """The file object of content already written at content_uri(file_id)."""
        obj = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
               "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}
        self._write_json(obj, "files", f"{file_id}.json")
        return obj

    def file(self, file_id: str) -> dict | None:
        if not _safe(file_id):
            return None
        return self._read_json("files", f"{file_id}.json")

    def content_uri(self, file_id: str) -> str:
        return self.uri("files", f"{file_id}.jsonl")

    def content(self, file_id: str) -> bytes:
        return read_if_exists(self.content_uri(file_id)) or b""

    def size(self, uri: str) -> int | None:
        """The size of a file a batch job wrote (None: it wrote none)."""
        fs, path = resolve_filesystem(uri)
        info = fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    # -- batches -------------------------------------------------------------------------------

    def work_uri(self, batch_id: str) -> str:
        return self.uri("batches", f"{batch_id}.work")

    def save_batch(self, record: dict) -> None:
        with self.lock:
            self._write_json(record, "batches", f"{record['id']}.json")

    def batch(self, batch_id: str) -> dict | None:
        if not _safe(batch_id):
            return None
        with self.lock:
            return self._read_json("batches", f"{batch_id}.json")

    def update_batch(self, batch_id: str, change: Callable[[dict], None]) -> dict:
        """Read the record, apply change (in place), write it back; under the store's lock."""
        with self.lock:
            record = self.batch(batch_id)
            change(record)
            self.save_batch(record)
            return record

    def batches(self) -> list[dict]:
        """Every batch record, the newest first."""
        selector = pafs.FileSelector(self._path("batches"), allow_not_found=True)
        records = []
        with self.lock:
            for info in self.fs.get_file_info(selector):
                name = posixpath.basename(info.path)
                if info.type == pafs.FileType.File and name.endswith(".json") and name.startswith("batch_"):
                    record = self._read_json("batches", name)
                    if record is not None:
                        records.append(record)
        return sorted(records, key=lambda r: (r["created_at"], r.get(PRIVATE, {}).get("created_ns", 0), r["id"]),
                      reverse=True)  # created_ns: the order of batches created within one second


def public(record: dict) -> dict:
    """The batch object as the API shows it."""
    return {k: v for k, v in record.items() if k != PRIVATE}


def _safe(object_id: str) -> bool:
    """An id that names a record and nothing else (no path separators, no dots)."""
    return bool(object_id) and len(object_id) <= 64 and all(c.isalnum() or c in "-_" for c in object_id)

"""Bounded retries for transient object-store errors (503 SlowDown, 500, resets, timeouts).

`retrying(fs)` wraps a pyarrow filesystem so that every call through it (listing, metadata,
reads, whole-object writes, deletes, moves) is retried with exponential backoff and full
jitter while the error is transient, and raises StoreUnavailableError once the attempts are
spent. Not found, access denied, no such bucket and an endpoint that refuses connections are
not transient: they are raised at once, as before. pipeline.io.shards.resolve_filesystem
applies it to every non-local URI, so the driver, the engine actors and the write tasks all
go through it.

Ray Data's own reads of input Parquet keep the raw filesystem: a wrapped filesystem pickles
as the one it wraps, and Ray Data retries its reads itself (RetryingPyFileSystem with
DataContext.retried_io_errors, and whole-fragment retries), so the data path gains no Python
layer and no nested retries.
"""

from __future__ import annotations

import os
import random
import time

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import JobError

# A throttling burst lasts seconds to a minute: a call is retried for a time, not a count.
RETRY_S = 60.0  # QWEN_BATCH_STORE_RETRY_S: how long one call keeps retrying before giving up
BACKOFF_S = 0.25  # QWEN_BATCH_STORE_BACKOFF_S: the first backoff's bound; it doubles up to CAP_S
CAP_S = 8.0
MAX_ATTEMPTS = 40
SDK_ATTEMPTS = 3  # the S3 client's own tries per attempt (pyarrow's default for S3FileSystem)

# Seen from pyarrow 26's S3 client against a fault-injecting proxy (tests/s3_fault_proxy.py):
#   AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate.
#   AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.
#   AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream
#   AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 52, Server returned nothing
#   AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached
TRANSIENT = ("SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE", "Service Unavailable", "INTERNAL_FAILURE",
             "InternalError", "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504",
             "HTTP status 429", "THROTTLING", "Throttling", "REQUEST_TIMEOUT", "RequestTimeout",
             "NETWORK_CONNECTION", "curlCode", "Connection reset", "connection reset", "timed out",
             "Timeout was reached", "Broken pipe")
# An endpoint that cannot be resolved or refuses connections is a setting to fix, not a
# burst to wait out (curl 6 and 7): `input.path cannot be read` stays an input error.
PERMANENT = ("ACCESS_DENIED", "AccessDenied", "NO_SUCH_BUCKET", "NoSuchBucket", "NO_SUCH_KEY", "NoSuchKey",
             "RESOURCE_NOT_FOUND", "HTTP status 400", "HTTP status 401", "HTTP status 403", "HTTP status 404",
             "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "curlCode: 6,", "curlCode: 7,",
             "Could not connect", "Couldn't resolve")


class StoreUnavailableError(JobError, OSError):
    """The store kept failing with transient errors after bounded retries: nothing is known
    to be wrong with the job, and a rerun resumes where this one stopped."""


def transient(e: BaseException) -> bool:
    """Whether an error is worth retrying (a throttled, failing or cut-off request)."""
    if isinstance(e, StoreUnavailableError):
        return False  # already retried by an inner layer
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)):
        return True
    if not isinstance(e, (OSError, pa.ArrowException)):
        return False
    text = str(e)
    return not any(p in text for p in PERMANENT) and any(p in text for p in TRANSIENT)


class Policy:
    """Retry for up to retry_s (and MAX_ATTEMPTS), with full-jitter backoff: a sleep uniform
    in [0, min(CAP_S, base_s * 2^n))."""

    def __init__(self, retry_s: float | None = None, base_s: float | None = None):
        env = os.environ.get
        self.retry_s = float(retry_s if retry_s is not None else env("QWEN_BATCH_STORE_RETRY_S", RETRY_S))
        self.base_s = float(base_s if base_s is not None else env("QWEN_BATCH_STORE_BACKOFF_S", BACKOFF_S))

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(CAP_S, self.base_s * 2 ** attempt))

    def wait(self, attempt: int, start: float) -> bool:
        """Sleep before the next attempt; False when the time or the attempts are spent."""
        left = self.retry_s - (time.monotonic() - start)
        if left <= 0 or attempt + 1 >= MAX_ATTEMPTS:
            return False
        time.sleep(min(left, self.delay(attempt)))
        return True

    def call(self, fn, what: str, *, done_if_gone: bool = False):
        """fn() until it succeeds or fails for good; done_if_gone: an operation that removes
        its object (delete, move) counts as done when a retry finds it gone (the first try
        may have landed and only its answer been lost)."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn()
            except FileNotFoundError:
                if done_if_gone and attempt:
                    return None
                raise
            except Exception as e:
                if not transient(e):
                    raise
                if not self.wait(attempt, start):
                    raise StoreUnavailableError(
                        f"the object store kept failing: {what}: {_one_line(e)} ({attempt + 1} "
                        f"attempts in {time.monotonic() - start:.0f} s)") from e
            attempt += 1

    def __reduce__(self):
        return Policy, (self.retry_s, self.base_s)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


class _RetryingInput:
    """A readable file whose every read is retried: reads are by offset, so a retry
    is the same request again."""

    def __init__(self, raw: pa.NativeFile, path: str, policy: Policy):
        self.raw, self.path, self.policy = raw, path, policy
        self.pos, self.closed = 0, False
        self.length = policy.call(raw.size, f"size of {path}")

    def read(self, nbytes: int = -1) -> bytes:
        return self.read_buffer(nbytes).to_pybytes()

    def read_buffer(self, nbytes: int = -1) -> pa.Buffer:
        n = self.length - self.pos if nbytes is None or nbytes < 0 else min(nbytes, self.length - self.pos)
        if n <= 0:
            return pa.py_buffer(b"")
        pos = self.pos

        def once():
            self.raw.seek(pos)
            return self.raw.read_buffer(n)

        data = self.policy.call(once, f"read {self.path}")
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.length + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        return self.length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.raw.close()


class _BufferedUpload:
    """An object written whole when closed, the upload retried: object stores publish
    an object when its upload completes, so a retried upload replaces nothing half-done."""

    def __init__(self, fs: pafs.FileSystem, path: str, metadata, policy: Policy):
        self.fs, self.path, self.metadata, self.policy = fs, path, metadata, policy
        self.buf = pa.BufferOutputStream()
        self.closed = False

    def write(self, data) -> int:
        return self.buf.write(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.buf.tell()

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        data = self.buf.getvalue()

        def upload():
            with self.fs.open_output_stream(self.path, metadata=self.metadata) as out:
                out.write(data)

        self.policy.call(upload, f"write {self.path}")


class RetryingHandler(pafs.FileSystemHandler):
    """Every call of a filesystem, retried by a Policy (see the module's docstring)."""

    def __init__(self, fs: pafs.FileSystem, policy: Policy | None = None):
        self.fs, self.policy = fs, policy or Policy()

    def __eq__(self, other):
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs)

    def get_type_name(self):
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.policy.call(lambda: self.fs.get_file_info(paths), f"look up {', '.join(paths[:3])}")

    def get_file_info_selector(self, selector):
        return self.policy.call(lambda: self.fs.get_file_info(selector), f"list {selector.base_dir}")

    def create_dir(self, path, recursive):
        self.policy.call(lambda: self.fs.create_dir(path, recursive=recursive), f"create {path}")

    def delete_dir(self, path):
        self.policy.call(lambda: self.fs.delete_dir(path), f"delete {path}", done_if_gone=True)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.policy.call(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
                         f"delete under {path}")

    def delete_root_dir_contents(self):
        self.policy.call(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "delete everything")

    def delete_file(self, path):
        self.policy.call(lambda: self.fs.delete_file(path), f"delete {path}", done_if_gone=True)

    def move(self, src, dest):
        self.policy.call(lambda: self.fs.move(src, dest), f"move {src} to {dest}", done_if_gone=True)

    def copy_file(self, src, dest):
        self.policy.call(lambda: self.fs.copy_file(src, dest), f"copy {src} to {dest}")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def open_input_file(self, path):
        raw = self.policy.call(lambda: self.fs.open_input_file(path), f"open {path}")
        return pa.PythonFile(_RetryingInput(raw, path, self.policy), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_BufferedUpload(self.fs, path, metadata, self.policy), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)  # not used; not retried


class RetryingFileSystem(pafs.PyFileSystem):
    """A PyFileSystem of a RetryingHandler that pickles as the filesystem it wraps (see the
    module's docstring: Ray Data's read tasks retry by themselves)."""

    def __init__(self, handler: RetryingHandler):
        super().__init__(handler)

    @property
    def raw(self) -> pafs.FileSystem:
        return self.handler.fs

    def __reduce__(self):
        return self.handler.fs.__reduce__()


def retrying(fs: pafs.FileSystem, policy: Policy | None = None) -> pafs.FileSystem:
    """fs with every call retried on transient errors (a local filesystem is left as it is)."""
    if isinstance(fs, (pafs.LocalFileSystem, RetryingFileSystem)):
        return fs
    return RetryingFileSystem(RetryingHandler(_sdk_retries(fs), policy))


def _sdk_retries(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem with the SDK's own retries set to SDK_ATTEMPTS. FileSystem.from_uri
    leaves the SDK's default, which retried one throttled request 30 times here, while the
    same filesystem pickled to a Ray task comes back with pyarrow's default of 3: set it
    once, the same everywhere, below the retries of this module."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    try:
        options = dict(fs.__reduce__()[1][0])  # every option from_uri resolved, as pickling keeps them
        return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=SDK_ATTEMPTS))
    except (TypeError, ValueError, IndexError):  # another pyarrow's layout: keep it as it is
        return fs

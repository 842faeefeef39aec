"""A real local S3-compatible server for the tests: moto's standalone server on 127.0.0.1.

`s3_server` (session) starts `moto_server` in its own process group on a free port, points
the standard variables at it for the whole session (so pyarrow's `FileSystem.from_uri`, the
CLI run as a subprocess, and Ray workers started afterwards all reach it), and stops it at the
end. `s3_bucket` (function) gives each test a fresh empty bucket as "s3://name".

Set before `ray.init` (Ray workers copy the driver's environment then); a Ray instance
started earlier in the session does not see them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

REGION = "us-east-1"
START_TIMEOUT = 30.0

# Variables the fixture sets for the session (and restores afterwards). AWS_ENDPOINT_URL with
# an http:// scheme is honoured by pyarrow's S3 (it reads the variable into endpoint_override
# and the scheme from the URL); the metadata-service lookup is disabled so nothing ever tries
# an address off this machine for credentials or a region.
def _env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# Variables that would override or confuse the ones above; removed for the session.
_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(uri: str) -> str:
    """'s3://bucket/key' -> 'bucket/key' (the path pyarrow's S3FileSystem takes)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    return uri[len("s3://"):].rstrip("/")


class S3Server:
    """A running moto server; `endpoint` is its http://127.0.0.1:PORT URL."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log: Path, started_in: float):
        self.proc = proc
        self.endpoint = endpoint
        self.log = log
        self.started_in = started_in  # seconds from spawn to first answer

    def filesystem(self, **kwargs) -> pafs.S3FileSystem:
        """An S3FileSystem bound to this server explicitly (no reliance on the env variables)."""
        opts = dict(endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                    access_key="testing", secret_key="testing", region=REGION,
                    allow_bucket_creation=True, allow_bucket_deletion=True)
        return pafs.S3FileSystem(**{**opts, **kwargs})

    def bucket(self, name: str | None = None) -> str:
        """Create a new empty bucket (a fresh unique name when none is given); 's3://name'."""
        name = name or f"b-{uuid.uuid4().hex[:16]}"
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, local: str | os.PathLike, uri: str) -> list[str]:
        """Copy a local file or folder (recursively) to uri; the keys written, under uri."""
        fs, dest, src = self.filesystem(), _split(uri), Path(local)
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        written = []
        for f in files:
            rel = f.name if src.is_file() else f.relative_to(src).as_posix()
            with fs.open_output_stream(f"{dest}/{rel}") as out:
                out.write(f.read_bytes())
            written.append(rel)
        return written

    def download(self, uri: str, local: str | os.PathLike) -> list[str]:
        """Copy every object under uri into the local folder; the relative keys copied."""
        fs, root = self.filesystem(), _split(uri)
        keys = self.list(uri)
        for rel in keys:
            target = Path(local) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{rel}") as f:
                target.write_bytes(f.read())
        return keys

    def list(self, uri: str) -> list[str]:
        """Keys of every object under uri (recursively), relative to it, sorted; [] if none."""
        fs, root = self.filesystem(), _split(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root) + 1:] for i in infos if i.is_file)

    def read(self, uri: str) -> bytes:
        with self.filesystem().open_input_stream(_split(uri)) as f:
            return f.read()

    def write(self, uri: str, data: bytes) -> None:
        with self.filesystem().open_output_stream(_split(uri)) as f:
            f.write(data)

    def exists(self, uri: str) -> bool:
        return self.filesystem().get_file_info(_split(uri)).type != pafs.FileType.NotFound

    def delete(self, uri: str) -> None:
        """Remove one object, or everything under a prefix."""
        fs, path = self.filesystem(), _split(uri)
        info = fs.get_file_info(path)
        if info.is_file:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir_contents(path, missing_dir_ok=True)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1) as r:
            return r.status < 500
    except OSError:
        return False


def start_server(log: Path) -> S3Server:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: install the test extra (pip install -e '.[test]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    while not _answers(endpoint):
        if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT:
            _stop(proc)
            raise RuntimeError(f"moto_server did not start on {endpoint}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return S3Server(proc, endpoint, log, time.monotonic() - t0)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 server for the session, with the AWS_* variables pointing at it."""
    server = start_server(tmp_path_factory.mktemp("s3") / "moto_server.log")
    saved = {k: os.environ.get(k) for k in (*_env(server.endpoint), *_CLEARED)}
    for k in _CLEARED:
        os.environ.pop(k, None)
    os.environ.update(_env(server.endpoint))
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(server.proc)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket for this test: 's3://name'."""
    return s3_server.bucket()

"""The local S3 server fixture works the way the pipeline uses S3, and what pyarrow's S3 does.

Facts the commit protocol relies on are asserted here, measured against moto_server:
- `FileSystem.from_uri("s3://...")` (as `pipeline.io.shards.resolve_filesystem` does) reaches the
  server through AWS_ENDPOINT_URL=http://..., nothing else configured.
- `open_output_stream` is a multipart upload: the object is invisible while the stream is
  open and appears whole at close; a writer SIGKILLed before close leaves nothing. But close
  also happens when an exception leaves the `with` block or the stream is garbage-collected:
  the partial bytes written so far then become a visible object.
- `move` of a file is CopyObject + DeleteObject (not atomic; overwrites the target); `move` of
  a "directory" prefix fails; deleting the last object under a prefix leaves a directory marker.
- `FileInfo` has size and mtime (whole seconds) but no ETag; the ETag is in the metadata of
  `open_input_stream`/`open_input_file`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3_server import _stop, start_server

from pipeline.io.shards import list_shard_paths, resolve_filesystem


def _run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run python code in its own process group, with this session's environment."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_env_points_at_the_server(s3_server, s3_bucket):
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert s3_server.started_in < 30
    fs, path = resolve_filesystem(f"{s3_bucket}/x/a.parquet")
    # S3, behind the retries of transient errors every store call gets (pipeline.io.store_retry)
    assert isinstance(fs.raw, pafs.S3FileSystem) and path == f"{s3_bucket[5:]}/x/a.parquet"
    # a child process (the CLI, Ray's workers) finds the server through the same variables
    done = _run_py(f"""
        import pyarrow.fs as pafs
        fs, p = pafs.FileSystem.from_uri("{s3_bucket}/child")
        with fs.open_output_stream(p) as f:
            f.write(b"from a child")
    """)
    assert done.returncode == 0, done.stderr
    assert s3_server.read(f"{s3_bucket}/child") == b"from a child"


def test_parquet_roundtrip_listing_and_file_info(s3_server, s3_bucket, tmp_path):
    fs, path = pafs.FileSystem.from_uri(f"{s3_bucket}/in/a.parquet")
    table = pa.table({"id": [1, 2, 3], "prompt": ["p1", "p2", "p3"]})
    before = time.time()
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)

    # helpers: upload a local folder, list keys recursively, read bytes back
    local = tmp_path / "local"
    (local / "d1").mkdir(parents=True)
    pq.write_table(table, local / "d1" / "part-0.parquet")
    (local / "_SUCCESS").write_bytes(b"")
    assert s3_server.upload(local, f"{s3_bucket}/in") == ["_SUCCESS", "d1/part-0.parquet"]
    assert s3_server.list(f"{s3_bucket}/in") == ["_SUCCESS", "a.parquet", "d1/part-0.parquet"]
    assert s3_server.list(f"{s3_bucket}/nothing") == []
    assert s3_server.read(f"{s3_bucket}/in/d1/part-0.parquet") == (local / "d1" / "part-0.parquet").read_bytes()

    # recursive listing as the pipeline does it (hidden names skipped)
    fs2, shards = list_shard_paths(f"{s3_bucket}/in")
    bucket = s3_bucket[5:]
    assert shards == [f"{bucket}/in/a.parquet", f"{bucket}/in/d1/part-0.parquet"]
    infos = fs2.get_file_info(pafs.FileSelector(f"{bucket}/in", recursive=True))
    assert {i.path: i.type for i in infos}[f"{bucket}/in/d1"] == pafs.FileType.Directory

    # FileInfo: size and mtime (S3's Last-Modified: whole seconds); no ETag attribute
    info = fs.get_file_info(path)
    assert info.is_file and info.size == (local / "d1" / "part-0.parquet").stat().st_size
    assert info.mtime_ns % 1_000_000_000 == 0
    assert int(before) - 1 <= info.mtime.timestamp() <= time.time() + 1
    assert not hasattr(info, "etag")
    with fs.open_input_file(path) as f:
        meta = f.metadata()
    assert meta["ETag"].strip(b'"') and meta["Last-Modified"] and int(meta["Content-Length"]) == info.size
    # pyarrow always uploads in parts: the ETag is a multipart one ("<md5 of md5s>-<parts>"),
    # not the MD5 of the content, but it changes whenever the content does
    assert meta["ETag"].strip(b'"').endswith(b"-1")
    pq.write_table(pa.table({"id": [3, 2, 1], "prompt": ["p3", "p2", "p1"]}), path, filesystem=fs)
    with fs.open_input_file(path) as f:
        assert f.metadata()["ETag"] != meta["ETag"]
    assert fs.get_file_info(path).size == info.size  # same size: only the ETag tells them apart


def test_output_stream_is_visible_only_at_close(s3_server, s3_bucket):
    fs, _ = pafs.FileSystem.from_uri(s3_bucket)
    b = s3_bucket[5:]

    # small and multi-part objects alike: nothing visible until close, all of it after
    for name, size in (("small", 10), ("big", 12 * 1024 * 1024)):
        stream = fs.open_output_stream(f"{b}/{name}")
        stream.write(b"x" * size)
        stream.flush()
        assert fs.get_file_info(f"{b}/{name}").type == pafs.FileType.NotFound
        assert s3_server.list(s3_bucket) == (["small"] if name == "big" else [])
        stream.close()
        assert fs.get_file_info(f"{b}/{name}").size == size

    # a writer killed before close leaves no object at all
    done_code = f"""
        import sys, time, pyarrow.fs as pafs
        fs, p = pafs.FileSystem.from_uri("{s3_bucket}/killed")
        s = fs.open_output_stream(p)
        s.write(b"x" * 100)
        s.flush()
        print("written", flush=True)
        time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(done_code)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert fs.get_file_info(f"{b}/killed").type == pafs.FileType.NotFound

    # but an exception leaving `with`, or a stream dropped without close, CLOSES the stream:
    # the partial content becomes a visible object (pyarrow exposes no abort)
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(f"{b}/raised") as f:
            f.write(b"partial")
            raise RuntimeError("writer failed half-way")
    assert s3_server.read(f"{s3_bucket}/raised") == b"partial"
    stream = fs.open_output_stream(f"{b}/dropped")
    stream.write(b"partial")
    del stream
    assert s3_server.read(f"{s3_bucket}/dropped") == b"partial"

    # overwriting: readers see the old object until the new one's close
    s3_server.write(f"{s3_bucket}/over", b"old")
    stream = fs.open_output_stream(f"{b}/over")
    stream.write(b"new")
    assert s3_server.read(f"{s3_bucket}/over") == b"old"
    stream.close()
    assert s3_server.read(f"{s3_bucket}/over") == b"new"

    # no appends on S3
    with pytest.raises(NotImplementedError):
        fs.open_append_stream(f"{b}/over")


def test_move_is_copy_then_delete(s3_server, s3_bucket):
    fs, _ = pafs.FileSystem.from_uri(s3_bucket)
    b = s3_bucket[5:]
    s3_server.write(f"{s3_bucket}/stage/a", b"A")
    s3_server.write(f"{s3_bucket}/stage/b", b"B")
    s3_server.write(f"{s3_bucket}/final/b", b"old B")
    log_start = s3_server.log.stat().st_size

    fs.move(f"{b}/stage/a", f"{b}/final/a")
    # the server saw a copy (PUT of the target) and then a DELETE of the source: not atomic
    deadline = time.monotonic() + 5  # the server logs a request as it answers it
    while True:
        requests = s3_server.log.read_bytes()[log_start:].decode(errors="replace")
        put, delete = requests.find(f"PUT /{b}/final/a "), requests.find(f"DELETE /{b}/stage/a ")
        if delete >= 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 0 <= put < delete, requests
    assert s3_server.read(f"{s3_bucket}/final/a") == b"A"
    assert not s3_server.exists(f"{s3_bucket}/stage/a")

    fs.move(f"{b}/stage/b", f"{b}/final/b")  # replaces an existing target silently
    assert s3_server.read(f"{s3_bucket}/final/b") == b"B"
    # deleting the last object under stage/ leaves a directory marker (an empty "stage/" key)
    assert fs.get_file_info(f"{b}/stage").type == pafs.FileType.Directory
    assert s3_server.list(s3_bucket) == ["final/a", "final/b"]

    # a prefix ("directory") cannot be moved
    with pytest.raises(OSError):
        fs.move(f"{b}/final", f"{b}/moved")
    assert s3_server.list(s3_bucket) == ["final/a", "final/b"]


def test_ray_data_reads_parquet_from_s3(s3_server, s3_bucket):
    """Ray workers started after the fixture find the server through the inherited env.

    Runs in a child process (a fresh local Ray, as the CLI would start) so the test leaves no
    Ray instance in this one for later tests to reuse.
    """
    pq.write_table(pa.table({"id": list(range(10))}), s3_bucket[5:] + "/in/a.parquet",
                   filesystem=resolve_filesystem(s3_bucket)[0])
    pq.write_table(pa.table({"id": list(range(10, 15))}), s3_bucket[5:] + "/in/d/b.parquet",
                   filesystem=resolve_filesystem(s3_bucket)[0])
    done = _run_py(f"""
        import json, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        try:
            ds = ray.data.read_parquet("{s3_bucket}/in")
            print(json.dumps(sorted(r["id"] for r in ds.take_all())))
        finally:
            ray.shutdown()
    """, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == list(range(15))


def test_server_stops_with_its_process_group(tmp_path):
    server = start_server(tmp_path / "log")
    pgid = os.getpgid(server.proc.pid)
    assert pgid == server.proc.pid != os.getpgid(0)
    _stop(server.proc)
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)

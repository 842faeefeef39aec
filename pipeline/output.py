"""The output directory: per-shard results, errors and metrics, staged then committed."""

from __future__ import annotations

import errno
import json
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.shards import resolve_filesystem

KINDS = ("results", "errors", "metrics")
MANIFEST = "_manifest.json"


class OutputDir:
    """OUTPUT/{results,errors,metrics}/SHARD.parquet and OUTPUT/_manifest.json.

    Every file is written under OUTPUT/_staging/RUN/ and moved into place when complete, so
    readers never see half a file (the move is an atomic rename on local and HDFS
    filesystems; object stores copy).
    """

    def __init__(self, uri: str, run_id: str):
        self.fs, self.root = resolve_filesystem(uri)
        self.run_id = run_id
        self.staging = posixpath.join(self.root, "_staging", run_id)

    def path(self, kind: str, name: str) -> str:
        return posixpath.join(self.root, kind, f"{name}.parquet")

    def prepare(self) -> None:
        """Create the folders; drop half-written files that a crashed run left in staging."""
        self.fs.delete_dir_contents(posixpath.join(self.root, "_staging"), missing_dir_ok=True)
        for kind in KINDS:
            self.fs.create_dir(posixpath.join(self.root, kind), recursive=True)
            self.fs.create_dir(posixpath.join(self.staging, kind), recursive=True)

    def _commit(self, staged: str, final: str) -> None:
        self.fs.move(staged, final)

    def commit_shard(self, name: str, tables: dict[str, pa.Table]) -> None:
        """Write results, errors and metrics of one shard, then move all three into place.

        On failure (a full disk, say) nothing of the shard is left in place or in staging.
        """
        staged = {kind: posixpath.join(self.staging, kind, f"{name}.parquet") for kind in tables}
        moved = []
        try:
            for kind, table in tables.items():
                with self.fs.open_output_stream(staged[kind]) as f:
                    pq.write_table(table, f)
            for kind in KINDS:  # metrics last: its presence means the shard is complete
                if kind in staged:
                    self._commit(staged[kind], self.path(kind, name))
                    moved.append(self.path(kind, name))
        except BaseException:
            for path in list(staged.values()) + moved:
                try:
                    self.fs.delete_file(path)
                except OSError:
                    pass
            raise

    def write_manifest(self, manifest: dict) -> None:
        """Replace _manifest.json whole; on a full disk, in place (its own space is reused),
        so that a run stopped by a full disk can still say why."""
        staged, final = posixpath.join(self.staging, MANIFEST), posixpath.join(self.root, MANIFEST)
        data = json.dumps(manifest, indent=2, default=str).encode()
        try:
            with self.fs.open_output_stream(staged) as f:
                f.write(data)
            self._commit(staged, final)
        except OSError as e:
            if e.errno != errno.ENOSPC and "No space left" not in str(e):
                raise
            try:
                self.fs.delete_file(staged)
            except OSError:
                pass
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    def cleanup(self) -> None:
        """Remove the staging folder (only this run's, now empty, can be there)."""
        try:
            self.fs.delete_dir(posixpath.dirname(self.staging))
        except FileNotFoundError:
            pass

    def committed_names(self) -> set[str]:
        """Shards whose files are all in place (metrics is moved last)."""
        selector = pafs.FileSelector(posixpath.join(self.root, "metrics"), allow_not_found=True)
        return {posixpath.basename(i.path).removesuffix(".parquet")
                for i in self.fs.get_file_info(selector) if i.path.endswith(".parquet")}

    def read_metrics(self, name: str) -> dict:
        with self.fs.open_input_file(self.path("metrics", name)) as f:
            return pq.read_table(f).to_pylist()[0]

    def read_manifest(self) -> dict | None:
        path = posixpath.join(self.root, MANIFEST)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

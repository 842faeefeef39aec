"""Input shards: find them, fingerprint them, and check them before any model loads."""

from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class InputError(ValueError):
    """Input that cannot run; the message names each file and the fix."""


@dataclass
class Shard:
    path: str  # as the input filesystem names it (what Ray Data's `path` column holds)
    name: str  # output file stem, unique within the run
    size: int
    rows: int
    schema: pa.Schema = field(repr=False)

    def fingerprint(self) -> dict:
        return {"path": self.path, "size": self.size, "rows": self.rows}


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if root else path
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_shard_paths(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """Files a job reads: the file, every file under the directory, or the glob's matches.

    Names starting with '_' or '.' (_SUCCESS, .crc, _manifest.json) are skipped, as Spark
    and pyarrow do.
    """
    fs, path = resolve_filesystem(uri)
    if any(c in path for c in "*?["):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        root = "/".join(parts[:first]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        found = [i.path for i in infos if i.is_file and fnmatch.fnmatchcase(i.path, path)]
        return fs, sorted(p for p in found if not _hidden(p, root))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {uri}: no such file or directory; check the path")
    if info.is_file:
        return fs, [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return fs, sorted(i.path for i in infos if i.is_file and not _hidden(i.path, path))


def _output_names(paths: list[str]) -> list[str]:
    """Output stems: the file name without .parquet, or its relative path when names clash."""
    stems = [posixpath.basename(p).removesuffix(".parquet") for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    return [posixpath.relpath(p, common).removesuffix(".parquet").replace("/", "__") for p in paths]


def open_shards(uri: str) -> tuple[pafs.FileSystem, list[Shard]]:
    """Read each shard's footer (size, row count, schema); a file that is not Parquet is an error."""
    fs, paths = list_shard_paths(uri)
    if not paths:
        raise InputError(f"input.path {uri}: no input files found; point it at Parquet shards")
    shards, problems = [], []
    for path, name in zip(paths, _output_names(paths)):
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                shards.append(Shard(path, name, f.size(), meta.num_rows, meta.schema.to_arrow_schema()))
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(f"{path}: not a readable Parquet file ({e}); remove it or regenerate it")
    if problems:
        raise InputError("input shards cannot be read:\n  - " + "\n  - ".join(problems))
    return fs, shards


def _extension_name(f: pa.Field) -> str | None:
    """The extension type of a column, registered in this process or not."""
    if isinstance(f.type, pa.ExtensionType):
        return f.type.extension_name
    name = (f.metadata or {}).get(b"ARROW:extension:name")
    return name.decode(errors="replace") if name else None


def check_shards(fs: pafs.FileSystem, shards: list[Shard], *, id_column: str,
                 any_of: list[str], reads: list[str]) -> dict[str, pa.Array]:
    """Check columns, id types, null and duplicate ids; return each shard's ids.

    any_of: the columns of which a shard must have at least one (e.g. messages or prompt).
    reads: the columns the head reads when present; every shard must agree on them.
    """
    problems: list[str] = []
    for s in shards:
        for f in s.schema:
            ext = _extension_name(f)
            if ext and ("pickle" in ext or f.name in reads or f.name == id_column):
                problems.append(f"{s.path}: column '{f.name}' has the Arrow extension type '{ext}'; "
                                f"qwen-batch reads plain types only (extension types can unpickle "
                                f"code): write it as a plain string or integer column, or drop it")
    first = shards[0]
    for s in shards[1:]:
        for c in reads:
            a = first.schema.field(c).type if c in first.schema.names else None
            b = s.schema.field(c).type if c in s.schema.names else None
            if a != b and not (pa.types.is_null(a or pa.int8()) or pa.types.is_null(b or pa.int8())):
                problems.append(f"{s.path}: column '{c}' is {b or 'absent'} but {a or 'absent'} in "
                                f"{first.path}; write all shards with the same columns")
    id_types = {}
    for s in shards:
        names = set(s.schema.names)
        if id_column not in names:
            problems.append(f"{s.path}: no id column '{id_column}' (columns: {', '.join(s.schema.names)}); "
                            f"add it or set input.id_column")
        else:
            id_types[s.path] = s.schema.field(id_column).type
        if any_of and not names & set(any_of):
            problems.append(f"{s.path}: none of the columns {', '.join(any_of)}; "
                            f"add one or set the head's column option")
    kinds = {str(t) for t in id_types.values()}
    if len(kinds) > 1:
        listing = ", ".join(f"{p}: {t}" for p, t in id_types.items())
        problems.append(f"id column '{id_column}' has different types across shards ({listing}); "
                        f"write the ids with one type")
    if any(not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t))
           for t in id_types.values()):
        problems.append(f"id column '{id_column}' must hold integers or strings")
    if problems:
        raise InputError("input shards do not fit this job:\n  - " + "\n  - ".join(problems))

    ids: dict[str, pa.Array] = {}
    first_seen: dict = {}
    for s in shards:
        with fs.open_input_file(s.path) as f:
            col = pq.read_table(f, columns=[id_column]).column(id_column).combine_chunks()
        try:
            values = col.drop_null().to_pylist()
        except UnicodeDecodeError:
            problems.append(f"{s.path}: id column '{id_column}' holds text that is not valid UTF-8; "
                            f"write the ids as UTF-8")
            continue
        if col.null_count:
            problems.append(f"{s.path}: {col.null_count} row(s) with a null id; give every row an id")
        dupes = []
        for v in values:
            if v in first_seen:
                dupes.append((v, first_seen[v]))
            else:
                first_seen[v] = s.path
        if dupes:
            shown = ", ".join(f"{v!r} (also in {where})" if where != s.path else repr(v) for v, where in dupes[:5])
            problems.append(f"{s.path}: {len(dupes)} duplicate id(s): {shown}; ids must be unique across the input")
        ids[s.path] = col
    if sum(s.rows for s in shards) == 0:
        problems.append("the input has no rows")
    if problems:
        raise InputError("input ids are not usable:\n  - " + "\n  - ".join(problems))
    return ids

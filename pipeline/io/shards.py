"""Input shards: find them, fingerprint them, and check them before any model loads."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.store_retry import StoreUnavailableError


@dataclass
class Shard:
    path: str  # as the input filesystem names it (what Ray Data's `path` column holds)
    name: str  # its path relative to input.path: names its output, whatever else is there
    size: int
    rows: int
    schema: pa.Schema = field(repr=False)
    footer: str = ""  # hash of the Parquet footer: changes when the content is rewritten
    ids: IdDigest | None = field(default=None, repr=False)

    def fingerprint(self) -> dict:
        return {"path": self.path, "size": self.size, "rows": self.rows, "footer": self.footer}


@dataclass(frozen=True)
class IdDigest:
    """How many ids and an order-free hash of them: equal digests mean the same ids once
    each (a missing id and a duplicated one would have to cancel out in a 64-bit sum)."""

    count: int
    hash: int

    def __add__(self, other: IdDigest) -> IdDigest:
        return IdDigest(self.count + other.count, (self.hash + other.hash) % 2**64)


NO_IDS = IdDigest(0, 0)
MAX_INT_ID = 2**63 - 1  # integer ids are hashed and compared as int64


def id_digest(ids: pa.Array | pa.ChunkedArray) -> IdDigest:
    """The digest of an id column, vectorized (no Python object per id)."""
    import numpy as np
    import pandas as pd

    if len(ids) == 0:
        return NO_IDS
    if pa.types.is_integer(ids.type):
        values = ids.cast(pa.int64()).to_numpy(zero_copy_only=False)
    else:
        values = ids.cast(pa.large_string()).to_numpy(zero_copy_only=False)
    hashes = pd.util.hash_array(values, categorize=False)
    return IdDigest(len(ids), int(hashes.sum(dtype=np.uint64)))


def footer_hash(f: pa.NativeFile) -> str:
    """sha1 of a Parquet file's footer (its schema, row groups, column statistics and byte
    offsets): cheap to read anywhere, and different after almost any rewrite of the data."""
    size = f.size()
    f.seek(max(0, size - 8))
    tail = f.read(8)
    length = int.from_bytes(tail[:4], "little") if len(tail) == 8 else 0
    f.seek(max(0, size - 8 - length))
    return hashlib.sha1(f.read(length + 8)).hexdigest()[:16]


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands. A remote
    filesystem retries transient errors (pipeline.io.store_retry)."""
    from pipeline.io.store_retry import Policy, retrying

    if "://" in uri:
        policy = Policy()
        fs, path = policy.call(lambda: pafs.FileSystem.from_uri(uri), f"connect to {uri}")
        return retrying(fs, policy), path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if root else path
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def unreadable(uri: str, e: Exception) -> InputError:
    """input.path cannot be listed or opened (no route, no bucket, no credentials, a URI
    pyarrow does not know): say so and why, as an input problem (exit 2), not a crash."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    why = " ".join(lines)[:600] if lines else type(e).__name__
    return InputError(f"input.path {uri} cannot be read: {why}. Check the path, the credentials and "
                      f"the network (AWS_ENDPOINT_URL, AWS_PROFILE, ... for s3://); nothing ran")


def list_shard_paths(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """Files a job reads: the file, every file under the directory, or the glob's matches.

    Names starting with '_' or '.' (_SUCCESS, .crc, _manifest.json) are skipped, as Spark
    and pyarrow do. A path that cannot be reached raises InputError saying why.
    """
    try:
        return _list_shard_paths(uri)
    except (InputError, StoreUnavailableError):  # the latter is not the input's fault: exit 3
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise unreadable(uri, e) from None


def _list_shard_paths(uri: str) -> tuple[pafs.FileSystem, list[str]]:
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


def input_root(fs: pafs.FileSystem, uri: str) -> str:
    """The folder shard names are relative to: input.path itself, the glob's fixed part, or
    a single file's folder."""
    _, path = resolve_filesystem(uri)
    if any(c in path for c in "*?["):
        parts = path.split("/")
        return "/".join(parts[:next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]) or "/"
    return posixpath.dirname(path) if fs.get_file_info(path).is_file else path


def shard_name(path: str, root: str) -> str:
    """A shard's name: its path relative to the input root, so that it depends on nothing
    else and two files never share one."""
    return posixpath.relpath(path, root) if root not in ("", "/") else path.lstrip("/")


def open_shards(uri: str) -> tuple[pafs.FileSystem, list[Shard]]:
    """Read each shard's footer (size, row count, schema); a file that is not Parquet is an error."""
    fs, paths = list_shard_paths(uri)
    if not paths:
        raise InputError(f"input.path {uri}: no input files found; point it at Parquet shards")
    try:
        root = input_root(fs, uri)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(uri, e) from None
    shards, problems = [], []
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                shards.append(Shard(path, shard_name(path, root), f.size(), meta.num_rows,
                                    meta.schema.to_arrow_schema(), footer=footer_hash(f)))
        except StoreUnavailableError:
            raise  # the store, not the file: exit 3 and a rerun resumes
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(f"{path}: not a readable Parquet file ({e}); remove it or regenerate it")
    if problems:
        raise InputError("input shards cannot be read:\n  - " + "\n  - ".join(problems))
    return fs, shards


def _extension_name(f: pa.Field) -> str | None:
    """The extension type of a field, registered in this process or not."""
    if isinstance(f.type, pa.ExtensionType):
        return f.type.extension_name
    name = (f.metadata or {}).get(b"ARROW:extension:name")
    return name.decode(errors="replace") if name else None


def _children(t: pa.DataType) -> list[tuple[str, pa.Field]]:
    """(path step, field) of a nested type's children: struct fields, list items, map keys/values."""
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_struct(t):
        return [(t.field(i).name, t.field(i)) for i in range(t.num_fields)]
    if pa.types.is_map(t):
        return [("key", t.key_field), ("value", t.item_field)]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [("[]", t.value_field)]
    if pa.types.is_dictionary(t):
        return [("value", pa.field("value", t.value_type))]
    return []


def extension_fields(f: pa.Field, prefix: str = "") -> list[tuple[str, str]]:
    """(column path, extension name) of every extension type in a column, at any depth."""
    path = f"{prefix}.{f.name}" if prefix else f.name
    found = [(path, ext)] if (ext := _extension_name(f)) else []
    for step, child in _children(f.type):
        found += extension_fields(child.with_name(step) if step == "[]" else child, path)
    return found


def check_shards(fs: pafs.FileSystem, shards: list[Shard], *, id_column: str,
                 any_of: list[str], reads: list[str]) -> None:
    """Check columns, id types, null and duplicate ids; set each shard's id digest.

    any_of: the columns of which a shard must have at least one (e.g. messages or prompt).
    reads: the columns the head reads when present; every shard must agree on them.
    Ids are checked with Arrow and numpy, never as one Python object per row.
    """
    problems: list[str] = []
    for s in shards:
        for f in s.schema:
            for path, ext in extension_fields(f):
                if "pickle" in ext or f.name in reads or f.name == id_column:
                    problems.append(f"{s.path}: column '{path}' has the Arrow extension type '{ext}'; "
                                    f"qwen-batch reads plain types only (extension types can unpickle "
                                    f"code): write it as plain strings, numbers or structs of them, or "
                                    f"drop the column")
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
    problems = _check_ids(fs, shards, id_column)
    if sum(s.rows for s in shards) == 0:
        problems.append("the input has no rows")
    if problems:
        raise InputError("input ids are not usable:\n  - " + "\n  - ".join(problems))


def _check_ids(fs: pafs.FileSystem, shards: list[Shard], id_column: str) -> list[str]:
    """Null, non-UTF-8 and duplicate ids (within and across shards), one shard in memory at
    a time; across shards only a 64-bit hash per id is kept, and hashes that collide are
    confirmed on the ids themselves."""
    import numpy as np
    import pandas as pd

    problems, hashes, owners = [], [], []
    for i, s in enumerate(shards):
        with fs.open_input_file(s.path) as f:
            col = pq.read_table(f, columns=[id_column]).column(id_column).combine_chunks()
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            problems.append(f"{s.path}: id column '{id_column}' holds text that is not valid UTF-8; "
                            f"write the ids as UTF-8")
            continue
        if col.null_count:
            problems.append(f"{s.path}: {col.null_count} row(s) with a null id; give every row an id")
            col = col.drop_null()
        if pa.types.is_uint64(col.type) and len(col) and (top := pc.max(col).as_py()) > MAX_INT_ID:
            problems.append(f"{s.path}: id column '{id_column}' holds unsigned 64-bit ids up to {top}, above "
                            f"the largest integer id qwen-batch takes ({MAX_INT_ID}, 2^63-1); write the ids "
                            f"as strings (or as int64)")
            continue
        s.ids = id_digest(col)
        values = col.cast(pa.int64() if pa.types.is_integer(col.type) else pa.large_string())
        hashes.append(pd.util.hash_array(values.to_numpy(zero_copy_only=False), categorize=False))
        owners.append(np.full(len(col), i, dtype=np.int32))
    if not hashes:
        return problems
    allh, owner = np.concatenate(hashes), np.concatenate(owners)
    del hashes, owners
    order = np.argsort(allh, kind="stable")
    sorted_h = allh[order]
    clash = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
    if len(clash):
        suspects = {int(owner[order[j]]) for k in clash for j in (k, k + 1)}
        dupes: dict[int, list[str]] = {}
        seen: dict = {}
        for i in sorted(suspects):
            s = shards[i]
            with fs.open_input_file(s.path) as f:
                col = pq.read_table(f, columns=[id_column]).column(id_column).drop_null()
            want = set(np.unique(sorted_h[np.concatenate([clash, clash + 1])]).tolist())
            h = pd.util.hash_array(col.cast(pa.int64() if pa.types.is_integer(col.type) else pa.large_string())
                                   .to_numpy(zero_copy_only=False), categorize=False)
            for v in col.filter(pa.array(np.isin(h, list(want)))).to_pylist():
                if v in seen:
                    dupes.setdefault(i, []).append(f"{v!r}" + (f" (also in {seen[v]})" if seen[v] != s.path else ""))
                else:
                    seen[v] = s.path
        for i, shown in sorted(dupes.items()):
            problems.append(f"{shards[i].path}: {len(shown)} duplicate id(s): {', '.join(shown[:5])}; "
                            f"ids must be unique across the input")
    return problems

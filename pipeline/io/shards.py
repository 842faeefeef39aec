"""Input shards: find them, fingerprint them, and check them before any model loads.

Two formats, told apart by the file's extension: JSON lines (.jsonl, .json, .ndjson: one
object per line) and Parquet (any other name, such as Spark's part-00000). One input holds
one of them; a folder that mixes them is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.store_retry import StoreUnavailableError

PARQUET, JSON_LINES = "parquet", "jsonl"
JSON_LINES_EXTENSIONS = (".jsonl", ".json", ".ndjson")


def input_format(path: str) -> str:
    """JSON_LINES for a .jsonl, .json or .ndjson file, else PARQUET (Spark and Hive write Parquet
    without an extension: part-00000, 000000_0)."""
    return JSON_LINES if path.lower().endswith(JSON_LINES_EXTENSIONS) else PARQUET


@dataclass
class Shard:
    path: str  # as the input filesystem names it (what Ray Data's `path` column holds)
    name: str  # its path relative to input.path: names its output, whatever else is there
    size: int
    rows: int
    schema: pa.Schema = field(repr=False)
    # Parquet: a hash of the footer; JSON lines: a hash of the whole content. Either changes
    # when the content is rewritten (the key keeps its name: commit records store it).
    footer: str = ""
    ids: IdDigest | None = field(default=None, repr=False)
    format: str = PARQUET  # PARQUET or JSON_LINES, by the file's extension (input_format)
    # Columns kept from the one parse of a JSON lines file at planning (id-like ones, within a
    # budget), so that the id checks need not parse it again; emptied once the checks are done.
    parsed: dict[str, pa.ChunkedArray] = field(default_factory=dict, repr=False, compare=False)

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
    """Read each shard's size, row count and schema: a Parquet file's footer, or a JSON lines
    file whole (JSON has no footer: its one parse also finds bad lines and keeps the id-like
    columns for check_shards). A file that cannot be read so is an error."""
    fs, paths = list_shard_paths(uri)
    if not paths:
        raise InputError(f"input.path {uri}: no input files found; point it at Parquet shards or JSON lines "
                         f"files ({', '.join(JSON_LINES_EXTENSIONS)})")
    _refuse_mixed_formats(uri, paths)
    try:
        root = input_root(fs, uri)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(uri, e) from None
    shards, problems = [], []
    budget = [KEEP_PARSED_BYTES]
    for path in paths:
        try:
            if input_format(path) == JSON_LINES:
                shards.append(_open_json_lines(fs, path, shard_name(path, root), budget))
                continue
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                shards.append(Shard(path, shard_name(path, root), f.size(), meta.num_rows,
                                    meta.schema.to_arrow_schema(), footer=footer_hash(f)))
        except StoreUnavailableError:
            raise  # the store, not the file: exit 3 and a rerun resumes
        except _BadJsonLines as e:
            problems.append(str(e))
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(f"{path}: not a readable Parquet file ({e}); remove it or regenerate it"
                            + _compressed_hint(path))
    if problems:
        raise InputError("input shards cannot be read:\n  - " + "\n  - ".join(problems))
    return fs, shards


def _refuse_mixed_formats(uri: str, paths: list[str]) -> None:
    jsonl = next((p for p in paths if input_format(p) == JSON_LINES), None)
    parquet = next((p for p in paths if input_format(p) == PARQUET), None)
    if jsonl and parquet:
        glob = "a glob that matches one kind" if any(c in uri for c in "*?[") else \
            f"a glob such as {posixpath.join(uri, '*.jsonl')}"
        raise InputError(f"input.path {uri} holds both JSON lines files (e.g. {jsonl}) and Parquet files (e.g. "
                         f"{parquet}: a name not ending in {', '.join(JSON_LINES_EXTENSIONS)} is read as Parquet); "
                         f"one job reads one format: move one kind to another folder, or select one kind with "
                         f"{glob}")


def _compressed_hint(path: str) -> str:
    stem, _, ext = path.lower().rpartition(".")
    if stem.endswith(JSON_LINES_EXTENSIONS) and ext in ("gz", "bz2", "zst", "lz4", "br", "xz", "zip"):
        return "; compressed JSON lines are not read: decompress it (its name then ends in .jsonl)"
    return ""


# JSON lines ---------------------------------------------------------------------------------

KEEP_PARSED_BYTES = 256 << 20  # id-like columns kept from the planning parse, all files together
MAX_BLOCK = 1 << 30  # a file up to this size is parsed as one block: types are checked over all of it


class _BadJsonLines(Exception):
    """A JSON lines file that cannot be read; the message names the file, the line and the fix."""


def _parse_json_lines(buffer: pa.Buffer, path: str, schema: pa.Schema | None = None) -> pa.Table:
    """The rows of a JSON lines file: with the column types of schema (other keys ignored), or
    inferred over the whole file. Raises _BadJsonLines naming the line at fault."""
    size = buffer.size
    if not size:
        return (schema or pa.schema([])).empty_table()
    read = pajson.ReadOptions(block_size=max(1 << 20, min(size + 1, MAX_BLOCK)))
    parse = (pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
             if schema is not None else pajson.ParseOptions())
    try:
        table = pajson.read_json(pa.BufferReader(buffer), read_options=read, parse_options=parse)
        if schema is None and size >= MAX_BLOCK:
            # Inferred block by block, a later block's values may have been converted to an
            # earlier block's type; the job's read takes each key at one type: check that.
            pajson.read_json(pa.BufferReader(buffer), read_options=read, parse_options=pajson.ParseOptions(
                explicit_schema=table.schema, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise _BadJsonLines(_bad_line(buffer, path, e, one_block=size < MAX_BLOCK)) from None
    return table


def _json_word(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(value), "a number")


def _bad_line(buffer: pa.Buffer, path: str, e: Exception, *, one_block: bool = True) -> str:
    """Why pyarrow could not read a JSON lines file, with the line at fault: the first line
    that is not one JSON object, else the row pyarrow named (its rows skip blank lines; they
    count from the file's start when it was parsed in one block)."""
    fix = "fix or remove that line"
    text = buffer.to_pybytes()
    m = re.search(r"in row (\d+)", str(e)) if one_block else None
    arrow_row, row, at = (int(m.group(1)) if m else None), -1, None
    base = posixpath.basename(path)
    array = (f"{path}: holds a JSON array; qwen-batch reads JSON lines, one object per line (convert it with: "
             f"jq -c '.[]' {base} > {base.rpartition('.')[0]}{'-lines' if base.endswith('.jsonl') else ''}.jsonl)")
    for number, line in enumerate(text.split(b"\n"), 1):
        if not line.strip():
            continue
        row += 1
        if row == arrow_row:
            at = number
        try:
            value = json.loads(line)
        except UnicodeDecodeError as err:
            return f"{path}: line {number} is not valid UTF-8 (byte 0x{line[err.start]:02x}); write the file as UTF-8"
        except (ValueError, RecursionError) as err:
            if row == 0 and line.lstrip().startswith(b"["):
                return array
            why = getattr(err, "msg", "nested too deep")
            return f"{path}: line {number} is not valid JSON ({why}); {fix} (JSON lines: one object per line)"
        if row == 0 and isinstance(value, list):
            return array
        if not isinstance(value, dict):
            return f"{path}: line {number} is {_json_word(value)}, not a JSON object; write one object per line"
    reason = re.sub(r"^JSON parse error: |\s*in row \d+$", "", str(e).strip())
    m = re.match(r"Column\((.*)\) changed from (\w+) to (\w+)", reason)
    if m:
        key = ".".join(k for k in m.group(1).strip("/").split("/") if k) or "(the row)"
        reason = f"'{key}' is {m.group(3)} here but {m.group(2)} in the lines before"
        fix = "give it one type on every line"
    where = f"line {at}" if at is not None else "cannot be read"
    return f"{path}: {where}: {reason}; {fix}"


def _strings_for_timestamps(t: pa.DataType) -> pa.DataType:
    """t with every timestamp as a string: pyarrow infers timestamps from ISO dates, which
    the file holds as text (an id '2024-01-01' stays that text)."""
    if pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_strings_for_timestamps(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_strings_for_timestamps(t.value_type)))
    return t


def _open_json_lines(fs: pafs.FileSystem, path: str, name: str, budget: list[int]) -> Shard:
    """A JSON lines shard: one read and one parse of the file, for its rows, its columns (each
    key's type over the whole file), its content hash and the id-like columns kept (budget:
    bytes left to keep, across files)."""
    with fs.open_input_file(path) as f:
        buffer = f.read_buffer()
    footer = hashlib.sha1(memoryview(buffer)).hexdigest()[:16]
    table = _parse_json_lines(buffer, path)
    schema = pa.schema([f.with_type(_strings_for_timestamps(f.type)) for f in table.schema])
    if schema != table.schema:
        table = _parse_json_lines(buffer, path, schema)
    shard = Shard(path, name, buffer.size, table.num_rows, schema, footer=footer, format=JSON_LINES)
    for column, values in zip(table.column_names, table.columns):
        id_like = pa.types.is_integer(values.type) or (pa.types.is_string(values.type)
                                                       and values.nbytes <= 64 * len(values) + 4096)
        if id_like and values.nbytes <= budget[0]:
            shard.parsed[column] = values
            budget[0] -= values.nbytes
    return shard


def read_columns(fs: pafs.FileSystem, shard: Shard, columns: list[str]) -> pa.Table:
    """These columns of a shard, at the types the job reads them (a JSON lines file is parsed
    with its planned schema). For the driver: ids to check, rows to sample."""
    if all(c in shard.parsed for c in columns):
        return pa.table({c: shard.parsed[c] for c in columns})
    if shard.format == PARQUET:
        with fs.open_input_file(shard.path) as f:
            return pq.read_table(f, columns=columns)
    schema = pa.schema([shard.schema.field(c) for c in columns])
    if shard.rows == 0:
        return schema.empty_table()
    with fs.open_input_file(shard.path) as f:
        buffer = f.read_buffer()
    try:
        return _parse_json_lines(buffer, shard.path, schema)
    except _BadJsonLines as e:
        raise InputError(f"{e} (the file changed since it was planned?)") from None


def json_lines_read_schema(shards: list[Shard], columns: list[str]) -> pa.Schema:
    """The one schema every JSON lines shard of a job is read with (check_shards settled the
    types of the columns it reads across files)."""
    found = {}
    for s in shards:
        for c in columns:
            if c not in found and c in s.schema.names and not pa.types.is_null(s.schema.field(c).type):
                found[c] = s.schema.field(c)
    return pa.schema([found.get(c, pa.field(c, pa.null())) for c in columns])


def _json_kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "strings"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "numbers"
    if pa.types.is_boolean(t):
        return "true/false"
    if pa.types.is_struct(t):
        return "objects"
    if pa.types.is_list(t):
        return "arrays"
    return str(t)


def _settle_json_types(shards: list[Shard], columns: list[str]) -> tuple[list[str], dict[str, set[str]]]:
    """Give each column a job reads one type across the JSON lines shards: the types pyarrow
    inferred per file, merged (a key null in one file, an integer here and a number with a
    fraction there, objects with more keys in one file: one type that holds them all). A key
    that some files lack is null in their rows, as a key missing from a line is (each shard's
    schema gets it). An empty file takes the columns of the others.

    Returns the problems (a key whose types cannot merge, naming both files) and the keys each
    file has itself."""
    problems, settled = [], {}
    filled = [s for s in shards if s.rows or len(s.schema)]
    for s in shards:
        if filled and not s.rows and not len(s.schema):  # an empty file: no keys to infer from
            s.schema = filled[0].schema
    own = {s.path: set(s.schema.names) for s in shards}
    for c in columns:
        typ, origin = None, None
        for s in filled:
            if c not in s.schema.names:
                continue
            t, before = s.schema.field(c).type, typ
            try:
                typ = t if typ is None else pa.unify_schemas(
                    [pa.schema([(c, typ)]), pa.schema([(c, t)])], promote_options="permissive").field(c).type
            except (pa.ArrowTypeError, pa.ArrowInvalid, NotImplementedError):
                a, b = _json_kind(t), _json_kind(typ)
                a, b = (a, b) if a != b else (str(t), str(typ))
                problems.append(f"{s.path}: key '{c}' holds {a} but {b} in {origin}; give it one type in every "
                                f"file")
                continue
            if origin is None or (pa.types.is_null(before) and not pa.types.is_null(t)):
                origin = s.path  # the first file that gave the key a type
        if typ is not None:
            settled[c] = pa.field(c, typ)
    for s in shards:
        for c, f in settled.items():
            s.schema = s.schema.set(s.schema.get_field_index(c), f) if c in s.schema.names else s.schema.append(f)
    return problems, own


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
    Ids are checked with Arrow and numpy, never as one Python object per row. JSON lines
    shards first get one type per column read across files (_settle_json_types).
    """
    try:
        _check_shards(fs, shards, id_column=id_column, any_of=any_of, reads=reads)
    finally:
        for s in shards:
            s.parsed = {}  # the planning parse's columns: not needed once the ids are checked


def _check_shards(fs: pafs.FileSystem, shards: list[Shard], *, id_column: str,
                  any_of: list[str], reads: list[str]) -> None:
    json_lines = [s for s in shards if s.format == JSON_LINES]
    if json_lines and not any(s.rows for s in json_lines):
        raise InputError(f"the input has no rows: every file is empty ({json_lines[0].path}"
                         + (f" and {len(json_lines) - 1} more" if len(json_lines) > 1 else "") + ")")
    problems, own_keys = _settle_json_types(json_lines, [c for c in reads if c != id_column])
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
        if any_of and not own_keys.get(s.path, names) & set(any_of):
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
        col = read_columns(fs, s, [id_column]).column(id_column).combine_chunks()
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
            col = read_columns(fs, s, [id_column]).column(id_column).drop_null()
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

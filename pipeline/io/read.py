"""The Ray Data read of a run's input shards: Parquet or JSON lines, every row with the path
of its file in the shard column (pipeline.io.shard_column)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.io.shard_column import SHARD_COLUMN
from pipeline.io.shards import JSON_LINES, MAX_BLOCK, Shard, json_lines_read_schema


def read_inputs(shards: list[Shard], fs, columns: list[str]):
    """A Dataset of the shards' rows: at least `columns` (the id and the columns the head
    reads) and SHARD_COLUMN. Exactly these files, as they are: no columns made of key=value
    folders, and no file skipped for its name."""
    import ray

    formats = {s.format for s in shards}
    if len(formats) > 1:  # refused at planning (open_shards): never mixed here
        raise InputError(f"the shards to read mix formats ({', '.join(sorted(formats))}); one job reads one")
    if formats != {JSON_LINES}:
        paths = [s.path for s in shards]
        # Ray's newer Parquet reader drops files without a Parquet extension whatever
        # file_extensions says (Hive writes 000000_0, Spark part-00000): then the older reader,
        # which reads every path it is given.
        ray.data.DataContext.get_current().use_datasource_v2 = all(p.lower().endswith(".parquet") for p in paths)
        return ray.data.read_parquet(paths, filesystem=fs, include_paths=True, file_extensions=None,
                                     partitioning=None)
    import pyarrow.json as pajson

    # One explicit schema, settled across the files at planning: every block agrees, whatever
    # each file's own JSON would infer; keys the job does not read are skipped.
    schema = json_lines_read_schema(shards, columns)
    paths = [s.path for s in shards if s.rows]  # an empty file has no rows (and no JSON to parse)
    if not paths:
        return ray.data.from_arrow(schema.append(pa.field(SHARD_COLUMN, pa.string())).empty_table())
    # lines=False: pyarrow's reader, which reads JSON lines (lines=True reads with pandas, which
    # guesses types chunk by chunk). Each file is parsed in one block, as at planning (Ray holds
    # the whole file in memory either way): what planning accepted reads the same here.
    block = max(1 << 20, min(max(s.size for s in shards) + 1, MAX_BLOCK))
    return ray.data.read_json(
        paths, lines=False, filesystem=fs, include_paths=True, file_extensions=None, partitioning=None,
        read_options=pajson.ReadOptions(use_threads=False, block_size=block),
        parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))


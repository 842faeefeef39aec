"""The column Ray Data's read_parquet(include_paths=True) adds to every row: the input file it
came from, which names the row's shard (its output files, its ledger keys)."""

from __future__ import annotations

SHARD_COLUMN = "path"


def path_key(path: str) -> str:
    """A file path without scheme and leading slash (Ray may drop the filesystem's prefix)."""
    return path.split("://", 1)[-1].lstrip("/")

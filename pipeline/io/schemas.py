"""The on-disk contract, read from the JSON files in schemas/ (one per table kind; the package's
copy when installed from a wheel, see pipeline.resources)."""

from __future__ import annotations

import json
import re
from functools import cache

import pyarrow as pa

from pipeline.resources import data_path


def parse_type(text: str) -> pa.DataType:
    """An Arrow type from its short name: int64, string, list<string>, map<string,float64>,
    struct<label:string,start:int64>."""
    text = text.strip()
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(parse_type(text[5:-1]))
    if text.startswith("fixed_size_list<") and text.endswith(">"):
        item, size = _split_top(text[16:-1])
        if not size.strip().isdigit():
            raise ValueError(f"{text}: the list size {size.strip()!r} is the job's (give it to arrow_schema)")
        return pa.list_(parse_type(item), int(size))
    if text.startswith("map<") and text.endswith(">"):
        key, value = _split_top(text[4:-1])
        return pa.map_(parse_type(key), parse_type(value))
    if text.startswith("struct<") and text.endswith(">"):
        fields = []
        for part in _split_top(text[7:-1]):
            name, _, typ = part.partition(":")
            fields.append(pa.field(name.strip(), parse_type(typ)))
        return pa.struct(fields)
    return pa.type_for_alias(text)


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside <...>."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


@cache
def load_contract(name: str) -> dict:
    """The JSON document schemas/NAME.json."""
    return json.loads(data_path("schemas", f"{name}.json").read_text())


def arrow_schema(name: str, *, id_type: pa.DataType | None = None, sizes: dict[str, int] | None = None) -> pa.Schema:
    """The Arrow schema of schemas/NAME.json; a column typed "input" takes id_type, and a
    size the contract names (fixed_size_list<float32, N>) takes its value from sizes."""
    fields = []
    for col in load_contract(name)["columns"]:
        text = col["type"]
        for key, value in (sizes or {}).items():
            text = re.sub(rf"\b{re.escape(key)}\b", str(value), text)
        typ = id_type if text == "input" else parse_type(text)
        if typ is None:
            raise ValueError(f"schema {name}: column {col['name']} needs the input id type")
        fields.append(pa.field(col["name"], typ, nullable=col.get("nullable", True)))
    return pa.schema(fields)

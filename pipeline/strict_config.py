"""Strict configuration models (unknown keys refused) and the messages for their errors."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictSection(BaseModel):
    """A config section that refuses unknown keys and checks values on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location of a validation error (the unknown key's parent)."""
    cur: Any = model
    for part in loc[:-1]:
        field = cur.model_fields.get(part) if isinstance(cur, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cur = field.annotation
    return list(cur.model_fields) if isinstance(cur, type) else []


def explain_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> str:
    """Turn pydantic's errors into lines a user can act on, with did-you-mean for typos."""
    lines = [f"{source}: the job spec is not valid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {where}: unknown key.{hint} Valid keys here: {', '.join(known)}.")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required key is missing.")
        elif isinstance(e.get("input"), (dict, list)):
            # our validators' messages name the keys and the fix; never echo a whole mapping
            # (it may hold secrets) or list
            for line in e["msg"].removeprefix("Value error, ").split("\n"):
                line = line if line.endswith((".", "?")) else line + "."
                lines.append(f"  - {line}" if line.startswith(where + ".") else f"  - {where}: {line}")
        else:  # our validators' messages say what to do without pydantic's "Value error, " prefix
            lines.append(f"  - {where}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r}).")
    return "\n".join(lines)

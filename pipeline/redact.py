"""Keep credentials out of manifests and messages: URIs and engine options can carry them."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(r"(?i)(secret|token|password|passwd|credential|api_?key|access_?key|auth)")
_QUERY = re.compile(r"(?i)([?&;](?:[a-z_]*(?:secret|token|password|passwd|credential|api_?key|access_?key|"
                    r"auth)[a-z_]*)=)[^&\s'\"]+")
_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")


def redact_text(text: str) -> str:
    """Mask user:password@ in URIs and secret-looking query parameters."""
    return _QUERY.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1{MASK}@", text))


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-looking keys and URI credentials masked."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "", False)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value

"""Keep credentials out of manifests and messages, without hiding the run's own settings.

One redaction for everything that leaves the process. It masks:
- the value of a key that names a secret, judged by the key's words (split at `_`, `-`, `.`
  and camelCase), not by substrings: `hf_token`, `aws_secret_access_key`, `X-Amz-Signature`,
  `password`, `apiKey` are secrets; `max_tokens`, `max_num_batched_tokens`, `tokenizer`,
  `author`, `eos_token_id` are not. In mappings, in URI query strings (signed URLs) and in
  text (`HF_TOKEN=...`, `"api_key": "..."`, `Authorization: Bearer ...`);
- the user-info of a URI, whole (`s3://KEY:SECRET/with/slash@bucket/x`, `https://hf_x@host/x`),
  but not a port (`http://host:8080/a@b` is left alone);
- well-known token shapes anywhere (Hugging Face `hf_...`, AWS `AKIA...`, GitHub `ghp_...`, ...).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# A key is a secret when its last word is one of these ...
_SECRET_LAST = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential",
                "credentials", "apikey", "auth", "authorization", "cookie", "signature", "sig", "key",
                "sas"}
# ... except "key" after anything but these (sort_key, cache_key and primary_key are settings) ...
_KEY_AFTER = {"api", "access", "secret", "private", "account", "signing", "encryption", "master",
              "client", "subscription", "sas", "storage", "shared", "auth", "ssh", "hmac",
              "license", "session"}
# ... or it ends with one of these word runs (AWS_ACCESS_KEY_ID, AWSAccessKeyId).
_SECRET_TAILS = {("access", "key", "id"), ("aws", "access", "key", "id")}

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def key_words(key: str) -> list[str]:
    """The lower-case words of a key: "X-Amz-Signature" -> [x, amz, signature]."""
    return [w.lower() for w in _WORDS.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether a key (mapping key, query parameter, variable name) names a secret."""
    words = key_words(key)
    if not words:
        return False
    if any(tuple(words[-len(t):]) == t for t in _SECRET_TAILS):
        return True
    last = words[-1]
    if last not in _SECRET_LAST:
        return False
    if last == "key":  # a bare "key" (?key=AIza...) or api_key, access_key, ...
        return len(words) == 1 or words[-2] in _KEY_AFTER
    return True


# scheme://USERINFO@ : a user alone (often a token) or user:password, the password possibly
# holding '/' or ':' (AWS secret keys do); "host:PORT/...@" is not user-info.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,30}://)[^\s/@:?#'\"]+(?::(?!\d*(?:[/?#\s'\"]|$))[^\s@'\"]*)?@")
# ?name=value / &name=value in a URI
_QUERY = re.compile(r"([?&;])([A-Za-z0-9_.\-]{1,100})=([^&#\s'\"]*)")
# name=value, name: value, "name": "value" in free text (HF_TOKEN=..., Authorization: Bearer ...)
_ASSIGN = re.compile(
    r"(?P<name>\b[A-Za-z_][A-Za-z0-9_.\-]{0,100})(?P<nq>[\"']?)(?P<sep>\s*[=:]\s*)"
    r"(?P<scheme>(?:Bearer|Basic|Token)\s+)?"
    r"(?:(?P<q>[\"'])(?P<quoted>.*?)(?P=q)|(?P<bare>[^\s\"',;&})\]]+))")
# Token shapes that are secrets wherever they appear.
_TOKENS = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|sk-[A-Za-z0-9_\-]{20,}|xox[abprs]-[A-Za-z0-9\-]{10,}"
    r"|AIza[0-9A-Za-z_\-]{35})\b")


def _query(m: re.Match) -> str:
    sep, name, value = m.groups()
    return f"{sep}{name}={MASK}" if value and is_secret_key(name) else m.group(0)


def _assignments(text: str) -> str:
    """Mask the values of NAME=value / NAME: value where NAME is a secret; a match whose name
    is not a secret consumes only the name, so "env: HF_TOKEN=x" still finds HF_TOKEN."""
    out, pos = [], 0
    while (m := _ASSIGN.search(text, pos)) is not None:
        value = m["quoted"] if m["q"] else m["bare"]
        if not is_secret_key(m["name"]) or not value or value == MASK or value.startswith("//"):
            out.append(text[pos:m.end("sep")])
            pos = m.end("sep")
            continue
        q = m["q"] or ""
        out.append(f"{text[pos:m.start('name')]}{m['name']}{m['nq']}{m['sep']}{m['scheme'] or ''}{q}{MASK}{q}")
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def redact_text(text: str) -> str:
    """Text with URI credentials, secret query parameters, NAME=secret assignments and
    well-known token shapes masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY.sub(_query, text)
    text = _assignments(text)
    return _TOKENS.sub(MASK, text)


def _is_set(value: Any) -> bool:
    return not (value is None or isinstance(value, bool) or value == "" or value == MASK)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret keys' values and secrets inside text masked."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and _is_set(v) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value

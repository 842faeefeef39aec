"""What a job's weights are: a content identity of the checkpoint and of each LoRA adapter, so
that a run never resumes on shards committed with other weights at the same path (a model
re-exported in place, an adapter trained again) without saying so.

The identity is read from the files, not from their names or times: a checkpoint copied
elsewhere (or its times changed) keeps it, new weights do not. Small files (configs, the
tokenizer and its chat template) are hashed whole; a large safetensors file by its header and
the first bytes of its tensors (every tensor, or an even spread of them in a file of very
many), any other large file by its size and evenly spread samples. That reads at most a few
MB a weights file: a fine-tune changes every tensor it trains, so it shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

WHOLE_FILE = 64 << 20  # files up to this size are hashed whole (a tokenizer.json: ~11-19 MB)
TENSOR_BYTES = 4096  # read from the start of each sampled tensor
MAX_TENSORS = 512  # sampled in one safetensors file at most (evenly spread)
SAMPLES = 16  # evenly spread reads of another large file
SAMPLE_BYTES = 65536
SKIPPED = (".md", ".lock")  # never read by an engine (README.md, ...)


def identity(source: str) -> str | None:
    """A 16-hex-digit content identity of a checkpoint or adapter: a local directory, or a
    Hugging Face id in the local cache (its snapshot's files). None when it cannot be read
    here (a hub id not cached yet, a remote store, a file this user may not read: the engine
    says what is wrong with such a checkpoint when it loads it)."""
    folder = source if os.path.isdir(source) else _cached_snapshot(source)
    if folder is None:
        return None
    digest = hashlib.sha256()
    try:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(".") or name.endswith(SKIPPED) or not os.path.isfile(path):
                continue
            digest.update(f"{name}\0{_file_identity(path)}\0".encode())
    except OSError:
        return None
    return digest.hexdigest()[:16]


def job_weights(model) -> dict[str, Any]:
    """{"model": identity of model.source, "adapters": {name: identity}} of a ModelSpec."""
    return {"model": identity(model.source),
            "adapters": {name: identity(path) for name, path in sorted((model.adapters or {}).items())}}


def changes(committed: dict | None, now: dict | None) -> list[str]:
    """What differs between the weights a shard was committed with and the job's weights now
    (nothing where either side is unknown: a record from before qwen-batch kept them)."""
    if not committed or not now:
        return []
    out = []
    if None not in (committed.get("model"), now.get("model")) and committed["model"] != now["model"]:
        out.append("model.source")
    old, new = committed.get("adapters") or {}, now.get("adapters") or {}
    out += [f"model.adapters.{n}" for n in sorted(set(old) & set(new))
            if None not in (old[n], new[n]) and old[n] != new[n]]
    return out


def _cached_snapshot(source: str) -> str | None:
    if "://" in source:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for probe in ("config.json", "adapter_config.json"):
            found = try_to_load_from_cache(source, probe)
            if isinstance(found, str):
                return os.path.dirname(found)
    except Exception:  # not a valid hub id: nothing cached under it
        return None
    return None


def _file_identity(path: str) -> str:
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        elif path.endswith(".safetensors") and _safetensors_samples(f, size, digest):
            pass
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_samples(f, size: int, digest) -> bool:
    """Hash the header and the first TENSOR_BYTES of its tensors; False if it is not one."""
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return False
        header_bytes = f.read(n)
        header = json.loads(header_bytes)
    except (struct.error, ValueError):
        return False
    digest.update(header_bytes)
    starts = sorted(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    step = max(1, len(starts) // MAX_TENSORS)
    for start in starts[::step]:
        f.seek(8 + n + start)
        digest.update(f.read(TENSOR_BYTES))
    return True

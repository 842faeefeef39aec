"""The weights identity (pipeline.weights): new content at the same path shows, a copy with
other file times does not, and a cached hub id reads its snapshot."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline import weights
from pipeline.spec import ModelSpec


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    return shutil.copytree(tiny_model, tmp_path / "model")


def retrain(folder, name: str | None = None) -> str:
    """Change one tensor's values in place (same shapes, same file size, old file times)."""
    path = folder / "model.safetensors"
    stat = path.stat()
    tensors = load_file(path)
    name = name or sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    return name


def test_a_copy_keeps_the_identity_and_new_weights_at_the_same_path_change_it(model_copy, tmp_path, tiny_model):
    before = weights.identity(str(model_copy))
    assert before == weights.identity(str(tiny_model)) and len(before) == 16
    moved = shutil.copytree(model_copy, tmp_path / "elsewhere", copy_function=shutil.copyfile)  # new times
    assert weights.identity(str(moved)) == before
    (model_copy / "README.md").write_text("edited")  # no engine reads it
    assert weights.identity(str(model_copy)) == before
    retrain(model_copy)
    assert weights.identity(str(model_copy)) != before


def test_every_tensor_is_sampled_and_small_files_are_read_whole(model_copy, monkeypatch):
    """The tiny model's weights file is above the whole-file size, so it is sampled; a change to
    the last tensor of the file or to the chat template shows."""
    assert (model_copy / "model.safetensors").stat().st_size > weights.WHOLE_FILE
    before = weights.identity(str(model_copy))
    tensors = load_file(model_copy / "model.safetensors")
    retrain(model_copy, max(tensors, key=lambda n: n))
    after = weights.identity(str(model_copy))
    assert after != before
    template = model_copy / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    assert weights.identity(str(model_copy)) != after


def test_a_large_file_of_another_format_is_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WHOLE_FILE", 1 << 16)
    data = bytearray(os.urandom(1 << 22))
    (tmp_path / "pytorch_model.bin").write_bytes(bytes(data))
    before = weights.identity(str(tmp_path))
    data[0] ^= 1
    (tmp_path / "pytorch_model.bin").write_bytes(bytes(data))
    assert weights.identity(str(tmp_path)) != before


def test_a_cached_hub_id_is_its_snapshot_and_an_uncached_one_is_unknown(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights.identity("org/tiny") == weights.identity(str(tiny_model))
    assert weights.identity("org/not-here") is None
    assert weights.identity("s3://bucket/model") is None


def test_job_weights_and_what_changed(tiny_model, model_copy):
    spec = ModelSpec(source=str(tiny_model), adapters={"a": str(model_copy)})
    now = weights.job_weights(spec)
    assert now == {"model": weights.identity(str(tiny_model)), "adapters": {"a": weights.identity(str(model_copy))}}
    assert weights.changes(now, now) == []
    retrain(model_copy)
    later = weights.job_weights(spec)
    assert weights.changes(now, later) == ["model.adapters.a"]
    assert weights.changes({**now, "model": "0" * 16}, later) == ["model.source", "model.adapters.a"]
    # a record from before weights were kept, or weights that cannot be read here: nothing to compare
    assert weights.changes(None, later) == [] and weights.changes({"model": None, "adapters": {}}, later) == []


def test_a_file_that_cannot_be_read_makes_the_identity_unknown_not_an_error(model_copy, monkeypatch):
    """The engine says what is wrong with such a checkpoint when it loads it; planning goes on."""
    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(weights, "_file_identity", denied)  # tests run as root here: chmod would not stop them
    assert weights.identity(str(model_copy)) is None

"""Job spec validation: what a user sees for typos, missing keys and bad values."""

import pytest

from pipeline.spec import SpecError, load_spec

BASE = {
    "input": {"path": "in/"},
    "output": {"path": "out/"},
    "model": {"source": "Qwen/Qwen3-8B"},
    "task": {"head": "chat"},
}


def spec(**changes):
    data = {k: dict(v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        data.setdefault(section, {})[key] = value
    return data


def test_defaults_are_filled():
    s = load_spec(data=spec())
    assert s.input.id_column == "id"
    assert s.model.tensor_parallel_size == 1 and s.resources.replicas == 1
    assert s.model.trust_remote_code is False


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(SpecError) as e:
        load_spec(data=spec(model__tensor_paralel_size=2))
    msg = str(e.value)
    assert "model.tensor_paralel_size: unknown key" in msg
    assert "Did you mean 'tensor_parallel_size'?" in msg


def test_unknown_section_suggests_the_right_one():
    data = spec()
    data["sampeling"] = {"max_tokens": 5}
    with pytest.raises(SpecError, match="Did you mean 'sampling'"):
        load_spec(data=data)


def test_missing_required_key_is_named():
    data = spec()
    del data["model"]
    with pytest.raises(SpecError, match=r"model: required key is missing"):
        load_spec(data=data)


def test_bad_type_shows_the_value():
    with pytest.raises(SpecError, match=r"resources.replicas: .*got 'many'"):
        load_spec(data=spec(resources__replicas="many"))


def test_unknown_head_lists_the_choices():
    with pytest.raises(SpecError, match=r"task.head: .*'chat', 'summarize' or 'classify'"):
        load_spec(data=spec(task__head="translate"))


def test_set_overrides_dotted_keys_with_yaml_values(tmp_path):
    import yaml

    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(spec()))
    s = load_spec(f, overrides=["sampling.max_tokens=64", "model.engine_kwargs={max_num_seqs: 8}"])
    assert s.sampling.max_tokens == 64
    assert s.model.engine_kwargs == {"max_num_seqs": 8}


def test_set_needs_key_equals_value(tmp_path):
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_spec(data=spec(), overrides=["sampling.max_tokens"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(SpecError, match="cannot read the job spec"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_fingerprint_ignores_output_path_but_not_sampling():
    a = load_spec(data=spec())
    b = load_spec(data=spec(output__path="elsewhere/"))
    c = load_spec(data=spec(sampling__max_tokens=7))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_head_options_are_strict():
    from pipeline.heads.chat import ChatHead

    msg = ChatHead.check_options({"enable_thinkng": True})
    assert "Did you mean 'enable_thinking'?" in msg
    assert ChatHead.check_options({"enable_thinking": True}) is None

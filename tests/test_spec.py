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
    with pytest.raises(SpecError,
                       match=r"task.head: .*'chat', 'summarize', 'classify', 'extract', 'embed', 'rerank' or 'qa'"):
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


def test_a_setting_added_later_at_its_default_keeps_the_fingerprint():
    """An output committed by this version stays resumable by a later one that adds a sampling
    or model setting (whose default keeps today's rows); setting it to another value does not."""
    from pipeline.spec import JobSpec, ModelSpec, SamplingSpec

    class LaterSampling(SamplingSpec):
        new_knob: float | None = None

    class LaterModel(ModelSpec):
        new_switch: bool = False

    class LaterJobSpec(JobSpec):
        sampling: LaterSampling = LaterSampling()
        model: LaterModel

    today = load_spec(data=spec(sampling__max_tokens=7))
    later = LaterJobSpec.model_validate(spec(sampling__max_tokens=7))
    assert later.fingerprint() == today.fingerprint()
    assert LaterJobSpec.model_validate(spec(sampling__max_tokens=7, model__new_switch=True)).fingerprint() \
        != today.fingerprint()
    # shards committed before defaults were left out (every setting hashed) are this spec's too
    from pipeline.spec import _digest, result_settings

    assert _digest(result_settings(today.model_dump(mode="json"))) in today.fingerprints()
    assert today.fingerprint() != _digest(result_settings(today.model_dump(mode="json")))


def test_head_options_are_strict():
    from pipeline.heads.chat import ChatHead

    msg = ChatHead.check_options({"enable_thinkng": True})
    assert "Did you mean 'enable_thinking'?" in msg
    assert ChatHead.check_options({"enable_thinking": True}) is None


# model.engine_kwargs cannot undo the spec: key -> the spec key (or reason) the message names
REFUSED_ENGINE_KWARGS = {
    "trust_remote_code": (True, "use model.trust_remote_code instead"),
    "model": ("evil/model", "use model.source instead"),
    "tokenizer": ("evil/tok", "model.source's tokenizer"),
    "tensor_parallel_size": (2, "use model.tensor_parallel_size instead"),
    "pipeline_parallel_size": (2, "use model.pipeline_parallel_size instead"),
    "max_model_len": (4096, "use model.max_model_len instead"),
    "dtype": ("float16", "use model.dtype instead"),
    "quantization": ("fp8", "use model.quantization instead"),
    "hf_overrides": ({"architectures": ["X"]}, "model.long_context"),
    "data_parallel_size": (2, "resources.replicas"),
    "worker_cls": ("evil.Worker", "loads Python code by name"),
    "worker_extension_cls": ("evil.Ext", "loads Python code by name"),
    "logits_processors": (["evil.P"], "loads Python code by name"),
    "download_dir": ("/tmp/x", "HF_HOME"),
    "load_format": ("dummy", "random weights"),
    "revision": ("abc123", "local snapshot"),
    "tokenizer_revision": ("abc123", "local snapshot"),
    "kv_transfer_config": ({"kv_connector_module_path": "evil"}, "not on the allowlist"),
}


@pytest.mark.parametrize("key", REFUSED_ENGINE_KWARGS)
def test_engine_kwargs_cannot_undo_the_spec(key):
    value, fragment = REFUSED_ENGINE_KWARGS[key]
    with pytest.raises(SpecError) as e:
        load_spec(data=spec(model__engine_kwargs={key: value, "max_num_seqs": 8}))
    msg = str(e.value)
    assert f"model.engine_kwargs.{key}" in msg and fragment in msg
    assert "max_num_seqs" not in msg  # only the refused key is named


def test_engine_kwargs_typo_suggests_and_nested_values_are_refused():
    with pytest.raises(SpecError, match=r"max_num_seq is not on the allowlist.*Did you mean 'max_num_seqs'"):
        load_spec(data=spec(model__engine_kwargs={"max_num_seq": 8}))
    with pytest.raises(SpecError, match=r"engine_kwargs.enforce_eager must be a plain value"):
        load_spec(data=spec(model__engine_kwargs={"enforce_eager": {"cls": "x.Y"}}))


def test_engine_kwargs_refusal_does_not_echo_secrets():
    with pytest.raises(SpecError) as e:
        load_spec(data=spec(model__engine_kwargs={"hf_token": "hf_s3cr3t", "model": "x"}))
    assert "hf_s3cr3t" not in str(e.value)


def test_every_shipped_job_spec_is_still_valid():
    from pathlib import Path

    jobs = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        load_spec(job)


@pytest.mark.parametrize("key, value, fragment", [
    ("top_k", -5, "greater than or equal to -1"),
    ("temperature", 2.5, "less than or equal to 2"),
    ("temperature", float("nan"), "finite number"),
    ("presence_penalty", 3, "less than or equal to 2"),
    ("stop", [""], "stop[0] is empty"),
    ("stop", ["x"] * 17, "at most 16 stop strings"),
    ("stop", ["y" * 257], "at most 256"),
    ("seed", -3, "greater than or equal to 0"),
    ("row_max_tokens", 0, "greater than or equal to 1"),
])
def test_sampling_values_the_engine_would_refuse_are_refused_in_the_spec(key, value, fragment):
    with pytest.raises(SpecError) as e:
        load_spec(data=spec(**{f"sampling__{key}": value}))
    assert f"sampling.{key}" in str(e.value) and fragment in str(e.value)


def test_row_max_tokens_reaches_the_head_but_not_the_engine():
    from pipeline.heads.chat import ChatHead

    s = load_spec(data=spec(sampling__max_tokens=32, sampling__row_max_tokens=512))
    head = ChatHead({}, sampling=s.sampling.merged())
    assert head.row_max_tokens == 512 and "row_max_tokens" not in head.sampling
    assert head.sampling["max_tokens"] == 32


# Spec mistakes YAML hides (issue #27, item 10): `qwen-batch validate` says what and how to fix, exit 2.

def _validate(tmp_path, text, capsys, *extra):
    from pipeline import cli

    f = tmp_path / "job.yaml"
    f.write_text(text)
    code = cli.main(["validate", str(f), *extra])
    return code, " ".join(capsys.readouterr().err.split())


JOB_YAML = """\
input: {path: in/}
output: {path: out/}
model: {source: Qwen/Qwen3-8B}
task: {head: chat}
"""


def test_a_date_as_name_is_refused_with_the_fix(tmp_path, capsys):
    code, err = _validate(tmp_path, "name: 2026-12-06\n" + JOB_YAML, capsys)
    assert code == 2, err
    assert "name: YAML reads 2026-12-06 as a date" in err and 'name: "2026-12-06"' in err
    code, err = _validate(tmp_path, JOB_YAML, capsys, "--set", "name=2026-12-06")
    assert code == 2 and "YAML reads 2026-12-06 as a date" in err


def test_a_key_given_twice_is_refused_naming_the_key_and_lines(tmp_path, capsys):
    code, err = _validate(tmp_path, JOB_YAML + "sampling:\n  max_tokens: 64\n  temperature: 0.2\n  max_tokens: 8\n",
                          capsys)
    assert code == 2, err
    assert "line 8: the key 'max_tokens' is given twice" in err and "first on line 6" in err
    # a YAML merge key is not a duplicate: the explicit key overrides the merged one
    f = tmp_path / "merge.yaml"
    f.write_text(JOB_YAML + "sampling: {<<: {max_tokens: 8}, max_tokens: 9}\n")
    assert load_spec(f).sampling.max_tokens == 9


@pytest.mark.parametrize("option", ["instruction", "map_instruction", "reduce_instruction"])
def test_a_summarize_instruction_without_text_is_refused(tmp_path, capsys, option):
    job = JOB_YAML.replace("task: {head: chat}", f"task: {{head: summarize, options: {{{option}: 'Summarize it.'}}}}")
    code, err = _validate(tmp_path, job, capsys)
    assert code == 2, err
    assert "task.options for head 'summarize'" in err and option in err and "has no {text}" in err


def test_the_head_registry_names_each_head_once_and_the_spec_takes_its_names():
    from pipeline.heads import HEADS, head_class, head_names

    assert head_names() == tuple(HEADS)
    for name in head_names():
        assert head_class(name).name == name
    with pytest.raises(SpecError, match=r"unknown head 'clasify'. Did you mean 'classify'\?"):
        load_spec(data={"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "m"},
                        "task": {"head": "clasify"}})


@pytest.mark.parametrize("architecture, kind", [
    ("Qwen3ForCausalLM", "causal"), ("Qwen3MoeForCausalLM", "moe"),
    ("Qwen3ForSequenceClassification", "sequence_classification"),
    ("Qwen3ForTokenClassification", "token_classification"),
    ("Qwen3ForQuestionAnswering", "question_answering"), ("Qwen3Model", "embedding"), ("Mystery", "unknown"),
])
def test_the_checkpoint_kind_comes_from_its_architecture(architecture, kind):
    from types import SimpleNamespace

    from pipeline.checkpoint import checkpoint_kind

    assert checkpoint_kind(SimpleNamespace(architectures=[architecture])) == kind


@pytest.mark.parametrize("head, option, value, missing", [
    ("summarize", "instruction", "Summarize it.", "text"),
    ("classify", "instruction", "Pick one of {labels}.", "text"),
    ("classify", "multi_label_instruction", "Does it apply? {text}", "label"),
    ("extract", "instruction", "Extract the fields.", "text"),
    ("qa", "instruction", "Answer {question} briefly.", "context"),
    ("qa", "instruction", "Read {context}.", "question"),
])
def test_a_prompt_option_without_the_rows_placeholder_is_refused(head, option, value, missing):
    """Otherwise the row's text would silently never reach the model."""
    from pipeline.heads import head_class

    options = {option: value, **({"labels": ["a", "b"]} if head == "classify" else {}),
               **({"fields": {"a": "string"}} if head == "extract" else {})}
    problem = head_class(head).check_options(options)
    assert problem is not None and f"{option}: it has no {{{missing}}}" in problem, problem

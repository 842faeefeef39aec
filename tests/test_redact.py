"""Redaction that neither leaks nor hides: a must-mask table and a must-not-mask table."""

import json

import pytest

from pipeline.redact import MASK, is_secret_key, redact, redact_text

# (text, the secret that must not survive)
MUST_MASK_TEXT = [
    ("s3://AKIAEXAMPLE:wJalr/XUtnFEMI/K7MDENG@bucket/x", "wJalr/XUtnFEMI/K7MDENG"),
    ("s3://KEY:SECRET/with/slash@bucket/x", "SECRET/with/slash"),
    ("s3://KEY:SECRET/with/slash@bucket/x", "KEY"),
    ("https://hf_abcdef@host/x", "hf_abcdef"),
    ("see https://ann:pw0rd@host/x now", "pw0rd"),
    ("git clone https://ghp_tok@github.com/o/r", "ghp_tok"),
    ("gs://b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=svc%40p.iam&X-Goog-Signature=0a1b2c",
     "0a1b2c"),
    ("gs://b/o?X-Goog-Credential=svc%40p.iam&X-Goog-Signature=0a1b2c", "svc%40p.iam"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIDX%2F20240101&X-Amz-Signature=deadbeef",
     "deadbeef"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIDX%2F20240101&X-Amz-Date=1", "AKIDX%2F20240101"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Security-Token=FwoGZX&X-Amz-Expires=60", "FwoGZX"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=abc%2Bdef&se=2030", "abc%2Bdef"),
    ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIDQ&Signature=xyz&Expires=1", "xyz"),
    ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIDQ&Signature=xyz&Expires=1", "AKIDQ"),
    ("https://maps.example.com/api?key=AIzaSyA-secret&q=1", "AIzaSyA-secret"),
    ("s3://b/in?region=eu&access_key=AKIA1&secret_key=xyz", "AKIA1"),
    ("s3://b/in?region=eu&access_key=AKIA1&secret_key=xyz", "xyz"),
    ("failed with HF_TOKEN=hf_live_123 set", "hf_live_123"),
    ("env: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"),
    ("env: AWS_ACCESS_KEY_ID=AKIDOTHER", "AKIDOTHER"),
    ("header Authorization: Bearer eyJhbGciOi.abc.def", "eyJhbGciOi.abc.def"),
    ("{'hf_token': 'hf_quoted_value', 'max_tokens': 5}", "hf_quoted_value"),
    ('{"api_key": "k with spaces"}', "k with spaces"),
    ('{"apiKey": "camel"}', "camel"),
    ("password=hunter2", "hunter2"),
    ("token in text hf_" + "A" * 34, "hf_" + "A" * 34),
    ("an AWS key AKIAIOSFODNN7EXAMPLE in a message", "AKIAIOSFODNN7EXAMPLE"),
    ("ghp_" + "b" * 36, "ghp_" + "b" * 36),
]

# Text that must come out unchanged.
MUST_NOT_MASK_TEXT = [
    "s3://bucket/prefix/part-0.parquet",
    "s3://bucket/people/ann@example.com/x.parquet",
    "http://host:8080/path/a@b",
    "hdfs://namenode:8020/data",
    "gs://b/o?X-Goog-Date=20240101&X-Goog-Expires=60&X-Goog-SignedHeaders=host",
    "sampling.max_tokens: Input should be greater than or equal to 1 (got 0).",
    "max_tokens=64 max_num_batched_tokens=8192 tokenizer=Qwen/Qwen3-8B author=ann",
    "the prompt has 300 tokens but model.max_model_len is 256; shorten it",
    "write the text as UTF-8; email ann@example.com",
    "primary_key=id sort_key=ts cache_key=abc",
    "eos_token_id=151645 token_ids=[1, 2]",
]

# Mapping keys: masked or kept.
SECRET_KEYS = ["hf_token", "HF_TOKEN", "token", "api_key", "apiKey", "x-api-key", "password",
               "db_password", "aws_secret_access_key", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
               "client_secret", "secret", "authorization", "auth", "access_token", "X-Amz-Signature",
               "X-Amz-Credential", "X-Goog-Signature", "sig", "Signature", "private_key", "key",
               "GOOGLE_APPLICATION_CREDENTIALS"]
PLAIN_KEYS = ["max_tokens", "max_num_batched_tokens", "author", "authors", "tokenizer", "tokenizer_mode",
              "tokenizer_revision", "skip_tokenizer_init", "eos_token_id", "prompt_tokens",
              "completion_tokens", "keys", "primary_key", "sort_key", "id_column", "monkey", "keyword",
              "secretary", "authority", "X-Amz-Date", "X-Goog-Expires", "max_model_len", "stop"]


@pytest.mark.parametrize("text, secret", MUST_MASK_TEXT)
def test_secrets_in_text_are_masked(text, secret):
    out = redact_text(text)
    assert secret not in out and MASK in out, out


@pytest.mark.parametrize("text", MUST_NOT_MASK_TEXT)
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == text


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_masked(key):
    assert is_secret_key(key)
    assert redact({key: "s3cr3t"}) == {key: MASK}


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_setting_keys_are_kept(key):
    assert not is_secret_key(key)
    assert redact({key: 64}) == {key: 64}


def test_uri_shapes_keep_their_structure():
    assert redact_text("s3://KEY:SECRET/with/slash@bucket/x") == "s3://***@bucket/x"
    assert redact_text("see https://ann:pw0rd@host/x now") == "see https://***@host/x now"
    assert redact_text("https://hf_abc@host/x") == "https://***@host/x"
    assert (redact_text("s3://b/in?region=eu&access_key=AKIA1&secret_key=xyz")
            == "s3://b/in?region=eu&access_key=***&secret_key=***")
    assert redact_text("HF_TOKEN=hf_x and 'password': 'p'") == "HF_TOKEN=*** and 'password': '***'"


def test_a_spec_keeps_its_settings_and_loses_its_secrets():
    spec = {"name": "job", "input": {"path": "s3://AK:SE/cr/et@bucket/in"},
            "model": {"source": "https://hf_abc@host/m",
                      "engine_kwargs": {"hf_token": "hf_x", "max_num_batched_tokens": 8192, "enforce_eager": True}},
            "sampling": {"max_tokens": 32, "stop": ["</s>"]},
            "task": {"options": {"author": "ann", "api_key": "k", "labels": ["a", "b"]}},
            "nested": [{"password": "p"}, {"token": None}, {"auth": False}]}
    out = redact(spec)
    assert out["sampling"] == {"max_tokens": 32, "stop": ["</s>"]}
    assert out["model"]["engine_kwargs"] == {"hf_token": MASK, "max_num_batched_tokens": 8192, "enforce_eager": True}
    assert out["task"]["options"] == {"author": "ann", "api_key": MASK, "labels": ["a", "b"]}
    assert out["input"]["path"] == "s3://***@bucket/in" and out["model"]["source"] == "https://***@host/m"
    assert out["nested"] == [{"password": MASK}, {"token": None}, {"auth": False}]  # unset stays visible
    for secret in ("SE/cr/et", "hf_abc", "hf_x", '"k"', '"p"'):
        assert secret not in json.dumps(out)


def test_redaction_of_uris_and_keys():  # moved from test_pipeline_fake_engine.py
    assert (redact_text("s3://b/in?region=eu&access_key=AKIA1&secret_key=xyz")
            == "s3://b/in?region=eu&access_key=***&secret_key=***")
    assert redact_text("see https://ann:pw0rd@host/x now") == "see https://***@host/x now"
    assert redact({"api_key": "k", "max_num_seqs": 8, "nested": [{"password": "p"}]}) == \
        {"api_key": "***", "max_num_seqs": 8, "nested": [{"password": "***"}]}


def test_long_text_is_redacted_in_linear_time():
    """Twice the text takes about twice the time (best of 3 each, same run): a quadratic
    pattern would take four times as long (a fixed bound in seconds failed on a slow machine)."""
    import time

    def best(n):
        text = "a." * n + "x" * n + " HF_TOKEN=hf_tail"
        times = []
        for _ in range(3):
            started = time.perf_counter()
            out = redact_text(text)
            times.append(time.perf_counter() - started)
        assert out.endswith("HF_TOKEN=***")
        return min(times)

    one = best(100_000)
    assert one < 2.0  # about 0.2 s here: quadratic would take minutes
    assert best(200_000) / one < 3

"""The job's checkpoint, resolved once at planning: its config, what kind of model it is, the
head that runs the job on it, and the engine arguments that head needs. The plan carries the
result; the runner, the dataflow and the workers read it and never rebuild it."""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pipeline.engine.engine_args import engine_args
from pipeline.engine.fit import check_fits, job_sizing
from pipeline.errors import SpecError
from pipeline.heads import Head
from pipeline.registry import head_class
from pipeline.weights import job_weights

# Architecture name suffix -> the kind of checkpoint (Qwen3ForCausalLM, Qwen3MoeForCausalLM, ...).
KINDS = {
    "MoeForCausalLM": "moe",
    "ForCausalLM": "causal",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "Model": "embedding",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Checkpoint:
    """What the job's checkpoint is and the head that runs on it (see resolve)."""

    model: Any  # the job's ModelSpec
    config: Any  # the checkpoint's config (config.json's keys as attributes)
    kind: str  # causal, moe, sequence_classification, ... (checkpoint_kind)
    head: Head  # the job's head for this checkpoint, with its options and sampling
    options: dict[str, Any]  # the head's options (task.options)
    sizing: Any = None  # pipeline.engine.sizing.Sizing of its placement, None if not sized
    weights: dict | None = None  # pipeline.weights.job_weights: what the model's and adapters' files hold

    def engine_args(self, device: str) -> dict[str, Any]:
        """The vLLM arguments of the job's engine on DEVICE: its model section and what its
        head asks. SpecError for contradictory model keys."""
        head = type(self.head)
        return engine_args(self.model, device=device, config=self.config, task=head.engine_task,
                           shares_prefixes=head.shares_prefixes, score_method=head.score_method(self.options))


def resolve(spec) -> Checkpoint:
    """Read the checkpoint once and build the job's head on it; SpecError says what is wrong
    (a checkpoint the head cannot run on, contradictory model keys)."""
    config = read_config(spec.model)
    kind = checkpoint_kind(config)
    cls = head_class(spec.task.head, kind)  # its options were checked as the spec loaded
    try:
        head = cls(spec.task.options, sampling=spec.sampling.merged())
        head.use_model(config)
    except ValueError as e:
        raise SpecError(f"task.options for head '{spec.task.head}': {e}") from None
    engine_args(spec.model, device=spec.resources.device, config=config,  # auto: either device's quantization
                task=cls.engine_task, shares_prefixes=cls.shares_prefixes,
                score_method=cls.score_method(spec.task.options))
    sizing = job_sizing(spec, config, kind)
    check_fits(spec, sizing)  # a placement whose devices cannot hold the weights
    return Checkpoint(spec.model, config, kind, head, spec.task.options, sizing, job_weights(spec.model))


@functools.cache  # one read per process, whoever asks
def hf_config(source: str, trust_remote_code: bool = False):
    """The checkpoint's config. A local config.json is read as JSON (importing transformers
    costs seconds on the driver); hub ids go through AutoConfig, from the local cache first.
    No vLLM."""
    from types import SimpleNamespace

    local = os.path.join(source, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            data = json.load(f)
        data.setdefault("architectures", [])
        data.setdefault("id2label", {})
        data.setdefault("_name_or_path", source)  # as transformers sets it: heads read the checkpoint's files
        return SimpleNamespace(**data)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the hub's retries and warnings are ours to explain
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError:
        if _offline():
            raise
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def read_config(model) -> Any:
    """The config of model.source (weights are not touched), or SpecError saying why not:
    in seconds, without the hub library's retries, when the hub cannot be reached. A hub id
    cached here with the hub out of reach switches this process to HF_HUB_OFFLINE=1 until a
    later call finds the hub reachable."""
    source = model.source
    hub = HUB_ID.match(source) is not None and not os.path.exists(source)
    if not hub and not os.path.isdir(source) and "://" not in source:
        raise SpecError(f"model.source {source}: cannot read the checkpoint's config (no such directory); "
                        f"give a local checkpoint directory holding config.json and the weights, or a "
                        f"Hugging Face id (organisation/name)")
    if hub and _switched_offline is not None and _hub_reachable():
        _back_online()  # the hub is back: a long-lived process (the Python API) downloads again
    if hub and not _offline() and not _hub_reachable():
        if _cached(source) is not None:  # use the cache, as HF_HUB_OFFLINE=1 would: the tokenizer and the
            _go_offline()                # engine would otherwise retry each file for half a minute
        else:
            raise SpecError(f"model.source {source}: the Hugging Face hub ({_hub_host()}) cannot be reached "
                            f"from this machine, {source} is not in the local cache and no local directory has "
                            f"that name. Run offline: download it where there is network (`huggingface-cli "
                            f"download {source}`, then copy ~/.cache/huggingface or set HF_HOME) and set "
                            f"HF_HUB_OFFLINE=1, or give a local checkpoint directory as model.source")
    if hub and _offline() and _cached(source) is None:  # before transformers' seconds of imports
        raise SpecError(f"model.source {source}: not in the local Hugging Face cache ({_cache_dir()}) and "
                        f"HF_HUB_OFFLINE is set, so nothing is downloaded. Download it where there is "
                        f"network (`huggingface-cli download {source}`), then copy the cache here or set "
                        f"HF_HOME to it; or give a local checkpoint directory as model.source")
    try:
        return hf_config(source, model.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ... with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if hub and _offline() else ""
        raise SpecError(f"model.source {source}: cannot read the checkpoint's config{offline} ({first}); "
                        f"check the id, or give a local checkpoint directory holding config.json") from None


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""  # as huggingface_hub
    return value.strip().lower() in ("1", "true", "yes", "on")


# HF_HUB_OFFLINE's value before _go_offline set it ("" for unset); None: not switched by us.
_switched_offline: str | None = None


def _go_offline() -> None:
    """HF_HUB_OFFLINE=1 until read_config finds the hub reachable again, for this process
    (huggingface_hub read the variable as it was imported) and the processes it starts."""
    global _switched_offline
    _switched_offline = os.environ.get("HF_HUB_OFFLINE", "")
    _set_offline("1")


def _back_online() -> None:
    """Undo _go_offline: HF_HUB_OFFLINE as it was before."""
    global _switched_offline
    before, _switched_offline = _switched_offline, None
    _set_offline(before or None)


def _set_offline(value: str | None) -> None:
    if value is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = value
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = _offline()
    except Exception:
        pass


def _cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return HF_HUB_CACHE
    except Exception:
        return "~/.cache/huggingface/hub"


def _cached(source: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:
        return None
    return found if isinstance(found, str) else None


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub: seconds at worst, where the library retries for half a
    minute. Behind a proxy the library's own request decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def checkpoint_kind(config: Any) -> str:
    """causal, moe, sequence_classification, token_classification, question_answering,
    embedding, or unknown: from the config's architectures."""
    archs = getattr(config, "architectures", None) or []
    for suffix, kind in KINDS.items():
        if any(a.endswith(suffix) for a in archs):
            return kind
    return "unknown"

"""Sizing before launch: a Qwen3 checkpoint's parameters and weight bytes per device under
tensor x pipeline parallel, its KV cache bytes per token, and the tokens of KV that fit on a
device at gpu_memory_utilization. Pure Python from the checkpoint's config (no vLLM, no torch).

What is counted, exactly as the models are built (transformers' Qwen3 / Qwen3-MoE, vLLM's):
embeddings; the lm_head unless tied; per layer q/k/v/o projections (head_dim wide heads, no
bias unless attention_bias), the q and k norms, two layer norms, and either the dense MLP
(gate, up, down) or the router and every expert's gate/up/down; the final norm.

How devices split them, as vLLM does: tensor parallel shards every projection, expert and the
(vocabulary-parallel) embeddings and lm_head across its ranks; a rank holds max(1, kv_heads //
tp) KV heads (KV heads are replicated once tp exceeds them), and norms and the router whole.
Pipeline parallel gives each stage its share of the layers (vLLM's split: the remainder goes to
stages before the last, middle ones first), the first stage the embeddings and the last the lm_head and final
norm (both, for tied embeddings, on the last stage too when there are two or more stages); the
heaviest stage is reported. Expert parallel (model.expert_parallel) places whole experts on
tp ranks instead of a 1/tp slice of each: a replica is one vLLM engine (replicas are Ray
actors, vLLM's data parallel size is 1), so its expert-parallel size is tp and each device
holds the same expert bytes either way.

Quantization changes the bytes of the decoder layers' linear weights (projections, experts)
only: embeddings, lm_head, norms and the router stay in the run dtype, as vLLM loads them.
Scales and zero points are counted per group where the method has groups. The estimate leaves
out vLLM's activations and CUDA graphs (a GiB or two), so the KV tokens are an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
# vLLM's default gpu_memory_utilization (vllm.config.CacheConfig); engine_kwargs may set another.
VLLM_GPU_MEMORY_UTILIZATION = 0.92
# Device memory assumed for the sizing lines when neither resources.gpu_memory_gib nor a GPU
# on this machine says (an 80 GB H100/A100); nothing is refused on an assumption.
ASSUMED_GPU_MEMORY_GIB = 80.0
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp16": 2, "bf16": 2}
# Bits per quantized weight when the checkpoint's quantization_config does not say.
DEFAULT_BITS = {"fp8": 8, "modelopt": 8, "experts_int8": 8, "compressed-tensors": 8, "torchao": 8,
                "quark": 8, "gptq": 4, "gptq_marlin": 4, "awq": 4, "awq_marlin": 4, "moe_wna16": 4,
                "bitsandbytes": 4, "mxfp4": 4, "modelopt_fp4": 4}
# Bytes of scale (and zero point) a group of weights carries, and the group size, by method.
GROUP_OVERHEAD = {"bitsandbytes": (4, 64),  # NF4: an fp32 absmax per block of 64
                  "mxfp4": (1, 32),  # an 8-bit shared exponent per 32
                  "modelopt_fp4": (1, 16)}  # an fp8 scale per 16
GROUPED = ("gptq", "gptq_marlin", "awq", "awq_marlin", "moe_wna16")  # fp16 scale + packed zero per group
EXPERTS_ONLY = ("experts_int8",)  # quantizes MoE experts only


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class Shape:
    """The sizes of a Qwen3 (dense or MoE) config that decide its parameters."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # dense MLP width (also the dense layers of a MoE model)
    tied: bool
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    sparse: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP
    attention_bias: bool = False
    lm_head: int | None = None  # rows of the output head: vocab (causal), labels, 0 (bare Model)
    head_bias: bool = False  # the output head has a bias (qa_outputs, token classification)

    @classmethod
    def of(cls, config: Any, kind: str = "causal") -> Shape:
        """From a config (config.json's keys as attributes, or a dict); kind as
        pipeline.checkpoint.checkpoint_kind says (decides the output head)."""
        hidden, layers = int(_get(config, "hidden_size")), int(_get(config, "num_hidden_layers"))
        heads = int(_get(config, "num_attention_heads"))
        experts = int(_get(config, "num_experts", "num_local_experts", default=0) or 0)
        step = int(_get(config, "decoder_sparse_step", default=1) or 1)
        dense_only = set(_get(config, "mlp_only_layers", default=[]) or [])
        sparse = tuple(experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(layers))
        labels = len(_get(config, "id2label", default={}) or {}) or int(_get(config, "num_labels", default=2))
        vocab = int(_get(config, "vocab_size"))
        head_rows = {"embedding": 0, "sequence_classification": labels, "token_classification": labels,
                     "question_answering": 2}.get(kind, vocab)
        return cls(hidden=hidden, layers=layers, heads=heads,
                   kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
                   head_dim=int(_get(config, "head_dim", default=hidden // heads)), vocab=vocab,
                   intermediate=int(_get(config, "intermediate_size", default=0) or 0),
                   tied=bool(_get(config, "tie_word_embeddings", default=False)), experts=experts,
                   top_k=int(_get(config, "num_experts_per_tok", default=0) or 0),
                   moe_intermediate=int(_get(config, "moe_intermediate_size", default=0) or 0),
                   sparse=sparse, attention_bias=bool(_get(config, "attention_bias", default=False)),
                   lm_head=head_rows, head_bias=kind in ("question_answering", "token_classification"))

    @property
    def moe(self) -> bool:
        return any(self.sparse)

    @property
    def head_rows(self) -> int:
        return self.vocab if self.lm_head is None else self.lm_head


def parameters(shape: Shape, *, active: bool = False) -> int:
    """Parameters of the model (active: those one token uses, top_k experts of each MoE layer)."""
    s = shape
    total = s.vocab * s.hidden + s.hidden  # embeddings, final norm
    if not (s.tied and s.head_rows == s.vocab):
        total += s.head_rows * (s.hidden + s.head_bias)
    for sparse in s.sparse or (False,) * s.layers:
        total += _attention(s) + _norms(s)
        if sparse:
            total += s.hidden * s.experts + (s.top_k if active else s.experts) * 3 * s.hidden * s.moe_intermediate
        else:
            total += 3 * s.hidden * s.intermediate
    return total


def _attention(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    bias = (q + 2 * kv + s.hidden) if s.attention_bias else 0
    return s.hidden * q + 2 * s.hidden * kv + q * s.hidden + bias


def _norms(s: Shape) -> int:
    return 2 * s.head_dim + 2 * s.hidden  # q_norm, k_norm; input and post-attention layer norms


def quantized_bytes(method: str | None, quantization_config: Any, dtype_bytes: float) -> float:
    """Bytes per quantized linear weight under a vLLM quantization method (None: dtype_bytes),
    scales and zero points included; bits and group size from the checkpoint's
    quantization_config where it gives them."""
    if not method:
        return dtype_bytes
    qc = quantization_config or {}
    bits = _get(qc, "bits", "w_bit", "weight_bits", "num_bits")
    group = _get(qc, "group_size", "q_group_size")
    if method == "compressed-tensors":  # the first weight group's scheme
        groups = _get(qc, "config_groups", default={}) or {}
        weights = next((g.get("weights") or {} for g in groups.values() if isinstance(g, dict)), {})
        bits, group = weights.get("num_bits", bits), weights.get("group_size", group)
    bits = float(bits or DEFAULT_BITS.get(method, 8))
    per_weight = bits / 8
    if method in GROUP_OVERHEAD:
        extra, size = GROUP_OVERHEAD[method]
        per_weight += extra / size
    elif group and int(group) > 0 and (method in GROUPED or method == "compressed-tensors"):
        per_weight += (2 + bits / 8) / int(group)  # an fp16 scale (and a packed zero) per group
    return per_weight


def layer_split(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vLLM's get_pp_indices splits them."""
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class Sizing:
    """A checkpoint's memory on one replica's devices (see the module's docstring)."""

    shape: Shape
    tp: int
    pp: int
    params: int
    active_params: int
    weight_bytes: float  # the whole model
    device_weight_bytes: float  # the heaviest device's share
    kv_bytes_per_token: int  # the whole replica (every layer, every KV head it stores)
    device_kv_bytes_per_token: int  # the heaviest device's share
    kv_dtype_bytes: int  # bytes of one K or V value (the run dtype, or kv_cache_dtype)
    device_memory_bytes: float
    memory_known: bool  # resources.gpu_memory_gib or a GPU here said; else ASSUMED_GPU_MEMORY_GIB
    utilization: float
    dtype: str
    quantization: str | None

    @property
    def budget_bytes(self) -> float:
        """What vLLM may use of a device: gpu_memory_utilization x its memory."""
        return self.device_memory_bytes * self.utilization

    @property
    def fits(self) -> bool:
        return self.device_weight_bytes < self.budget_bytes

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache the replica holds at most (activations not counted)."""
        free = self.budget_bytes - self.device_weight_bytes
        return max(0, int(free // self.device_kv_bytes_per_token)) if self.device_kv_bytes_per_token else 0

    def lines(self) -> list[str]:
        """What validate and --dry-run print."""
        s = self.shape
        what = f"{_billions(self.params)} parameters"
        if s.moe:
            what += f", {_billions(self.active_params)} active ({s.top_k} of {s.experts} experts)"
        precision = self.quantization or self.dtype
        memory = f"{self.device_memory_bytes / GIB:g} GiB"
        memory += "" if self.memory_known else " (assumed: set resources.gpu_memory_gib)"
        kv_heads = max(1, s.kv_heads // self.tp)
        return [
            f"Weights: {_gib(self.weight_bytes)} ({what}, {precision}); per device at tensor {self.tp} x "
            f"pipeline {self.pp}: {_gib(self.device_weight_bytes)}.",
            f"KV cache: {_kib(self.kv_bytes_per_token)} a token ({s.layers} layers x {s.kv_heads} KV heads x "
            f"{s.head_dim} x 2 (K and V) x {self.kv_dtype_bytes} bytes); per device "
            f"{_kib(self.device_kv_bytes_per_token)} ({kv_heads} KV head(s) a tensor rank).",
            f"At gpu_memory_utilization {self.utilization:g} of {memory} a device: "
            + (f"about {self.kv_tokens:,} tokens of KV cache a replica (an upper bound: vLLM's activations "
               f"take some)." if self.fits else
               f"the weights do not fit ({_gib(self.device_weight_bytes)} > {_gib(self.budget_bytes)})."),
        ]


def _billions(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    """Bytes as GiB (MiB under one)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _kib(n: float) -> str:
    return f"{n / 1024:g} KiB"


def size(shape: Shape, *, tp: int = 1, pp: int = 1, dtype: str = "bfloat16", quantization: str | None = None,
         quantization_config: Any = None, kv_cache_dtype: str = "auto", memory_gib: float | None = None,
         utilization: float = VLLM_GPU_MEMORY_UTILIZATION) -> Sizing:
    """The sizing of shape on tp x pp devices a replica; dtype: the run dtype (embeddings,
    norms, KV cache under kv_cache_dtype auto); memory_gib None: ASSUMED_GPU_MEMORY_GIB."""
    s = shape
    wbytes = float(DTYPE_BYTES.get(dtype, 2))
    qbytes = quantized_bytes(quantization, quantization_config, wbytes)
    expert_bytes = qbytes
    if quantization in EXPERTS_ONLY:
        qbytes = wbytes
    kv_heads = max(1, s.kv_heads // tp)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

    def layer(sparse: bool, shard: int) -> float:
        heads_kv = kv_heads * s.head_dim if shard > 1 else kv
        linear = (s.hidden * q + q * s.hidden) / shard + 2 * s.hidden * heads_kv
        small = _norms(s) + ((q / shard + 2 * heads_kv + s.hidden) if s.attention_bias else 0)
        if sparse:
            small += s.hidden * s.experts  # the router, whole on every rank
            mlp = s.experts * 3 * s.hidden * s.moe_intermediate / shard * expert_bytes
        else:
            mlp = 3 * s.hidden * s.intermediate / shard * qbytes
        return linear * qbytes + small * wbytes + mlp

    sparse = list(s.sparse or (False,) * s.layers)
    embed = s.vocab * s.hidden * wbytes
    tied = s.tied and s.head_rows == s.vocab
    head = 0.0 if tied else s.head_rows * (s.hidden + s.head_bias) * wbytes
    total = sum(layer(x, 1) for x in sparse) + embed + head + s.hidden * wbytes
    if tied and pp > 1:
        head = embed  # the last stage holds its own copy of the tied embeddings
    heaviest, start = 0.0, 0
    for stage, count in enumerate(layer_split(s.layers, pp)):
        stage_bytes = sum(layer(x, tp) for x in sparse[start:start + count])
        start += count
        if stage == 0:
            stage_bytes += embed / tp
        if stage == pp - 1:
            stage_bytes += head / tp + s.hidden * wbytes
        heaviest = max(heaviest, stage_bytes)
    kv_bytes = 1 if kv_cache_dtype.startswith("fp8") else DTYPE_BYTES.get(
        dtype if kv_cache_dtype == "auto" else kv_cache_dtype, 2)
    per_layer = 2 * s.head_dim * kv_bytes
    most_layers = max(layer_split(s.layers, pp))
    known = memory_gib is not None
    return Sizing(shape=s, tp=tp, pp=pp, params=parameters(s), active_params=parameters(s, active=True),
                  weight_bytes=total, device_weight_bytes=heaviest,
                  kv_bytes_per_token=s.layers * per_layer * max(s.kv_heads, kv_heads * tp), kv_dtype_bytes=kv_bytes,
                  device_kv_bytes_per_token=most_layers * per_layer * kv_heads,
                  device_memory_bytes=(memory_gib if known else ASSUMED_GPU_MEMORY_GIB) * GIB, memory_known=known,
                  utilization=utilization, dtype=dtype, quantization=quantization)


def placements(shape: Shape, most: int = 64) -> list[tuple[int, int]]:
    """(tp, pp) pairs vLLM accepts for shape, fewest devices first, tensor parallel first at a
    count: tp divides the attention heads (and is a multiple of the KV heads past them), pp
    at most the layers."""
    out = []
    for tp in range(1, most + 1):
        if shape.heads % tp or (tp > shape.kv_heads and tp % shape.kv_heads):
            continue
        out += [(tp, pp) for pp in range(1, min(shape.layers, most // tp) + 1)]
    return sorted(out, key=lambda p: (p[0] * p[1], p[1]))


def smallest_fit(shape: Shape, *, pipeline: bool = True, **kwargs: Any) -> Sizing | None:
    """The sizing at the fewest devices whose heaviest holds the weights (None: none up to 64);
    pipeline False: tensor parallel alone; kwargs as size() takes them, tp and pp excepted."""
    for tp, pp in placements(shape):
        if pp > 1 and not pipeline:
            continue
        sizing = size(shape, tp=tp, pp=pp, **kwargs)
        if sizing.fits:
            return sizing
    return None


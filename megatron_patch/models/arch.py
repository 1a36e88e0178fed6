"""A family-independent description of a decoder-only model: what megatron-core needs to build it.

Each family (``models/<family>.py``) turns a HF ``config.json`` into a ``ModelArch``; everything downstream
(TransformerConfig, layer spec, converter shapes) reads only this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError, UnsupportedModelError

POSITION_EMBEDDINGS = ("rope", "alibi")


@dataclass(frozen=True)
class ModelArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str = "RMSNorm"  # or "LayerNorm"
    norm_epsilon: float = 1e-5
    gated_linear_unit: bool = True  # SwiGLU (silu gate) when True, GeLU MLP when False
    add_qkv_bias: bool = False
    add_linear_bias: bool = False  # biases on proj, fc1, fc2
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    position_embedding: str = "rope"  # "rope" | "alibi"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    embedding_norm: bool = False  # a norm (``normalization``) right after the word embedding (bloom)
    norm_head: bool = False  # output layer rows L2-normalised before the matmul (Baichuan2 NormHead)
    init_std: float = 0.02
    dtype: str = "float32"  # the dtype the HF checkpoint declares
    extras: dict = field(default_factory=dict)  # family-specific facts the builder does not read (e.g. HF layout)
    # Mixture of experts (0 experts: a dense model). Routing: softmax over the experts' logits, the top k kept;
    # ``moe_router_pre_softmax`` false renormalises the k kept probabilities (HF ``norm_topk_prob`` / Mixtral),
    # true keeps them as they are (HF ``norm_topk_prob=false``).
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0  # each routed expert's FFN width
    moe_router_topk: int = 0
    moe_router_pre_softmax: bool = False
    moe_shared_expert_intermediate_size: int = 0  # 0: no shared expert
    moe_shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . gate_weight)
    moe_layers: tuple[int, ...] | None = None  # 1 = MoE layer, 0 = dense MLP, per layer; None: every layer is MoE

    def __post_init__(self):
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise UnsupportedModelError(f"position embedding must be one of {', '.join(POSITION_EMBEDDINGS)} "
                                        f"(got {self.position_embedding})")
        if self.norm_head and self.tie_word_embeddings:
            raise UnsupportedModelError("NormHead with tied input/output embeddings is not supported")
        if self.num_attention_heads % self.num_query_groups:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )

        if self.num_experts:
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise UnsupportedModelError(f"top-k {self.moe_router_topk} (num_experts_per_tok) must be between 1 "
                                            f"and the number of experts ({self.num_experts})")
            if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
                raise UnsupportedModelError(f"the MoE layer pattern has {len(self.moe_layers)} entries for "
                                            f"{self.num_layers} layers")
        elif self.moe_router_topk or self.moe_shared_expert_intermediate_size or self.moe_layers:
            raise UnsupportedModelError("MoE settings on a model without experts")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global decoder layer ``layer`` routes its tokens to experts (else it has a dense MLP)."""
        return self.is_moe and (self.moe_layers is None or bool(self.moe_layers[layer]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelArch:
        return cls(**data)

    def check_parallel(self, tp: int, pp: int, flags: tuple[str, str] = ("--tp", "--pp")) -> None:
        """Raise a one-line error naming the flag to change if this model cannot be split TP x PP.

        Args:
            flags: the caller's names for TP and PP (the converter's ``--tp`` / ``--pp``; training and generation
                spell them ``--tensor-model-parallel-size`` / ``--pipeline-model-parallel-size``).
        """
        tp_flag, pp_flag = flags
        if tp < 1 or pp < 1:
            raise ConfigError(f"{tp_flag} and {pp_flag} must be >= 1 (got {tp}, {pp})")
        if self.num_attention_heads % tp:
            raise ConfigError(f"{tp_flag} {tp} does not divide the {self.num_attention_heads} attention heads")
        if self.num_query_groups % tp:
            raise ConfigError(f"{tp_flag} {tp} does not divide the {self.num_query_groups} key/value groups "
                              "(num_key_value_heads)")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"{tp_flag} {tp} does not divide the FFN width {self.ffn_hidden_size}")
        if self.is_moe and self.moe_ffn_hidden_size % tp:
            raise ConfigError(f"{tp_flag} {tp} does not divide the experts' FFN width {self.moe_ffn_hidden_size}")
        if self.moe_shared_expert_intermediate_size % tp:
            raise ConfigError(f"{tp_flag} {tp} does not divide the shared expert's FFN width "
                              f"{self.moe_shared_expert_intermediate_size}")
        if pp > self.num_layers:
            raise ConfigError(f"{pp_flag} {pp} is larger than the number of layers ({self.num_layers})")
        if self.num_layers % pp:
            raise ConfigError(f"{pp_flag} {pp} does not divide the {self.num_layers} layers evenly")

    def check_expert_parallel(self, ep: int, flag: str = "--ep") -> None:
        """Raise a one-line error naming ``flag`` if this model cannot place its experts on ``ep`` ranks."""
        if ep < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {ep})")
        if ep > 1 and not self.is_moe:
            raise ConfigError(f"{flag} {ep} needs a mixture-of-experts model; this one has no experts")
        if self.is_moe and self.num_experts % ep:
            raise ConfigError(f"{flag} {ep} does not divide the {self.num_experts} experts")


def parse_rope(hf_config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a config written by transformers 4.x (``rope_theta``, ``rope_scaling``)
    or 5.x (``rope_parameters``). Scaling is None for plain RoPE."""
    params = dict(hf_config.get("rope_parameters") or {})
    legacy = hf_config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:  # transformers < 4.40 spelled it "type"
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def hf_dtype(hf_config: dict) -> str:
    """The dtype a HF config declares (``dtype`` in transformers 5.x, ``torch_dtype`` in 4.x)."""
    return str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")


def llama_style_arch(hf: dict, default_max_positions: int, **differences) -> ModelArch:
    """A ModelArch from the config fields llama-layout families (llama, mistral, qwen2, qwen3) spell the same way:
    RMSNorm, SwiGLU, RoPE. A family passes only what differs (biases, qk norm, ...)."""
    from ..layers.rope import check_rope_scaling

    heads = hf["num_attention_heads"]
    theta, scaling = parse_rope(hf)
    check_rope_scaling(scaling)
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", default_max_positions),
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        position_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        init_std=hf.get("initializer_range", 0.02),
        dtype=hf_dtype(hf),
    )
    fields.update(differences)
    return ModelArch(**fields)

"""What the mixture-of-experts families (``qwen_moe``, ``mixtral``) share: the MoE fields of a HF config as
``ModelArch`` fields, and the weight rows of a routed-experts MLP.

Routing in HF's MoE blocks: ``softmax(router logits)`` over all experts, the top k kept, optionally renormalised
to sum to 1 (``norm_topk_prob``; Mixtral always). megatron-core's router with ``moe_router_pre_softmax`` false takes
the top k logits and softmaxes over those k, which equals softmax-then-top-k-then-renormalise; with it true it
softmaxes over all experts and keeps the k probabilities as they are. The experts are SwiGLU MLPs: each expert's
``linear_fc1`` is [gate; up], as the dense layers' is.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..mapping import EXPERT, Direct, GatedMLP, Split


def moe_fields(hf: dict, *, num_experts: int, moe_ffn: int, renormalise: bool, shared_ffn: int = 0,
               moe_layers: list[int] | None = None) -> dict:
    """The ``ModelArch`` MoE fields; ``moe_layers`` (1 = MoE, 0 = dense, per layer) is kept only when mixed."""
    if num_experts < 1:
        raise UnsupportedModelError(f"a mixture-of-experts config with {num_experts} experts")
    topk = hf["num_experts_per_tok"]
    if moe_layers is not None and not any(moe_layers):
        raise UnsupportedModelError("the config makes no layer a mixture-of-experts layer (decoder_sparse_step / "
                                    "mlp_only_layers); convert it as the dense model it is")
    return dict(
        num_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=topk,
        moe_router_pre_softmax=not renormalise,
        moe_shared_expert_intermediate_size=shared_ffn,
        moe_shared_expert_gate=shared_ffn > 0,
        moe_layers=None if moe_layers is None or all(moe_layers) else tuple(moe_layers),
    )


def expert_rows(router: str, gate: str, up: str, down: str) -> list:
    """The router and the routed experts (HF names with ``*`` for the layer, ``<e>`` for the expert)."""
    experts = f"decoder.layers.*.mlp.experts.local_experts.{EXPERT}"
    return [
        Direct("decoder.layers.*.mlp.router.weight", router, Split.REPLICATED),
        GatedMLP(f"{experts}.linear_fc1.weight", gate, up),
        Direct(f"{experts}.linear_fc2.weight", down, Split.ROW),
    ]


def shared_expert_rows(gate: str, up: str, down: str, sigmoid_gate: str | None) -> list:
    """The shared expert (always applied) and its sigmoid gate (a (1, hidden) weight), if it has one."""
    shared = "decoder.layers.*.mlp.shared_experts"
    rows = [GatedMLP(f"{shared}.linear_fc1.weight", gate, up), Direct(f"{shared}.linear_fc2.weight", down, Split.ROW)]
    if sigmoid_gate is not None:
        rows.append(Direct(f"{shared}.gate_weight", sigmoid_gate, Split.REPLICATED))
    return rows

"""Placement of a MoE model's rows (pure, no ranks): routed experts partitioned over EP ranks and numbered from 0 on
each, everything else on every EP rank; router / experts only on MoE layers, the dense MLP only on dense layers; the
torch_dist key of an expert's weight carries its global index along a leading axis."""

from __future__ import annotations

import pytest

from megatron_patch.checkpoint.torch_dist import extra_state_keys, sharded_key
from megatron_patch.errors import ConfigError
from megatron_patch.models import get_family
from megatron_patch.models.spec import ModelSpec


def _spec(flavor="tiny") -> ModelSpec:
    return ModelSpec.from_flavor("qwen_moe", flavor, tp=1)


@pytest.mark.parametrize("pp,ep", [(1, 1), (1, 2), (2, 2), (2, 4)])
def test_expert_parallel_ranks_partition_the_experts(pp, ep):
    sharding = _spec().sharding(1, pp, ep)
    every = {e.global_name for stage in range(pp) for e in sharding.stage_entries(stage)}
    union = set()
    for stage in range(pp):
        per_rank = [sharding.stage_entries(stage, rank) for rank in range(ep)]
        shared = [{e.global_name for e in entries if e.expert is None} for entries in per_rank]
        assert all(names == shared[0] for names in shared)  # non-expert weights on every EP rank
        experts = [{(e.layer, e.expert) for e in entries if e.expert is not None} for entries in per_rank]
        assert sum(len(x) for x in experts) == len(set().union(*experts))  # disjoint
        for rank, entries in enumerate(per_rank):
            for entry in (e for e in entries if e.expert is not None):
                local = entry.expert - rank * (4 // ep)
                assert f".local_experts.{local}." in entry.local_name and 0 <= local < 4 // ep
        union |= {e.global_name for entries in per_rank for e in entries}
    assert union == every


def test_rows_follow_the_layer_pattern():
    sharding = _spec().sharding(1, 1)  # layer 1 is dense (mlp_only_layers)
    by_layer = {}
    for entry in sharding.stage_entries(0):
        by_layer.setdefault(entry.layer, set()).add(entry.global_name.split(".mlp.")[-1] if ".mlp." in
                                                    entry.global_name else "")
    assert "linear_fc1.weight" in by_layer[1] and "router.weight" not in by_layer[1]
    for layer in (0, 2, 3):
        assert "router.weight" in by_layer[layer] and "shared_experts.gate_weight" in by_layer[layer]
        assert "linear_fc1.weight" not in by_layer[layer]
        assert sum(name.startswith("experts.local_experts.") for name in by_layer[layer]) == 4 * 2


def test_expert_parallel_size_must_divide_the_experts():
    with pytest.raises(ConfigError, match="--ep 3 does not divide the 4 experts"):
        _spec().sharding(1, 1, 3)
    with pytest.raises(ConfigError, match="no experts"):
        ModelSpec.from_flavor("llama", "tiny", tp=1).sharding(1, 1, 2)


def test_sharded_keys():
    name = "decoder.layers.5.mlp.experts.local_experts.3.linear_fc2.weight"
    assert sharded_key(name) == ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (5, 3))
    assert sharded_key(name, stacked=False) == ("decoder.layers.5.mlp.experts.experts.linear_fc2.weight", (3,))
    assert sharded_key("decoder.layers.2.pre_mlp_layernorm.weight", stacked=False) == (
        "decoder.layers.2.mlp.linear_fc1.layer_norm_weight", ())
    assert sharded_key("decoder.layers.2.mlp.router.weight") == ("decoder.layers.mlp.router.weight", (2,))
    keys = extra_state_keys(ModelSpec.from_flavor("mixtral", "tiny", tp=1).sharding(1, 1))  # stacked: 2 layers
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.3_2.4" in keys
    assert not any("mlp.linear_fc1._extra_state" in key for key in keys)  # no dense MLP in Mixtral
    assert get_family("mixtral").flavor("tiny")["num_local_experts"] == 4

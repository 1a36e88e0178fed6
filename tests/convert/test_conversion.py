"""HF -> Megatron -> HF for the llama family at TP in {1,2} x PP in {1,2}, both formats:
bit-exact round trips, fp32 logits parity against transformers, and torch_dist resharding at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch.checkpoint.megatron import find_iteration_dir, load_legacy_payload, read_meta
from megatron_patch.checkpoint.trusted_load import megatron_lm_args_globals
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.convert.verify import fixed_tokens, hf_logits, megatron_logits

COMBOS = [(1, 1), (1, 2), (2, 1), (2, 2)]
FORMATS = ["legacy", "torch_dist"]
TOLERANCE = 1e-4

# Two tiny configs that between them cover GQA, MHA, tied and untied embeddings, a vocabulary that needs
# padding (2000 -> 2048, 1000 -> 1024), head_dim != hidden / heads, biases on every linear layer and llama-3.1 rope scaling.
CASES = {
    "gqa_untied": {},
    "mha_tied": {
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 48, "tie_word_embeddings": True,
        "attention_bias": True, "mlp_bias": True, "vocab_size": 1000,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    },
}

def legacy_payload(path) -> dict:
    """A legacy rank file as Megatron-LM's loaders read it: tensors, plain data and the run's ``args``."""
    return load_legacy_payload(path, allowed_globals=tuple(megatron_lm_args_globals()))



def hf_weights(hf_dir) -> dict[str, torch.Tensor]:
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(hf_dir / name)))
    return weights


@pytest.fixture(scope="module")
def converted(make_hf, tmp_path_factory):
    """{(case, fmt, tp, pp): (hf_dir, mcore_dir, exported_hf_dir)} with every conversion done once."""
    root = tmp_path_factory.mktemp("conversion")
    out = {}
    for case, overrides in CASES.items():
        hf_dir = make_hf(case, **overrides)
        for fmt in FORMATS:
            for tp, pp in COMBOS:
                mcore_dir = root / f"{case}_{fmt}_tp{tp}pp{pp}"
                hf_to_mcore(hf_dir, mcore_dir, tp=tp, pp=pp, fmt=fmt)
                back = mcore_to_hf(mcore_dir, root / f"{case}_{fmt}_tp{tp}pp{pp}_hf")
                out[(case, fmt, tp, pp)] = (hf_dir, mcore_dir, back)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp,pp", COMBOS)
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(converted, case, fmt, tp, pp):
    hf_dir, mcore_dir, back = converted[(case, fmt, tp, pp)]
    original, exported = hf_weights(hf_dir), hf_weights(back)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    config = json.loads((Path(back) / "config.json").read_text())
    assert config["vocab_size"] == json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    assert (Path(back) / "generation_config.json").is_file() and (Path(back) / "tokenizer.json").is_file()


def test_checkpoint_layout_and_metadata(converted):
    _, legacy, _ = converted[("gqa_untied", "legacy", 2, 2)]
    assert (legacy / "latest_checkpointed_iteration.txt").read_text() == "release"
    ranks = sorted(p.name for p in (legacy / "release").glob("mp_rank_*"))
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    meta = read_meta(legacy / "release")
    assert (meta["vocab_size"], meta["padded_vocab_size"]) == (2000, 2048)
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    shard = legacy_payload(legacy / "release" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    # Stage 1 holds global layers 2..3 renumbered from 0, the final norm and the output layer; TP rank 1 half rows.
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in shard and "decoder.layers.2.mlp.linear_fc1.weight" not in shard
    assert shard["output_layer.weight"].shape == (1024, 128)
    assert "embedding.word_embeddings.weight" not in shard
    _, torch_dist, _ = converted[("mha_tied", "torch_dist", 1, 1)]
    assert (find_iteration_dir(torch_dist) / "metadata.json").is_file()
    legacy_single = converted[("mha_tied", "legacy", 1, 1)][1]
    single = legacy_payload(legacy_single / "release" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    assert "output_layer.weight" not in single  # tied on one stage: the embedding is the output layer


@pytest.fixture(scope="module")
def logits(converted):
    """HF reference logits per case, and Megatron logits per (case, fmt, saved tp/pp, run tp/pp)."""
    tokens, reference = {}, {}
    for case in CASES:
        hf_dir = converted[(case, "legacy", 1, 1)][0]
        tokens[case] = fixed_tokens(hf_dir, 1000)
        reference[case] = hf_logits(hf_dir, tokens[case])
    assert all(t.shape == tokens["gqa_untied"].shape for t in tokens.values())
    batch = torch.cat([tokens[c] for c in CASES])
    results = {}
    for tp, pp in COMBOS:
        keys = [(case, fmt, tp, pp, tp, pp) for case in CASES for fmt in FORMATS]
        if (tp, pp) == (1, 1):  # resharding at load: checkpoints saved at TP=2 (and PP=2) run at TP=1 PP=1
            keys += [(case, "torch_dist", 2, spp, 1, 1) for case in CASES for spp in (1, 2)]
            keys += [(case, "legacy", 2, 2, 1, 1) for case in CASES]
        if (tp, pp) == (2, 2):  # and the other way: saved on one rank, run on four (tied output layer included)
            keys += [(case, fmt, 1, 1, 2, 2) for case in CASES for fmt in FORMATS]
        dirs = [find_iteration_dir(converted[k[:4]][1]) for k in keys]
        with pytest.MonkeyPatch.context() as env:  # the ranks check device placement as a GPU would (strict.py)
            env.setenv("MEGATRON_PATCH_STRICT_DEVICE", "1")
            outs = megatron_logits(dirs, batch, tp, pp)
        for key, out in zip(keys, outs):
            results[key] = out[list(CASES).index(key[0])].unsqueeze(0)
    return reference, results


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp,pp", COMBOS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(logits, case, fmt, tp, pp):
    reference, results = logits
    diff = (results[(case, fmt, tp, pp, tp, pp)] - reference[case]).abs().max().item()
    print(f"{case} {fmt} TP={tp} PP={pp}: max abs logit difference {diff:.2e}")
    assert diff <= TOLERANCE
    assert torch.equal(results[(case, fmt, tp, pp, tp, pp)].argmax(-1), reference[case].argmax(-1))


@pytest.mark.parametrize("saved_pp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_dist_saved_at_tp2_loads_at_tp1(logits, case, saved_pp):
    reference, results = logits
    resharded = results[(case, "torch_dist", 2, saved_pp, 1, 1)]
    native = results[(case, "torch_dist", 2, saved_pp, 2, saved_pp)]
    assert (resharded - reference[case]).abs().max().item() <= TOLERANCE
    assert (resharded - native).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("saved,run", [((2, 2), (1, 1)), ((1, 1), (2, 2))])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_runs_at_other_tp_pp_than_saved(logits, case, fmt, saved, run):
    reference, results = logits
    key = (case, fmt, *saved, *run)
    assert (results[key] - reference[case]).abs().max().item() <= TOLERANCE

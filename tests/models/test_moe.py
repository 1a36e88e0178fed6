"""Mixture-of-experts families (qwen_moe: Qwen2-MoE / Qwen3-MoE, mixtral) on megatron-core's MoE layer.

* Every size preset has the parameter count of transformers' model for the same config.
* HF config -> ModelArch: routing (norm_topk_prob), shared expert and its gate, dense layers (mlp_only_layers).
* The torch_dist writer stores exactly the keys, global shapes and chunks megatron-core's sharded state dict asks for
  (experts by global index, per-layer keys when MoE and dense layers mix), at any TP x PP x EP.
* Logits of the converted checkpoints (both formats, converted at one TP x PP x EP, run at another) equal
  transformers' to 1e-4 in fp32; the HF -> Megatron -> HF round trip is bit-exact.
* Greedy KV-cached generation equals transformers' greedy ``generate``.
* Bad input is refused before work, in one line.

The tiny checkpoints' routers get weights of std 0.5 (HF initialises them at 0.02): routing is decided by clear
margins, so a wrong top-k, normalisation or expert order changes the logits far beyond the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.errors import ConfigError, UnsupportedModelError
from megatron_patch.mapping import megatron_shape
from megatron_patch.models import get_family
from megatron_patch.models.presets import check_size_preset
from megatron_patch.models.spec import ModelSpec
from megatron_patch.models.tiny import make_hf_checkpoint
from megatron_patch.runtime import run_on_local_ranks
from tests.models import moe_workers

TOLERANCE = 1e-4
ENV = {"CUDA_VISIBLE_DEVICES": ""}
# name -> (family, flavor): Qwen2-MoE with a gated shared expert and a dense layer; Qwen3-MoE with q/k norms and
# renormalised top-k; Mixtral.
VARIANTS = {"qwen2_moe": ("qwen_moe", "tiny"), "qwen3_moe": ("qwen_moe", "tiny-qwen3"), "mixtral": ("mixtral", "tiny")}
FORMATS = ("torch_dist", "legacy")
# (TP, PP, EP) the checkpoints are converted for / run at. CI runs one layout; the full grid is slow.
GRID = [(tp, pp, ep) for ep in (1, 2) for tp in (1, 2) for pp in (1, 2)]
CI_LAYOUT = (2, 1, 2)


def _router_weights_decisive(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(3)
    for name, tensor in tensors.items():
        if name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_hf")
    dirs = {}
    for seed, (name, (family, flavor)) in enumerate(VARIANTS.items()):
        dirs[name] = root / name
        make_hf_checkpoint(dirs[name], get_family(family).flavor(flavor), seed=seed, tokenizer=False)
        _router_weights_decisive(dirs[name])
    return dirs


def _tokens() -> torch.Tensor:
    return torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def reference(hf_dirs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    out = {}
    for name, hf_dir in hf_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(_tokens()).logits.float()
    return out


# --- presets and configs ------------------------------------------------------------------------------------------

SLOW_PRESETS = {"qwen3-235B-a22B", "8x22B", "qwen2-57B-a14B"}  # tens of thousands of meta modules each
PRESETS = [pytest.param(family, size, marks=[pytest.mark.slow] if size in SLOW_PRESETS else [], id=f"{family}-{size}")
           for family in ("qwen_moe", "mixtral") for size in get_family(family).flavors]


@pytest.mark.parametrize("family,size", PRESETS)
def test_preset_parameter_count_matches_transformers(family, size):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = get_family(family).flavor(size)
    spec = ModelSpec.from_hf_config(config, tp=1, family=family, make_vocab_size_divisible_by=1)
    ours = sum(torch.Size(megatron_shape(e.global_name, spec.arch, spec.padded_vocab_size)).numel()
               for e in spec.sharding(1, 1).export_entries())
    hf = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    assert ours == sum(p.numel() for p in model.parameters())


def test_config_mapping():
    arch = get_family("qwen_moe").arch_from_hf(get_family("qwen_moe").flavor("tiny"))
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == (4, 2, 32)
    assert arch.moe_router_pre_softmax  # norm_topk_prob false: the top-k probabilities are not renormalised
    assert arch.moe_shared_expert_intermediate_size == 96 and arch.moe_shared_expert_gate
    assert arch.moe_layers == (1, 0, 1, 1) and arch.add_qkv_bias and not arch.qk_layernorm
    qwen3 = get_family("qwen_moe").arch_from_hf({**get_family("qwen_moe").flavor("tiny-qwen3"), "decoder_sparse_step": 2})
    assert not qwen3.moe_router_pre_softmax and qwen3.qk_layernorm and not qwen3.add_qkv_bias
    assert qwen3.moe_layers == (0, 1) and not qwen3.moe_shared_expert_intermediate_size
    mixtral = get_family("mixtral").arch_from_hf(get_family("mixtral").flavor("8x7B"))
    assert (mixtral.num_experts, mixtral.moe_router_topk, mixtral.moe_ffn_hidden_size) == (8, 2, 14336)
    assert not mixtral.moe_router_pre_softmax and mixtral.moe_layers is None


def test_bad_input_refused(hf_dirs, tmp_path, make_hf):
    mixtral = get_family("mixtral").flavor("tiny")
    with pytest.raises(UnsupportedModelError, match="top-k 5"):
        get_family("mixtral").arch_from_hf({**mixtral, "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="--ep 3 does not divide the 4 experts"):
        hf_to_mcore(hf_dirs["mixtral"], tmp_path / "out", ep=3)
    with pytest.raises(ConfigError, match="no experts"):
        hf_to_mcore(make_hf("llama_for_moe_refusal"), tmp_path / "out", ep=2)
    with pytest.raises(ConfigError, match="--model-name llama does not match the checkpoint: config.json says Mixtral"):
        hf_to_mcore(hf_dirs["mixtral"], tmp_path / "out", family="llama")
    with pytest.raises(ConfigError, match="--transformer-impl local only"):
        hf_to_mcore(hf_dirs["mixtral"], tmp_path / "out", transformer_impl="transformer_engine")
    assert not (tmp_path / "out").exists()
    qwen_moe = get_family("qwen_moe")
    with pytest.raises(ConfigError, match=r"tiny-qwen3 \(2 layers, hidden 64, 8 experts\) does not match .* 4 experts"):
        check_size_preset(qwen_moe, "tiny-qwen3", {**qwen_moe.flavor("tiny-qwen3"), "num_experts": 4})


# --- the torch_dist layout ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_dist_dirs(hf_dirs, tmp_path_factory) -> dict[str, str]:
    from megatron_patch.checkpoint.megatron import find_iteration_dir

    root = tmp_path_factory.mktemp("moe_td")
    return {name: str(find_iteration_dir(hf_to_mcore(hf_dirs[name], root / name, fmt="torch_dist")))
            for name in VARIANTS}


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow)])
def test_torch_dist_layout_is_megatron_cores(torch_dist_dirs, tp, pp, ep):
    from torch.distributed.checkpoint import FileSystemReader

    results = run_on_local_ranks(moe_workers.requested_keys_job, tp * pp * ep, torch_dist_dirs, tp, pp, ep, env=ENV)
    for name, iter_dir in torch_dist_dirs.items():
        stored = FileSystemReader(iter_dir).read_metadata().state_dict_metadata
        tensors, objects = {}, set()
        for rank_tensors, rank_objects in (result[name] for result in results):
            objects |= rank_objects
            for key, (shape, chunks) in rank_tensors.items():
                tensors.setdefault(key, (shape, []))[1].extend(chunks)
        assert set(stored) == set(tensors) | objects, (name, sorted(set(stored) ^ (set(tensors) | objects))[:6])
        for key, (shape, chunks) in tensors.items():
            assert tuple(stored[key].size) == shape, (name, key)
            if (tp, pp, ep) == (1, 1, 1):
                mine = sorted((tuple(c.offsets), tuple(c.sizes)) for c in stored[key].chunks)
                assert mine == sorted(set(chunks)), (name, key)


# --- parity and round trips -----------------------------------------------------------------------------------------


def _convert(hf_dirs, root: Path, tp: int, pp: int, ep: int) -> dict[str, str]:
    out = {}
    for name, hf_dir in hf_dirs.items():
        for fmt in FORMATS:
            out[f"{name}/{fmt}"] = str(hf_to_mcore(hf_dir, root / f"{name}-{tp}{pp}{ep}-{fmt}", tp=tp, pp=pp, ep=ep,
                                                   fmt=fmt))
    return out


def _check_parity(logits: dict, reference: dict, label: str) -> None:
    for key, value in logits.items():
        name = key.split("/")[0]
        vocab = reference[name].shape[-1]
        diff = (value[..., :vocab] - reference[name]).abs().max().item()
        print(f"MoE parity {key} {label}: max_abs_diff={diff:.3e}")
        assert diff <= TOLERANCE, f"{key} {label}: {diff:.3e}"


@pytest.mark.parametrize("layout", [pytest.param(CI_LAYOUT, id="tp2pp1ep2")] + [
    pytest.param(layout, id="tp{}pp{}ep{}".format(*layout), marks=pytest.mark.slow)
    for layout in GRID if layout != CI_LAYOUT])
def test_logits_match_transformers(hf_dirs, reference, tmp_path, layout):
    """Checkpoints converted for ``layout`` run at ``layout``; the torch_dist ones converted at EP=1 also run at it
    (experts stored by global index are resharded at load)."""
    tp, pp, ep = layout
    checkpoints = _convert(hf_dirs, tmp_path, tp, pp, ep)
    if ep > 1:
        checkpoints.update({f"{name}/torch_dist-ep1": str(hf_to_mcore(hf_dir, tmp_path / f"{name}-ep1", tp=tp, pp=pp))
                            for name, hf_dir in hf_dirs.items()})
    results = run_on_local_ranks(moe_workers.moe_parity_job, tp * pp * ep, checkpoints, _tokens(), tp, pp, ep,
                                 env=ENV, timeout=900)
    _check_parity(next(r for r in results if r is not None), reference, f"tp{tp}pp{pp}ep{ep}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, fmt):
    for name, hf_dir in hf_dirs.items():
        mcore = hf_to_mcore(hf_dir, tmp_path / f"{name}-mcore", tp=2, pp=2, ep=2, fmt=fmt)
        if fmt == "legacy":  # one file per TP x PP x EP rank, Megatron-LM's names
            assert len(list((mcore / "release").glob("mp_rank_0?_00?_00?/model_optim_rng.pt"))) == 8
        back = mcore_to_hf(mcore, tmp_path / f"{name}-back")
        original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
        assert sorted(exported) == sorted(original), name
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), f"{name} {fmt}: {key} differs"
        config = json.loads((hf_dir / "config.json").read_text())
        assert json.loads((back / "config.json").read_text())["architectures"] == config["architectures"]


# --- generation -----------------------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 250, 11, 7], [42, 8, 300]]
NEW_TOKENS = 8


def test_greedy_generation_matches_transformers(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoints = {name: str(hf_to_mcore(hf_dir, tmp_path / name, fmt="legacy")) for name, hf_dir in hf_dirs.items()}
    ours = run_on_local_ranks(moe_workers.greedy_job, 1, checkpoints, PROMPTS, NEW_TOKENS, env=ENV)[0]
    for name, hf_dir in hf_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        for prompt, completion in zip(PROMPTS, ours[name]):
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            assert completion == out[0, len(prompt):].tolist(), name
        assert len({tuple(c) for c in ours[name]}) > 1 and len(set(ours[name][0])) > 2, "degenerate text"


def test_offline_generation_at_expert_parallel_size_2(make_hf, tmp_path):
    """The generation entry at EP=2 (two ranks, each with 2 of Mixtral's 4 experts, a torch_dist checkpoint saved at
    EP=1): three prompts of different lengths one per batch, so the ranks generate different numbers of steps and
    rounds (rank 1 has one prompt, rank 0 two) and must step together; the completions equal transformers' greedy."""
    import shutil

    from tests.generation.test_cli import OUTPUT_LEN, transformers_completions

    hf = tmp_path / "hf"
    shutil.copytree(make_hf("moe_generate_mixtral", family="mixtral", seed=4), hf)
    _router_weights_decisive(hf)
    mcore = hf_to_mcore(hf, tmp_path / "mcore")
    prompts = ["The quick brown fox jumps over", "A quiet village", "Megatron splits each layer across the ranks of"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["--load", str(mcore), "--expert-model-parallel-size", "2", "--micro-batch-size", "1", "--seq-length", "64",
            "--out-seq-length", str(OUTPUT_LEN), "--text-generate-input-file", str(tmp_path / "prompts.txt"),
            "--text-generate-output-file", str(out)]
    assert run_on_local_ranks(moe_workers.generate_cli_job, 2, argv, env=ENV, timeout=600) == [3, 3]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["completion"] for row in rows] == transformers_completions(hf, prompts)
    assert len({row["completion"] for row in rows}) == 3


def test_verify_cli_at_expert_parallel_size(hf_dirs, tmp_path, capsys):
    from megatron_patch.convert.__main__ import main

    mcore = tmp_path / "mixtral-ep2"
    assert main(["hf2mcore", "--load", str(hf_dirs["mixtral"]), "--save", str(mcore), "--ep", "2",
                 "--format", "legacy"]) in (0, None)
    assert "EP=2" in capsys.readouterr().out
    assert main(["verify", "--hf", str(hf_dirs["mixtral"]), "--mcore", str(mcore)]) == 0  # at EP=2, as saved
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("PASS") and float(line.split()[0].split("=")[1]) <= TOLERANCE, line
    assert main(["verify", "--hf", str(hf_dirs["mixtral"]), "--mcore", str(mcore), "--ep", "3"]) == 1
    assert "--ep 3 does not divide the 4 experts" in capsys.readouterr().err

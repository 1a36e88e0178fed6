"""Generation correctness on converted checkpoints, for every registered family, in fp32 on the CPU:

* greedy continuations equal transformers' ``generate`` on the HF original, token for token, at TP=1, TP=2 and
  (for three variants) PP=2,
  from legacy checkpoints (saved at TP=1, split at load) and a torch_dist training-style checkpoint (saved at
  TP=2 in ``iter_0000010/``, resharded to TP=1 at load);
* Baichuan-7B (remote code, no transformers class) is checked against transformers' llama on the same weights
  (``W_pack`` = q, k, v stacked); Baichuan2-7B (NormHead), Baichuan-13B / Baichuan2-13B (ALiBi) and Qwen v1 against
  greedy decoding over the independent forward passes of ``tests/reference``;
* the KV-cache path equals re-running the whole prefix; batched prompts of different lengths equal one-by-one;
* greedy with a repetition penalty equals transformers'; generation stops at EOS where transformers' does;
* seeded sampling is reproducible (and a different seed differs) at TP=1 and TP=2;
* a model without loaded weights is refused.

All megatron work runs in two spawned jobs (TP=2, then TP=1) shared by every test here.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.models import get_family, supported_families
from megatron_patch.runtime import run_on_local_ranks

from . import jobs

FAMILIES = ["llama", "qwen", "baichuan", "bloom"]
# variant -> (family, flavor, reference). References: "hf" = transformers' generate on the HF original; "llama-twin"
# = transformers' llama on the same weights (Baichuan-7B is llama with q, k, v fused into W_pack); otherwise an
# independent forward pass in tests/reference (remote-code models transformers does not ship), decoded greedily.
VARIANTS = {
    "llama": ("llama", "tiny", "hf"),
    "qwen2": ("qwen", "tiny", "hf"),
    "qwen1": ("qwen", "tiny-qwen1", "qwen_v1"),
    "baichuan-7b": ("baichuan", "tiny", "llama-twin"),
    "baichuan2-7b": ("baichuan", "tiny-baichuan2", "baichuan"),
    "baichuan-13b": ("baichuan", "tiny-13b", "baichuan"),
    "baichuan2-13b": ("baichuan", "tiny-baichuan2-13b", "baichuan"),
    "bloom": ("bloom", "tiny", "hf"),
}
BAICHUAN_SWITCHES = {  # what the reference is told directly (the converter infers it from config.json)
    "baichuan2-7b": dict(alibi=False, norm_head=True),
    "baichuan-13b": dict(alibi=True, norm_head=False),
    "baichuan2-13b": dict(alibi=True, norm_head=True),
}
# Also run at PP=2: llama from the torch_dist checkpoint the TP=2 job saves (TP=2 -> TP=1 x PP=2 at load); tied
# embeddings split across stages (bloom) and ALiBi on the second stage (baichuan-13b) from legacy checkpoints saved
# at PP=2.
PP2 = ["llama/torch_dist", "bloom/legacy-pp2", "baichuan-13b/legacy-pp2"]
TRAINED = "llama/torch_dist"  # saved from llama/legacy by the TP=2 job, loaded by the TP=1 job and at PP=2
# The CPU path with the strict device check (runtime/strict.py): a tensor a GPU run would find misplaced fails here.
ENV = {"CUDA_VISIBLE_DEVICES": "", "MEGATRON_PATCH_STRICT_DEVICE": "1"}
# With the default init (std 0.02) tiny bloom's tied, LayerNorm-ed embedding dominates the residual stream and
# greedy decoding only repeats the last prompt token, which would test nothing: larger weights give varied text.
INIT_OVERRIDES = {"bloom": {"initializer_range": 0.2}}


def _tiny_hf(path: Path, config: dict) -> str:
    from megatron_patch.models.tiny import make_hf_checkpoint

    make_hf_checkpoint(path, config, seed=0, tokenizer=False)  # token ids only here: no tokenizer to train
    return str(path)


def _baichuan_from_llama(root: Path) -> tuple[str, str]:
    """A Baichuan-7B-style HF directory and its transformers llama twin (same weights, q/k/v unfused)."""
    from safetensors.torch import load_file, save_file

    config = get_family("baichuan").flavor("tiny")
    twin_config = {**get_family("llama").flavor("tiny"), **{k: config[k] for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
        "max_position_embeddings", "rms_norm_eps")}, "num_key_value_heads": config["num_attention_heads"]}
    twin = _tiny_hf(root / "baichuan-llama-twin", twin_config)
    out = root / "baichuan-hf"
    out.mkdir()
    weights = load_file(str(Path(twin) / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        weights[prefix + "W_pack.weight"] = torch.cat([weights.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(Path(twin) / "generation_config.json", out / "generation_config.json")
    return str(out), twin


def _eos_list(eos) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def hf_generate(model, prompts, new_tokens, eos, **kwargs):
    """transformers' generate, one prompt at a time (no padding), returning only the new tokens."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=0, **kwargs)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def forward_generate(forward, prompts, new_tokens, eos, repetition_penalty=1.0):
    """Greedy decoding with a full forward pass per token (a reference without any cache), transformers' rules for
    the repetition penalty and EOS."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    outputs = []
    for prompt in prompts:
        sequence, new = list(prompt), []
        while len(new) < new_tokens:
            ids = torch.tensor([sequence])
            with torch.no_grad():
                logits = forward(ids)[:, -1].float()
            if penalty is not None:
                logits = penalty(ids, logits)
            token = int(logits.argmax(-1))
            sequence.append(token)
            new.append(token)
            if token in _eos_list(eos):
                break
        outputs.append(new)
    return outputs


def _reference(variant: str, root: Path, make_hf):
    """(HF directory, generate(prompts, new_tokens, eos, **kwargs), the model's EOS) for a variant."""
    family, flavor, kind = VARIANTS[variant]
    if kind in ("hf", "llama-twin"):
        from transformers import AutoModelForCausalLM

        if variant == "llama":
            hf_dir = reference_dir = make_hf("gqa_untied")  # the converter tests' llama: built once per session
        elif kind == "llama-twin":
            hf_dir, reference_dir = _baichuan_from_llama(root)
        else:
            config = {**get_family(family).flavor(flavor), **INIT_OVERRIDES.get(family, {})}
            hf_dir = reference_dir = _tiny_hf(root / f"{variant}-hf", config)
        model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
        return hf_dir, functools.partial(hf_generate, model), model.config.eos_token_id
    from tests.reference import baichuan as baichuan_reference
    from tests.reference import qwen_v1 as qwen_v1_reference
    from tests.reference import save_hf_dir

    module = {"baichuan": baichuan_reference, "qwen_v1": qwen_v1_reference}[kind]
    config = get_family(family).flavor(flavor)
    tensors = module.random_checkpoint(config, seed=0)
    hf_dir = save_hf_dir(root / f"{variant}-hf", config, tensors)
    forward = functools.partial(module.forward, tensors, config, **BAICHUAN_SWITCHES.get(variant, {}))

    def generate(prompts, new_tokens, eos, repetition_penalty=1.0):
        return forward_generate(forward, prompts, new_tokens, eos, repetition_penalty)

    return hf_dir, generate, config.get("eos_token_id")


def _stop_token(greedy: list[list[int]]) -> tuple[int, int] | None:
    """(row, token): a token some row's greedy continuation first produces at step >= 2."""
    for row, tokens in enumerate(greedy):
        for i, token in enumerate(tokens):
            if i >= 2 and token not in tokens[:i]:
                return row, token
    return None


@pytest.fixture(scope="module")
def generated(make_hf, tmp_path_factory):
    """Both jobs, run once for every variant of every registered family:
    (checkpoints, references, TP=1 results, TP=2 results); checkpoint names are ``<variant>/<format>``."""
    root = tmp_path_factory.mktemp("generation")
    checkpoints, references, stop_tokens, pp2 = {}, {}, {}, {}
    for variant in VARIANTS:  # every variant: a missing family or reference fails here, it is never skipped
        hf_dir, generate, eos = _reference(variant, root, make_hf)
        hf_to_mcore(hf_dir, root / f"{variant}-legacy", tp=1, fmt="legacy")
        checkpoints[f"{variant}/legacy"] = str(root / f"{variant}-legacy")
        greedy = generate(jobs.PROMPTS, jobs.TP1_NEW_TOKENS, eos)
        stop = _stop_token(greedy)
        references[variant] = {
            "greedy": greedy,
            "penalty": generate(jobs.PROMPTS, jobs.TP1_NEW_TOKENS, eos, repetition_penalty=jobs.PENALTY),
            "greedy_tp2": [g[: jobs.TP2_NEW_TOKENS] for g in greedy],
            "stop": stop,
            "stopped": generate(jobs.PROMPTS, jobs.TP1_NEW_TOKENS, stop[1]) if stop else None,
        }
        if stop:
            stop_tokens[f"{variant}/legacy"] = stop[1]
        if f"{variant}/legacy-pp2" in PP2:
            hf_to_mcore(hf_dir, root / f"{variant}-legacy-pp2", pp=2, fmt="legacy")
            pp2[f"{variant}/legacy-pp2"] = str(root / f"{variant}-legacy-pp2")
    if "llama/legacy" in stop_tokens:
        stop_tokens[TRAINED] = stop_tokens["llama/legacy"]

    trained_dir = root / "llama-trained"
    if "llama/legacy" in checkpoints:
        pp2[TRAINED] = str(trained_dir)
    tp2 = run_on_local_ranks(jobs.tp2_job, 2, checkpoints, "llama/legacy", str(trained_dir), pp2, env=ENV)[0]
    checkpoints[TRAINED] = str(trained_dir)
    tp1 = run_on_local_ranks(jobs.tp1_job, 1, checkpoints, stop_tokens, env=ENV)[0]
    return checkpoints, references, tp1, tp2


def _names(checkpoints, family):
    """The checkpoints of every variant of ``family``."""
    if family not in supported_families():  # a family this test covers must exist: fail, never skip
        pytest.fail(f"family '{family}' is not registered (supported: {', '.join(supported_families())})")
    return [name for name in checkpoints if VARIANTS[name.split("/")[0]][0] == family]


def _variant(name: str) -> str:
    return name.split("/")[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_at_tp1(generated, family):
    checkpoints, references, tp1, _ = generated
    for name in _names(checkpoints, family):
        reference = references[_variant(name)]
        assert tp1[name]["greedy"] == reference["greedy"], name
        assert tp1[name]["penalty"] == reference["penalty"], name
        if reference["stopped"] is not None:
            assert tp1[name]["stopped"] == reference["stopped"], name


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_at_tp2(generated, family):
    checkpoints, references, _, tp2 = generated
    for name in _names(checkpoints, family):
        if name != TRAINED:  # written by the TP=2 job itself
            assert tp2[name] == references[_variant(name)]["greedy_tp2"], name


@pytest.mark.parametrize("name", PP2)
def test_greedy_matches_transformers_at_pp2(generated, name):
    _, references, _, tp2 = generated
    if "pp2/" + name not in tp2:
        pytest.fail(f"{name} was not generated at PP=2 (is its family registered?)")
    assert tp2["pp2/" + name] == references[_variant(name)]["greedy_tp2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_and_batching_do_not_change_tokens(generated, family):
    checkpoints, _, tp1, _ = generated
    for name in _names(checkpoints, family):
        out = tp1[name]
        assert out["greedy_no_cache"] == out["greedy"], name
        assert out["greedy_one_by_one"] == out["greedy"], name
        assert out["sampled_no_cache"] == out["sampled"][0], name


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_is_reproducible(generated, family):
    checkpoints, _, tp1, tp2 = generated
    for name in _names(checkpoints, family):
        same_a, same_b, other_seed = tp1[name]["sampled"]
        assert same_a == same_b, name
        assert other_seed != same_a, name
        assert all(len(c) == jobs.TP1_NEW_TOKENS for c in same_a), "no EOS configured: every row runs to the end"
    if family == "llama":
        first, second = tp2["llama/legacy/sampled"]
        assert first == second


def test_the_trained_checkpoint_was_really_written(generated):
    checkpoints = generated[0]
    iter_dir = Path(checkpoints[TRAINED]) / f"iter_{jobs.TRAINED_ITERATION:07d}"
    assert json.loads((iter_dir / "megatron_patch.json").read_text())["format"] == "torch_dist"
    assert list(iter_dir.glob("*.distcp"))


def test_generation_stops_at_eos(generated):
    checkpoints, references, tp1, _ = generated
    _names(checkpoints, "llama")
    row, _ = references["llama"]["stop"]
    greedy = references["llama"]["greedy"][row]
    stopped = tp1["llama/legacy"]["stopped"][row]
    assert 3 <= len(stopped) < len(greedy)
    assert stopped == greedy[: len(stopped)] and stopped[-1] not in stopped[:-1]


def test_a_model_without_loaded_weights_is_refused(generated):
    assert "no checkpoint weights were loaded" in generated[2]["refused"]

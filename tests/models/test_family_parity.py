"""qwen, baichuan and bloom: HF -> Megatron logits parity at TP{1,2} x PP{1,2} in both checkpoint formats, and
bit-exact HF -> Megatron -> HF round trips.

References: HF transformers for Qwen2, Qwen3 and Bloom; the independent forward passes in ``tests/reference`` for
the remote-code models (Baichuan 1/2 7B/13B, Qwen v1), whose tiny checkpoints are written here in their original
names and layout. All ranks of one TP x PP run every variant in one spawned job (see ``family_workers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.models import get_family
from megatron_patch.runtime import run_on_local_ranks
from tests.models import family_workers
from tests.reference import baichuan as baichuan_ref
from tests.reference import qwen_v1 as qwen_v1_ref
from tests.reference import save_hf_dir

TOLERANCE = 1e-4
PARALLEL = [(1, 1), (2, 1), (1, 2), (2, 2)]
FORMATS = ("torch_dist", "legacy")

# name -> (family, flavor, reference): "hf" = transformers, else a tests/reference module with its switches.
VARIANTS = {
    "qwen2": ("qwen", "tiny", "hf"),
    "qwen3": ("qwen", "tiny-qwen3", "hf"),
    "qwen1": ("qwen", "tiny-qwen1", "qwen_v1"),
    "baichuan-7b": ("baichuan", "tiny", "baichuan"),
    "baichuan2-7b": ("baichuan", "tiny-baichuan2", "baichuan"),
    "baichuan-13b": ("baichuan", "tiny-13b", "baichuan"),
    "baichuan2-13b": ("baichuan", "tiny-baichuan2-13b", "baichuan"),
    "bloom": ("bloom", "tiny", "hf"),
}
# What the reference is told directly (the converter must infer it from config.json).
BAICHUAN_SWITCHES = {
    "baichuan-7b": dict(alibi=False, norm_head=False),
    "baichuan2-7b": dict(alibi=False, norm_head=True),
    "baichuan-13b": dict(alibi=True, norm_head=False),
    "baichuan2-13b": dict(alibi=True, norm_head=True),
}
HF_OVERRIDES = {"qwen2": {"tie_word_embeddings": True}}  # Qwen2.5's small sizes tie the output layer


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(7))


def _hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _build_variant(name: str, root: Path, make_hf, tokens: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(HF directory, reference logits) of a variant."""
    family, flavor, reference = VARIANTS[name]
    config = {**get_family(family).flavor(flavor), **HF_OVERRIDES.get(name, {})}
    if reference == "hf":
        hf_dir = make_hf(f"family-{name}", family=family, flavor=flavor, **HF_OVERRIDES.get(name, {}))
        return hf_dir, _hf_logits(hf_dir, tokens)
    module = {"baichuan": baichuan_ref, "qwen_v1": qwen_v1_ref}[reference]
    tensors = module.random_checkpoint(config, seed=sorted(VARIANTS).index(name))
    hf_dir = save_hf_dir(root / "hf" / name, config, tensors)
    with torch.no_grad():
        logits = module.forward(tensors, config, tokens, **BAICHUAN_SWITCHES.get(name, {}))
    return hf_dir, logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_hf):
    """Everything the tests below check, computed once: reference logits, Megatron logits per variant x TP x PP x
    format, and the HF directories exported back from every checkpoint."""
    root = tmp_path_factory.mktemp("families")
    tokens = _tokens(500)
    hf_dirs, reference = {}, {}
    for name in VARIANTS:
        hf_dirs[name], reference[name] = _build_variant(name, root, make_hf, tokens)

    megatron, exported = {}, {}
    for tp, pp in [(2, 2), (2, 1), (1, 2), (1, 1)]:
        jobs = []
        for name in VARIANTS:
            tag = f"{name}-tp{tp}pp{pp}"
            for fmt in FORMATS:
                mcore_dir = root / "mcore" / f"{tag}-{fmt}"
                hf_to_mcore(hf_dirs[name], mcore_dir, tp=tp, pp=pp, fmt=fmt)
                exported[(name, tp, pp, fmt)] = mcore_to_hf(mcore_dir, root / "back" / f"{tag}-{fmt}")
            jobs.append({"name": name, "legacy_dir": str(root / "mcore" / f"{tag}-legacy"),
                         "torch_dist_dir": str(root / "mcore" / f"{tag}-torch_dist")})
        results = run_on_local_ranks(family_workers.parity_job, tp * pp, jobs, tokens, tp, pp,
                                     env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
        for name, by_format in next(r for r in results if r is not None).items():
            for fmt, logits in by_format.items():
                megatron[(name, tp, pp, fmt)] = logits
    return {"hf_dirs": hf_dirs, "reference": reference, "megatron": megatron, "exported": exported}


CASES = [pytest.param(name, tp, pp, id=f"{name}-tp{tp}pp{pp}") for name in VARIANTS for tp, pp in PARALLEL]


@pytest.mark.parametrize("name,tp,pp", CASES)
def test_logits_match_reference(runs, name, tp, pp):
    reference = runs["reference"][name]
    vocab = reference.shape[-1]
    for fmt in FORMATS:
        logits = runs["megatron"][(name, tp, pp, fmt)]
        assert logits.shape[:-1] == reference.shape[:-1] and logits.shape[-1] >= vocab
        diff = (logits[..., :vocab] - reference).abs().max().item()
        print(f"parity {name} tp{tp} pp{pp} {fmt}: max_abs_diff={diff:.3e}")
        assert diff <= TOLERANCE, f"{name} tp{tp} pp{pp} {fmt}: max abs logit difference {diff:.3e}"
        # Padded vocabulary rows are zero, so their logits must be exactly zero (NormHead keeps them zero too).
        assert torch.count_nonzero(logits[..., vocab:]) == 0


@pytest.mark.parametrize("name,tp,pp", CASES)
def test_round_trip_is_bit_exact(runs, name, tp, pp):
    original = load_file(str(Path(runs["hf_dirs"][name]) / "model.safetensors"))
    config = json.loads((Path(runs["hf_dirs"][name]) / "config.json").read_text())
    for fmt in FORMATS:
        back_dir = Path(runs["exported"][(name, tp, pp, fmt)])
        back = load_file(str(back_dir / "model.safetensors"))
        assert sorted(back) == sorted(original), f"{fmt}: tensor names differ"
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), f"{fmt}: {key} differs"
        back_config = json.loads((back_dir / "config.json").read_text())
        assert {k: v for k, v in back_config.items() if k not in ("dtype", "torch_dtype")} == \
            {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}


def test_baichuan_7b_is_llama_with_w_pack_split(runs):
    """Baichuan-7B with W_pack split into q/k/v is transformers' llama: the independent reference and the
    Megatron model both agree with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = Path(runs["hf_dirs"]["baichuan-7b"])
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    state = {}
    for key, value in tensors.items():
        if key.endswith("self_attn.W_pack.weight"):
            prefix = key[: -len("W_pack.weight")]
            for part, block in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                state[f"{prefix}{part}.weight"] = block
        else:
            state[key] = value
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], rms_norm_eps=cfg["rms_norm_eps"], rope_theta=10000.0,
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
    )).eval()
    llama.load_state_dict(state, strict=True)
    with torch.no_grad():
        llama_logits = llama(_tokens(cfg["vocab_size"])).logits.float()
    assert (llama_logits - runs["reference"]["baichuan-7b"]).abs().max().item() <= TOLERANCE
    megatron = runs["megatron"][("baichuan-7b", 2, 2, "torch_dist")][..., : cfg["vocab_size"]]
    assert (llama_logits - megatron).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(BAICHUAN_SWITCHES))
def test_baichuan_variants_are_told_apart(runs, name):
    """The parity above can fail: the reference with either switch flipped (RoPE <-> ALiBi, NormHead on <-> off)
    is far from the Megatron logits, so each variant's detection from config.json is what makes them agree."""
    hf_dir = Path(runs["hf_dirs"][name])
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    megatron = runs["megatron"][(name, 1, 1, "torch_dist")][..., : config["vocab_size"]]
    switches = BAICHUAN_SWITCHES[name]
    for flip in switches:
        wrong = {**switches, flip: not switches[flip]}
        with torch.no_grad():
            logits = baichuan_ref.forward(tensors, config, _tokens(config["vocab_size"]), **wrong)
        assert (logits - megatron).abs().max().item() > 100 * TOLERANCE, f"{flip} made no difference"


def test_bloom_checkpoint_saved_without_transformer_prefix(make_hf, tmp_path):
    """bigscience's bloom repositories store ``h.0...`` (saved from BloomModel); they convert to the same model."""
    from safetensors.torch import save_file

    hf_dir = Path(make_hf("family-bloom", family="bloom", flavor="tiny"))
    original = load_file(str(hf_dir / "model.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file({k.removeprefix("transformer."): v for k, v in original.items()}, str(bare / "model.safetensors"))
    hf_to_mcore(bare, tmp_path / "mcore", tp=2, pp=2, fmt="legacy")
    back = load_file(str(mcore_to_hf(tmp_path / "mcore", tmp_path / "back") / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())

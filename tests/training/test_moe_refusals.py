"""Bad mixture-of-experts input is refused by the launch pre-flight (one process, before any rank starts), in one line
naming the flag: an expert-parallel size that does not divide the experts or the data-parallel ranks, a top-k larger
than the experts, a checkpoint whose expert count is not MODEL_SIZE's, MoE flags on a dense model."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_patch.checkpoint.checksums import MANIFEST
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.errors import CheckpointError, ConfigError
from megatron_patch.generate import build_parser
from megatron_patch.generation.checks import preflight as generation_preflight
from megatron_patch.training.arguments import TrainConfig
from megatron_patch.training.preflight import preflight


@pytest.fixture(scope="module")
def moe_ckpt(make_hf, tmp_path_factory):
    """A tiny Qwen2-MoE (4 experts, top-2) converted to torch_dist, and an empty indexed dataset beside it."""
    root = tmp_path_factory.mktemp("moe_refusals")
    hf = make_hf("moe_train_qwen2_moe", family="qwen_moe")  # the HF model of test_moe_training (built once per session)
    hf_to_mcore(hf, root / "mcore")
    for suffix in (".bin", ".idx"):  # the pre-flight checks that the files exist, nothing more
        (root / f"d_text_document{suffix}").write_bytes(b"")
    return root


def pretrain(root, **flags) -> TrainConfig:
    return TrainConfig(mode="pretrain", load=str(root / "mcore"), data_path=[str(root / "d_text_document")],
                       train_iters=1, global_batch_size=12, **flags)


@pytest.mark.parametrize("world,flags,message", [
    (3, dict(expert_model_parallel_size=3), "--expert-model-parallel-size 3 does not divide the 4 experts"),
    (2, dict(expert_model_parallel_size=4), "--expert-model-parallel-size 4 does not divide the data-parallel size 2"),
    (4, dict(expert_model_parallel_size=4, tensor_model_parallel_size=2),
     "--expert-model-parallel-size 4 does not divide the data-parallel size 2 (world size 4 / TP x PP 2x1)"),
    (1, dict(model_size="tiny-qwen3"), "--model-size tiny-qwen3 (2 layers, hidden 64, 8 experts) does not match the "
                                       "--load checkpoint (4 layers, hidden 64, 4 experts): the checkpoint is qwen_moe "
                                       "preset tiny"),
])
def test_refused_before_any_rank(moe_ckpt, world, flags, message):
    with pytest.raises(ConfigError) as error:
        preflight(pretrain(moe_ckpt, **flags), world_size=world)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_accepted_when_ep_fits(moe_ckpt):
    preflight(pretrain(moe_ckpt, expert_model_parallel_size=2, model_size="tiny", moe_aux_loss_coeff=0.001), 2)
    preflight(pretrain(moe_ckpt, expert_model_parallel_size=4), 4)


def test_top_k_larger_than_the_experts(moe_ckpt, tmp_path):
    """A checkpoint whose recorded config routes each token to more experts than it has."""
    bad = tmp_path / "mcore"
    shutil.copytree(moe_ckpt / "mcore", bad)
    meta_path = bad / "release" / "megatron_patch.json"
    meta = json.loads(meta_path.read_text())
    meta["hf_config"]["num_experts_per_tok"] = 5
    meta_path.write_text(json.dumps(meta))
    (bad / "release" / MANIFEST).unlink()  # the edit is the case: the metadata check behind the checksum is tested
    cfg = TrainConfig(mode="pretrain", load=str(bad), data_path=[str(moe_ckpt / "d_text_document")], train_iters=1)
    with pytest.raises(CheckpointError, match=r"megatron_patch\.json: top-k 5 \(num_experts_per_tok\) must be between 1 "
                                              r"and the number of experts \(4\)$"):
        preflight(cfg, world_size=1)


@pytest.mark.parametrize("flags", [
    dict(expert_model_parallel_size=2),
    dict(moe_token_dispatcher_type="allgather"),
    dict(moe_router_load_balancing_type="seq_aux_loss"),
    dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
])
def test_moe_flags_on_a_dense_model(workspace, flags):
    cfg = TrainConfig(mode="pretrain", load=workspace["ckpt"], data_path=[workspace["data"]], train_iters=1,
                      global_batch_size=2, **flags)
    names = ", ".join(f"--{name.replace('_', '-')}" for name in flags)
    with pytest.raises(ConfigError, match=f"^{names} given for a dense model \\(it has no experts\\)$"):
        preflight(cfg, world_size=2)


def test_ep_on_a_preset_without_checkpoint(moe_ckpt):
    """Training from scratch (--model-name / --model-size, no --load): the preset's experts decide."""
    cfg = TrainConfig(mode="pretrain", model_name="mixtral", model_size="tiny", expert_model_parallel_size=3,
                      tokenizer_model=str(moe_ckpt / "mcore" / "release" / "hf_assets"),
                      data_path=[str(moe_ckpt / "d_text_document")], train_iters=1, global_batch_size=3)
    with pytest.raises(ConfigError, match="^--expert-model-parallel-size 3 does not divide the 4 experts$"):
        preflight(cfg, world_size=3)


@pytest.mark.parametrize("world,ep,message", [
    (3, 3, "--expert-model-parallel-size 3 does not divide the 4 experts"),
    (2, 4, "--expert-model-parallel-size 4 does not divide the data-parallel size 2 (2 processes / TP x PP 1x1)"),
    (1, 0, "--expert-model-parallel-size must be >= 1 (got 0)"),
])
def test_generation_refuses_before_any_rank(moe_ckpt, tmp_path, monkeypatch, world, ep, message):
    (tmp_path / "p.txt").write_text("hello\n")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = build_parser().parse_args(["--load", str(moe_ckpt / "mcore"), "--ep", str(ep), "--seq-length", "64",
                                      "--out-seq-length", "8", "--text-generate-input-file", str(tmp_path / "p.txt"),
                                      "--text-generate-output-file", str(tmp_path / "o.jsonl")])
    with pytest.raises(ConfigError) as error:
        generation_preflight(args)
    assert str(error.value).startswith(message)
    assert not (tmp_path / "o.jsonl").exists()


def test_generation_refuses_ep_for_a_dense_model(workspace, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("hello\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = build_parser().parse_args(["--load", workspace["ckpt"], "--ep", "2", "--seq-length", "64",
                                      "--out-seq-length", "8", "--text-generate-input-file", str(tmp_path / "p.txt"),
                                      "--text-generate-output-file", str(tmp_path / "o.jsonl")])
    with pytest.raises(ConfigError, match="^--expert-model-parallel-size 2 needs a mixture-of-experts model"):
        generation_preflight(args)

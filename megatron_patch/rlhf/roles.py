"""The four models of RLHF on megatron-core, each one pipeline stage on this rank at the run's TP x PP:

  - actor: a GPTModel in megatron-core DDP with its optimizer; it also generates the rollouts (the engine runs
    over the same module, so rollouts always use the weights being trained: no copy, no conversion);
  - critic (PPO): the reward-model architecture (scalar head) in DDP with its own optimizer, initialised from the
    reward model (or the actor's backbone with a new head);
  - reference: a frozen GPTModel (no optimizer, no gradient buffers); with ``--lora-rank`` the actor's own stage with
    its adapters switched off (``BaseOfActor``: the frozen base the adapters train on, no second model);
  - reward model: a frozen reward-model stage, or None when the reward is a Python function.

The preference trainers build theirs here too: DPO's policy is an actor and its reference a reference; the
reward-model trainer trains a stage built as the critic is (``build_trained_reward_model``).

``check_vocabularies`` and ``check_full_weights`` run before any process group exists: every model must share the
actor's vocabulary, and start from full weights. Mixture-of-experts checkpoints are built as their families say
(megatron-core's MoE layer) at expert-parallel size 1: ``check_expert_parallel`` refuses more before any process group
exists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..layers.lora import adapters_disabled
from ..layers.lora_config import read_lora_meta
from ..models.builder import build_model
from ..models.checkpoint import Checkpoint
from ..runtime.device import place_model
from ..training.arguments import EP_FLAG, TrainConfig
from ..training.setup import (
    attach_schedule_hooks,
    build_ddp_model,
    build_optimizer,
    build_scheduler,
    build_transformer_config,
    resolve_model_source,
    wrap_in_ddp,
)
from ..training.step import TrainedModel
from .preference.reward_model import build_reward_model, load_reward_model_weights


def check_vocabularies(actor_spec, others: dict[str, Path]) -> None:
    """Refuse (one line) a reference / reward / critic checkpoint whose vocabulary differs from the actor's."""
    for flag, iter_dir in others.items():
        spec = Checkpoint.open(iter_dir).spec
        if (spec.vocab_size, spec.padded_vocab_size) != (actor_spec.vocab_size, actor_spec.padded_vocab_size):
            raise CheckpointError(f"{flag} {iter_dir} has a vocabulary of {spec.vocab_size} tokens, the actor's has "
                                  f"{actor_spec.vocab_size}: RLHF needs one tokenizer for every model")


def check_full_weights(checkpoints: dict[str, Path]) -> None:
    """Refuse (one line) an adapter-only checkpoint (a ``--lora-rank`` run's) as a starting point or a reference:
    with LoRA the reference is the base with the adapters off, which would not be the model the adapters made."""
    for flag, iter_dir in checkpoints.items():
        record = read_lora_meta(iter_dir)
        if record is not None:
            raise CheckpointError(f"{flag} {iter_dir} holds LoRA adapters only (on {record['base']}): RLHF starts from "
                                  "full weights; merge them first (mcore2hf --merge-lora, then hf2mcore)")


def check_expert_parallel(cfg: TrainConfig) -> None:
    """Refuse (one line) an expert-parallel size above 1: the process groups here are TP x PP x DP only, and the
    rollouts of a rank would have to meet every other rank of its EP group at each generated token."""
    if cfg.expert_model_parallel_size != 1:
        raise ConfigError(f"{EP_FLAG} {cfg.expert_model_parallel_size}: RLHF and the preference trainers run "
                          "mixture-of-experts models at expert-parallel size 1 (each rank holds every expert)")


def _with_optimizer(cfg: TrainConfig, source, config, model, optimizer_steps: int) -> TrainedModel:
    """``model`` (in DDP) with its optimizer and LR schedule, both handed to the pipeline schedule via ``config``."""
    optimizer = build_optimizer(cfg, model)
    attach_schedule_hooks(config, model, optimizer)
    return TrainedModel(model, optimizer, build_scheduler(cfg, optimizer, optimizer_steps), source)


def build_actor(cfg: TrainConfig, source, optimizer_steps: int) -> TrainedModel:
    """A GPTModel stage in DDP with its optimizer; weights loaded by the caller. Also DPO's policy."""
    config = build_transformer_config(cfg, source)
    return _with_optimizer(cfg, source, config, build_ddp_model(cfg, source, config), optimizer_steps)


def build_trained_reward_model(cfg: TrainConfig, source, optimizer_steps: int) -> TrainedModel:
    """A reward-model stage (a fresh scalar head) in DDP with its optimizer; weights loaded by the caller. What the
    reward-model trainer trains, and PPO's critic."""
    config = build_transformer_config(cfg, source)
    module = build_reward_model(source.arch, source.spec.padded_vocab_size, config, cfg.transformer_impl, cfg.seed)
    return _with_optimizer(cfg, source, config, wrap_in_ddp(cfg, place_model(module), config), optimizer_steps)


def build_critic(cfg: TrainConfig, source, lr: float, optimizer_steps: int) -> TrainedModel:
    """A reward-model-shaped stage (scalar head) in DDP, with an optimizer at ``lr``; weights loaded by the caller."""
    return build_trained_reward_model(replace(cfg, lr=lr, min_lr=min(cfg.min_lr, lr)), source, optimizer_steps)


def build_reference(cfg: TrainConfig, iter_dir: Path):
    """A frozen GPTModel stage loaded from ``iter_dir`` (its own config: none of the actor's DDP hooks; no LoRA)."""
    source = resolve_model_source(replace(cfg, model_size=None, model_name=None, lora_rank=0,
                                          lora_target_modules=None), iter_dir)
    model = place_model(build_model(source.arch, source.spec.padded_vocab_size,
                                    config=build_transformer_config(cfg, source),
                                    transformer_impl=cfg.transformer_impl, vocab_size=source.spec.vocab_size))
    source.checkpoint.load_into(model)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class BaseOfActor:
    """The reference of a LoRA run: the actor's own stage (``module``, inside its DDP) with its adapters switched off,
    i.e. the frozen base the adapters train on. No second model: its weights, activations and checkpoint are the
    actor's."""

    module: torch.nn.Module


def build_policy_reference(cfg: TrainConfig, actor: TrainedModel, ref_dir: Path, load_dir: Path):
    """The reference policy of DPO / PPO / GRPO: with ``--lora-rank`` and the reference being the actor's ``--load``,
    ``BaseOfActor``; else a frozen GPTModel loaded from ``ref_dir`` (``build_reference``)."""
    if cfg.lora_config() is not None and Path(ref_dir).resolve() == Path(load_dir).resolve():
        return BaseOfActor(actor.model.module)
    return build_reference(cfg, ref_dir)


@contextlib.contextmanager
def reference_stage(reference):
    """The stage to run as the reference inside the block: a frozen model as it is; for ``BaseOfActor`` the actor's
    stage with its adapters disabled and in eval mode, as a separately built reference is (its mode restored
    after)."""
    if not isinstance(reference, BaseOfActor):
        yield reference
        return
    module = reference.module
    was_training = module.training
    module.eval()
    try:
        with adapters_disabled(module):
            yield module
    finally:
        module.train(was_training)


def build_frozen_reward_model(cfg: TrainConfig, iter_dir: Path):
    """A frozen reward-model stage; ``iter_dir`` must be a reward-model checkpoint (with its trained head)."""
    source = resolve_model_source(replace(cfg, model_size=None, model_name=None), iter_dir)
    model = place_model(build_reward_model(source.arch, source.spec.padded_vocab_size,
                                           build_transformer_config(cfg, source), cfg.transformer_impl))
    load_reward_model_weights(model, iter_dir)
    return model.eval().requires_grad_(False)

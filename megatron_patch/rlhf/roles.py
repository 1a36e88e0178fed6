"""The four models of RLHF on megatron-core, each one pipeline stage on this rank at the run's TP x PP:

  - actor: a GPTModel in megatron-core DDP with its optimizer; it also generates the rollouts (the engine runs
    over the same module, so rollouts always use the weights being trained: no copy, no conversion);
  - critic (PPO): the reward-model architecture (scalar head) in DDP with its own optimizer, initialised from the
    reward model (or the actor's backbone with a new head);
  - reference: a frozen GPTModel (no optimizer, no gradient buffers);
  - reward model: a frozen reward-model stage, or None when the reward is a Python function.

``check_vocabularies`` runs before any process group exists: every model must share the actor's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError
from ..training.arguments import TrainConfig


@dataclass
class Trained:
    """A trained role: DDP model, optimizer, LR scheduler, and what it was built from (for its checkpoints)."""

    model: object
    optimizer: object
    scheduler: object
    source: object


def check_vocabularies(actor_spec, others: dict[str, Path]) -> None:
    """Refuse (one line) a reference / reward / critic checkpoint whose vocabulary differs from the actor's."""
    from ..models.checkpoint import Checkpoint

    for flag, iter_dir in others.items():
        spec = Checkpoint.open(iter_dir).spec
        if (spec.vocab_size, spec.padded_vocab_size) != (actor_spec.vocab_size, actor_spec.padded_vocab_size):
            raise CheckpointError(f"{flag} {iter_dir} has a vocabulary of {spec.vocab_size} tokens, the actor's has "
                                  f"{actor_spec.vocab_size}: RLHF needs one tokenizer for every model")


def _hook_into_schedule(config, model, optimizer) -> None:
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def build_actor(cfg: TrainConfig, source, optimizer_steps: int) -> Trained:
    from ..training.setup import build_ddp_model, build_optimizer, build_scheduler, build_transformer_config

    config = build_transformer_config(cfg, source)
    model = build_ddp_model(cfg, source, config)
    optimizer = build_optimizer(cfg, model)
    _hook_into_schedule(config, model, optimizer)
    return Trained(model, optimizer, build_scheduler(cfg, optimizer, optimizer_steps), source)


def build_critic(cfg: TrainConfig, source, lr: float, optimizer_steps: int) -> Trained:
    """A reward-model-shaped stage (scalar head) in DDP, with an optimizer at ``lr``; weights loaded by the caller."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ..runtime.device import place_model
    from ..training.setup import build_optimizer, build_scheduler, build_transformer_config
    from .reward_model import build_reward_model

    critic_cfg = replace(cfg, lr=lr, min_lr=min(cfg.min_lr, lr))
    config = build_transformer_config(critic_cfg, source)
    module = place_model(build_reward_model(source.arch, source.spec.padded_vocab_size, config,
                                            cfg.transformer_impl, cfg.seed))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer,
                                               check_for_nan_in_grad=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    optimizer = build_optimizer(critic_cfg, model)
    _hook_into_schedule(config, model, optimizer)
    return Trained(model, optimizer, build_scheduler(critic_cfg, optimizer, optimizer_steps), source)


def build_reference(cfg: TrainConfig, iter_dir: Path):
    """A frozen GPTModel stage loaded from ``iter_dir`` (its own config: none of the actor's DDP hooks)."""
    from ..models.builder import build_model
    from ..runtime.device import place_model
    from ..training.setup import build_transformer_config, resolve_model_source

    source = resolve_model_source(replace(cfg, model_size=None, model_name=None), iter_dir)
    model = place_model(build_model(source.arch, source.spec.padded_vocab_size,
                                    config=build_transformer_config(cfg, source),
                                    transformer_impl=cfg.transformer_impl))
    source.checkpoint.load_into(model)
    return model.eval().requires_grad_(False)


def build_frozen_reward_model(cfg: TrainConfig, iter_dir: Path):
    """A frozen reward-model stage; ``iter_dir`` must be a reward-model checkpoint (with its trained head)."""
    from ..runtime.device import place_model
    from ..training.setup import build_transformer_config, resolve_model_source
    from .reward_model import build_reward_model, load_reward_model_weights

    source = resolve_model_source(replace(cfg, model_size=None, model_name=None), iter_dir)
    model = place_model(build_reward_model(source.arch, source.spec.padded_vocab_size,
                                           build_transformer_config(cfg, source), cfg.transformer_impl))
    load_reward_model_weights(model, iter_dir)
    return model.eval().requires_grad_(False)

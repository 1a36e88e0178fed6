"""Build a PPO / GRPO / RLOO run: validate every input, then initialise distributed state and the four roles.

Everything that can be checked without a process group is checked first (flags, prompt files, PTX file,
vocabularies of the reference / reward / critic checkpoints, the reward: a built-in name or a user function, which
is called once on the first prompt line with an empty response): bad input stops with one line and nothing is
written.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ...checkpoint.megatron import find_iteration_dir
from ...errors import CheckpointError, ConfigError
from ...generation import GenerationEngine, mark_weights_loaded
from ...runtime import init_distributed
from ...training.arguments import TrainConfig
from ...training.checkpointing import TrainerState, load_module_weights, load_train_state
from ...training.logging import MetricsLogger
from ...training.setup import check_precision_support, load_model_tokenizer, resolve_model_source
from ..algos.core_algos import build_kl_controller
from ..preference.reward_model import is_reward_checkpoint, load_reward_model_weights
from ..roles import (
    build_actor,
    build_critic,
    build_frozen_reward_model,
    build_policy_reference,
    check_expert_parallel,
    check_full_weights,
    check_vocabularies,
)
from ..schedule_utils import find_resume_dir
from .config import RLConfig
from .evaluation import make_sample
from .rewards import Reward, build_reward
from .rollout_data import PromptDataset, PtxDataset
from .run import RL_STATE, RLRun


def _probe_reward(reward: Reward, prompts: PromptDataset, tokenizer) -> None:
    """Call the reward once, on the first prompt line with an empty response: a function that fails on its inputs
    (a missing key, a wrong signature, a non-number) is reported now, before any model is built."""
    reward(make_sample(tokenizer, prompts.records[0], []), prompts.path)


def _validate(cfg: TrainConfig, rl: RLConfig, world_size: int | None = None):
    """Checks and reads that need no process group; returns what the build needs (``rl`` resolved). Also the
    launch's pre-flight (``--check``, ``check_run``) for ``world_size`` ranks (default: $WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(f"the world size {world} must divide by TP x PP = {tp * pp}")
    if cfg.load is None:
        raise ConfigError("RLHF needs --load: the SFT (or converted) checkpoint the actor starts from")
    if not cfg.train_iters:
        raise ConfigError("--train-iters (RL iterations) is required")
    check_expert_parallel(cfg)
    rl.validate(cfg.seq_length, cfg.global_batch_size, cfg.micro_batch_size, world // (tp * pp))
    rl = rl.resolved()
    cfg.check_lora()
    check_precision_support(cfg)
    load_dir = find_iteration_dir(cfg.load)
    source = resolve_model_source(cfg, load_dir)
    source.arch.check_parallel(tp, pp)
    ref_dir = find_iteration_dir(rl.ref_load or cfg.load)
    rm_dir = find_iteration_dir(rl.reward_model) if rl.reward_model else None
    if rm_dir is not None and not is_reward_checkpoint(rm_dir):
        raise CheckpointError(f"--reward-model {rl.reward_model} is not a reward-model checkpoint (train one with "
                              f"rlhf.preference.train_reward_model)")
    critic_dir = None
    if rl.adv_estimator == "gae":
        critic_dir = find_iteration_dir(rl.critic_load) if rl.critic_load else rm_dir or load_dir
    others = {"--ref-load": ref_dir}
    if rm_dir is not None:
        others["--reward-model"] = rm_dir
    if critic_dir is not None:
        others["--critic-load"] = critic_dir
    check_vocabularies(source.spec, others)
    check_full_weights({"--load": load_dir, **{flag: d for flag, d in others.items() if flag != "--reward-model"}})
    tokenizer = load_model_tokenizer(cfg, source)
    reward = build_reward(rl.reward, tokenizer, rl.max_new_tokens) if rl.reward else None
    needs = reward.needs if reward is not None else ()
    budget = rl.max_prompt_tokens(cfg.seq_length)
    prompts = PromptDataset(rl.prompt_data_path, tokenizer, budget, cfg.seed, needs)
    eval_prompts = None
    if rl.eval_prompt_data_path:
        eval_prompts = PromptDataset(rl.eval_prompt_data_path, tokenizer, budget, cfg.seed, needs,
                                     "held-out prompt data")
    if reward is not None:
        _probe_reward(reward, prompts, tokenizer)
    ptx = PtxDataset(rl.ptx_data_path, tokenizer, cfg.seq_length) if rl.ptx_coef > 0 else None
    return rl, load_dir, source, ref_dir, rm_dir, critic_dir, tokenizer, prompts, eval_prompts, ptx, reward


def check_run(cfg: TrainConfig, rl: RLConfig, world_size: int) -> None:
    """The pre-flight of a launch (``--check``): every check ``build_run`` makes before a process group exists (flags,
    checkpoints, tokenizer, prompt files, one call of the reward), in one process."""
    _validate(cfg, rl, world_size)


def _resume_dirs(cfg: TrainConfig, rl: RLConfig):
    """The actor's (and critic's) last checkpoints under --save, when this job saved before; they must agree."""
    if not cfg.save:
        return None, None
    critic_used = rl.adv_estimator == "gae"
    actor = find_resume_dir(str(Path(cfg.save) / "actor"))
    critic = find_resume_dir(str(Path(cfg.save) / "critic")) if critic_used else None
    if actor is not None and critic_used and (critic is None or critic.name != actor.name):
        raise ConfigError(f"--save {cfg.save}: the actor ({actor.name}) and critic "
                          f"({critic.name if critic else 'none'}) checkpoints differ; remove the newer one")
    return actor, critic


def build_run(cfg: TrainConfig, rl: RLConfig, quiet: bool = False) -> RLRun:
    (rl, load_dir, source, ref_dir, rm_dir, critic_dir, tokenizer, prompts, eval_prompts, ptx,
     reward) = _validate(cfg, rl)
    kl_ctl = build_kl_controller(rl.kl_controller, rl.kl_coef, rl.kl_target, rl.kl_horizon)

    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
                     timeout_minutes=cfg.distributed_timeout_minutes)
    actor_resume, critic_resume = _resume_dirs(cfg, rl)
    steps = cfg.train_iters * rl.ppo_epochs * rl.ppo_mini_batches
    # The scheduler counts samples in units of --global-batch-size per optimizer step.
    sched_cfg = replace(cfg, train_iters=steps, lr_decay_iters=None)
    actor = build_actor(sched_cfg, source, steps)
    critic = None
    if critic_dir is not None:
        critic_source = resolve_model_source(replace(cfg, model_size=None, model_name=None), critic_dir)
        critic = build_critic(sched_cfg, critic_source, rl.critic_lr, steps)
    reference = build_policy_reference(cfg, actor, ref_dir, load_dir)  # with LoRA: the actor's base, no new model
    reward_model = build_frozen_reward_model(cfg, rm_dir) if rm_dir is not None else None
    logger = MetricsLogger(cfg.log_interval, cfg.tensorboard_dir, 0, quiet)
    state = TrainerState()
    if actor_resume is not None:
        load_module_weights(actor.model.module, actor_resume)  # with LoRA: the base, then the saved adapters
        state = load_train_state(actor_resume, actor.model, actor.optimizer, actor.scheduler)
        kl_ctl.load_state_dict(json.loads((actor_resume / RL_STATE).read_text())["kl_coef"])
        if critic is not None:
            load_reward_model_weights(critic.model.module, critic_resume)
            load_train_state(critic_resume, critic.model, critic.optimizer, critic.scheduler)
        logger.print(f"resumed at iteration {state.iteration} from {actor_resume.parent.parent}")
    else:
        load_module_weights(actor.model.module, load_dir)
        actor.optimizer.reload_model_params()
        if critic is not None:
            with_head = load_reward_model_weights(critic.model.module, critic_dir)
            critic.optimizer.reload_model_params()
            logger.print(f"critic from {critic_dir} ({'reward head' if with_head else 'new value head'})")
        logger.print(f"actor from {load_dir}, reference from {ref_dir}")
    mark_weights_loaded(actor.model.module, str(actor_resume or load_dir))
    engine = GenerationEngine(actor.model.module, source.spec.vocab_size, tokenizer.eod, cfg.seq_length)
    actor.model.module.train()
    return RLRun(cfg, rl, actor, critic, reference, reward_model, reward, tokenizer, prompts, eval_prompts, ptx,
                 engine, kl_ctl, state, source.spec.vocab_size, logger)

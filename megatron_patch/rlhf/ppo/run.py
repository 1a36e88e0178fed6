"""The state of one PPO / GRPO / RLOO run: what ``ppo_setup.build_run`` builds and ``ppo.train`` drives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from ...data.tokenizers import Tokenizer
from ...generation import GenerationEngine
from ...training.arguments import TrainConfig
from ...training.checkpointing import TrainerState
from ...training.logging import MetricsLogger
from ...training.step import TrainedModel
from ..algos.core_algos import FixedKLController
from ..roles import BaseOfActor
from .config import RLConfig
from .rewards import Reward
from .rollout_data import PromptDataset, PtxDataset

RL_STATE = "rl_state.json"


@dataclass
class RLRun:
    """Every model, dataset and counter of a run (``rl`` resolved: the preset's defaults filled in).

    Attributes:
        actor, critic: the trained roles (``critic`` only for ``--adv-estimator gae``).
        reference, reward_model: frozen model stages (``reward_model`` None with a programmatic reward); with
            ``--lora-rank`` the reference is ``BaseOfActor`` (run it through ``roles.reference_stage``).
        reward: the programmatic reward (None with ``--reward-model``).
        prompts, eval_prompts, ptx: the rollout prompts, the held-out prompts (optional), the PTX text (optional).
        engine: the actor's generation engine (rollouts and held-out answers).
        state: iteration and prompts consumed (checkpointed with the actor).
        history, evals: ``(iteration, metrics)`` of every iteration and of every held-out evaluation.
        first: the first iteration's rollout and tensors (tests compare them across TP / PP / DP).
    """

    cfg: TrainConfig
    rl: RLConfig
    actor: TrainedModel
    critic: TrainedModel | None
    reference: torch.nn.Module | BaseOfActor
    reward_model: torch.nn.Module | None
    reward: Reward | None
    tokenizer: Tokenizer
    prompts: PromptDataset
    eval_prompts: PromptDataset | None
    ptx: PtxDataset | None
    engine: GenerationEngine
    kl_ctl: FixedKLController
    state: TrainerState
    vocab_size: int
    logger: MetricsLogger
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    first: dict | None = None

    @property
    def dp(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def samples_per_rank(self) -> int:
        return self.cfg.global_batch_size // self.dp * self.rl.n_samples_per_prompt

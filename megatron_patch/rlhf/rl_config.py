"""The RL knobs of a PPO / GRPO run: one typed dataclass whose fields are the flags (``--kl-coef`` <-> ``kl_coef``).

The model, optimizer, parallelism and schedule flags are the training ones (``training.arguments.TrainConfig``),
with two RL meanings: ``--global-batch-size`` is the number of *prompts* per iteration (over all data-parallel
ranks) and ``--train-iters`` the number of RL iterations; ``--seq-length`` is the token budget of prompt + response.
Cross-field rules are checked once, here, before any process group, model or file exists.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields

from ..errors import ConfigError
from ..training.arguments import config_from_dict
from .core_algos import LOSS_AGG_MODES

ALGOS = ("ppo", "grpo")


@dataclass
class RLConfig:
    algo: str = field(default="ppo", metadata={"help": "ppo (critic, GAE) | grpo (group-normalised, no critic)"})
    prompt_data_path: str | None = field(default=None, metadata={"help": 'jsonl of {"prompt": ...} lines'})
    reward_fn: str | None = field(default=None, metadata={
        "help": "a registered programmatic reward (rlhf.rewards); exclusive with --reward-model"})
    reward_model: str | None = field(default=None, metadata={"help": "reward-model checkpoint (frozen)"})
    ref_load: str | None = field(default=None, metadata={"help": "reference checkpoint (default: --load)"})
    critic_load: str | None = field(default=None, metadata={
        "help": "critic initialisation (default: --reward-model, else the backbone of --load with a new value head)"})
    critic_lr: float = field(default=5e-6, metadata={"help": "critic peak learning rate"})
    n_samples_per_prompt: int = field(default=1, metadata={"help": "responses sampled per prompt (GRPO: >= 2)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest response; generation stops at EOS"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each iteration's experience"})
    ppo_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per epoch (mini-batches)"})
    clip_ratio: float = field(default=0.2, metadata={"help": "PPO policy clip epsilon"})
    value_clip: float = field(default=0.2, metadata={"help": "PPO value clip (<= 0: unclipped)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    kl_coef: float = field(default=0.05, metadata={
        "help": "KL coefficient (>= 0): the reward penalty (PPO) or the KL loss weight (GRPO)"})
    kl_controller: str = field(default="fixed", metadata={"help": "fixed | adaptive (PPO)"})
    kl_target: float = field(default=6.0, metadata={"help": "adaptive controller: target KL per sequence"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive controller: horizon in samples"})
    loss_agg_mode: str = field(default="token-mean", metadata={"help": " | ".join(LOSS_AGG_MODES)})
    grpo_norm_by_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std"})
    ptx_data_path: str | None = field(default=None, metadata={"help": 'PTX: jsonl of {"text": ...} lines'})
    ptx_coef: float = field(default=0.0, metadata={"help": "PTX: weight of the LM loss added to the actor loss"})

    def validate(self, seq_length: int, global_batch_size: int, micro_batch_size: int, dp: int) -> None:
        """Every cross-field rule; raises ConfigError naming the flag to change."""
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGOS)} (got {self.algo})")
        if self.prompt_data_path is None:
            raise ConfigError("--prompt-data-path is required")
        if (self.reward_fn is None) == (self.reward_model is None):
            raise ConfigError("pass exactly one of --reward-fn (programmatic) and --reward-model (checkpoint)")
        if self.kl_coef < 0:
            raise ConfigError(f"--kl-coef must be >= 0 (got {self.kl_coef})")
        if self.kl_controller not in ("fixed", "adaptive"):
            raise ConfigError(f"--kl-controller must be fixed or adaptive (got {self.kl_controller})")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ConfigError(f"--loss-agg-mode must be one of {', '.join(LOSS_AGG_MODES)} (got {self.loss_agg_mode})")
        if self.algo == "grpo" and self.n_samples_per_prompt < 2:
            raise ConfigError(f"GRPO needs --n-samples-per-prompt >= 2 (got {self.n_samples_per_prompt})")
        if self.n_samples_per_prompt < 1:
            raise ConfigError(f"--n-samples-per-prompt must be >= 1 (got {self.n_samples_per_prompt})")
        if self.max_new_tokens < 1 or self.max_new_tokens >= seq_length:
            raise ConfigError(f"--max-new-tokens must lie in [1, --seq-length {seq_length}) (got {self.max_new_tokens})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1] (got {self.temperature}, {self.top_p})")
        if self.ppo_epochs < 1 or self.ppo_mini_batches < 1:
            raise ConfigError(f"--ppo-epochs and --ppo-mini-batches must be >= 1 (got {self.ppo_epochs}, "
                              f"{self.ppo_mini_batches})")
        if self.ptx_coef < 0 or (self.ptx_coef > 0) != (self.ptx_data_path is not None):
            raise ConfigError("--ptx-coef > 0 and --ptx-data-path go together (PTX needs both)")
        if global_batch_size % dp:
            raise ConfigError(f"--global-batch-size {global_batch_size} (prompts per iteration) must divide by the "
                              f"data-parallel size {dp}")
        samples = global_batch_size // dp * self.n_samples_per_prompt
        if self.ppo_mini_batches > samples:
            raise ConfigError(f"--ppo-mini-batches {self.ppo_mini_batches} exceeds the {samples} samples per "
                              f"data-parallel rank and iteration (lower it or raise --global-batch-size)")
        if samples % (self.ppo_mini_batches * micro_batch_size):
            raise ConfigError(f"the {samples} samples per data-parallel rank and iteration must divide into "
                              f"--ppo-mini-batches {self.ppo_mini_batches} x --micro-batch-size {micro_batch_size}")

    def max_prompt_tokens(self, seq_length: int) -> int:
        return seq_length - self.max_new_tokens

    @classmethod
    def from_dict(cls, values: dict) -> RLConfig:
        return config_from_dict(cls, values, "unknown RL option(s)")

    def to_dict(self) -> dict:
        return asdict(self)


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag-name`` per field, with its type, default and help."""
    group = parser.add_argument_group("RL (PPO / GRPO)")
    for f in fields(RLConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if f.type in ("bool", bool):
            group.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                               help=f"{f.metadata['help']} (default: {default})")
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(flag, type=kind, default=default, help=f"{f.metadata['help']} (default: {default})")


def rl_config_from_args(args: argparse.Namespace) -> RLConfig:
    return RLConfig(**{f.name: getattr(args, f.name) for f in fields(RLConfig)})

"""The RL knobs of a PPO / GRPO run: one typed dataclass whose fields are the flags (``--kl-coef`` <-> ``kl_coef``).

The model, optimizer, parallelism and schedule flags are the training ones (``training.arguments.TrainConfig``),
with two RL meanings: ``--global-batch-size`` is the number of *prompts* per iteration (over all data-parallel
ranks) and ``--train-iters`` the number of RL iterations; ``--seq-length`` is the token budget of prompt + response.
Cross-field rules are checked once, here, before any process group, model or file exists.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace

from ...errors import ConfigError
from ...training.arguments import add_field_argument, config_from_dict
from ..algos.core_algos import LOSS_AGG_MODES, adv_estimator_names, kl_estimator_names

# --algo is a preset: it picks the defaults of the knobs below (verl-style names), each of which can be set alone.
ALGOS = ("ppo", "grpo", "rloo")
PRESETS = {
    "ppo": dict(adv_estimator="gae", use_kl_in_reward=True, use_kl_loss=False),
    "grpo": dict(adv_estimator="grpo", use_kl_in_reward=False, use_kl_loss=True),
    "rloo": dict(adv_estimator="rloo", use_kl_in_reward=False, use_kl_loss=True),
}
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")


@dataclass
class RLConfig:
    algo: str = field(default="ppo", metadata={
        "help": "preset: ppo (critic, GAE, KL in the reward) | grpo (group-normalised, KL loss) | rloo "
                "(leave-one-out baseline, KL loss)"})
    prompt_data_path: str | None = field(default=None, metadata={
        "help": 'jsonl of {"prompt": ...} lines; other keys ("answer", ...) go to the reward'})
    eval_prompt_data_path: str | None = field(default=None, metadata={
        "help": "held-out prompts (same format): greedy answers scored with the run's reward before the first "
                "iteration, every --eval-interval iterations (the training flag) and at the end"})
    reward: str | None = field(default=None, metadata={
        "help": "a built-in reward (exact_match, digit_match, numeric, ...) or py:FILE:FUNC; exclusive with "
                "--reward-model"})
    reward_model: str | None = field(default=None, metadata={"help": "reward-model checkpoint (frozen)"})
    ref_load: str | None = field(default=None, metadata={"help": "reference checkpoint (default: --load)"})
    critic_load: str | None = field(default=None, metadata={
        "help": "critic initialisation (default: --reward-model, else the backbone of --load with a new value head)"})
    critic_lr: float = field(default=5e-6, metadata={"help": "critic peak learning rate"})
    n_samples_per_prompt: int = field(default=1, metadata={
        "help": "responses sampled per prompt (group estimators: >= 2)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest response; generation stops at EOS"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each iteration's experience"})
    ppo_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per epoch (mini-batches)"})
    adv_estimator: str | None = field(default=None, metadata={
        "help": "gae | grpo | dr_grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline (default: the "
                "--algo preset's); gae trains a critic"})
    clip_ratio: float = field(default=0.2, metadata={"help": "PPO policy clip epsilon (both sides)"})
    clip_ratio_low: float | None = field(default=None, metadata={"help": "lower clip epsilon (default: --clip-ratio)"})
    clip_ratio_high: float | None = field(default=None, metadata={
        "help": "upper clip epsilon (default: --clip-ratio; DAPO raises it)"})
    clip_ratio_c: float | None = field(default=None, metadata={
        "help": "dual clip: cap the loss of negative-advantage tokens at -A * c (> 1; default: off)"})
    value_clip: float = field(default=0.2, metadata={"help": "PPO value clip (<= 0: unclipped)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    gamma: float = field(default=1.0, metadata={"help": "discount (gae, reinforce_plus_plus)"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    use_kl_in_reward: bool | None = field(default=None, metadata={
        "help": "subtract --kl-coef x KL (--kl-penalty estimator) from every token's reward (default: ppo preset)"})
    kl_coef: float = field(default=0.05, metadata={
        "help": "KL coefficient (>= 0): of the reward penalty, and of the KL loss unless --kl-loss-coef is given"})
    kl_penalty: str = field(default="k1", metadata={"help": "KL estimator of the reward penalty: k1 | k2 | k3"})
    use_kl_loss: bool | None = field(default=None, metadata={
        "help": "add --kl-loss-coef x KL (--kl-loss-type) to the actor loss (default: grpo / rloo presets)"})
    kl_loss_coef: float | None = field(default=None, metadata={"help": "KL loss weight (default: --kl-coef)"})
    kl_loss_type: str = field(default="k3", metadata={"help": "KL estimator of the KL loss: k1 | k2 | k3"})
    kl_controller: str = field(default="fixed", metadata={"help": "fixed | adaptive (needs KL in the reward)"})
    kl_target: float = field(default=6.0, metadata={"help": "adaptive controller: target KL per sequence"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive controller: horizon in samples"})
    loss_agg_mode: str | None = field(default=None, metadata={
        "help": " | ".join(LOSS_AGG_MODES) + " (default: token-mean; dr_grpo: seq-mean-token-sum-norm)"})
    grpo_norm_by_std: bool = field(default=True, metadata={"help": "grpo: divide by the group std"})
    reward_clip: float = field(default=0.0, metadata={"help": "clip each token reward to [-c, c] (0: off)"})
    reward_norm: bool = field(default=False, metadata={
        "help": "whiten the outcome scores over the batch (every data-parallel rank) before the estimator"})
    overlong_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the score of a response that reached --max-new-tokens without EOS (>= 0)"})
    ptx_data_path: str | None = field(default=None, metadata={"help": 'PTX: jsonl of {"text": ...} lines'})
    ptx_coef: float = field(default=0.0, metadata={"help": "PTX: weight of the LM loss added to the actor loss"})

    def resolved(self) -> RLConfig:
        """A copy with the preset's defaults filled in (what the loop reads)."""
        preset = PRESETS.get(self.algo, PRESETS["ppo"])
        values = {key: value for key, value in preset.items() if getattr(self, key) is None}
        if self.kl_loss_coef is None:
            values["kl_loss_coef"] = self.kl_coef
        estimator = values.get("adv_estimator", self.adv_estimator)
        if self.loss_agg_mode is None:
            values["loss_agg_mode"] = "seq-mean-token-sum-norm" if estimator == "dr_grpo" else "token-mean"
        return replace(self, **values)

    @property
    def needs_critic(self) -> bool:
        return self.resolved().adv_estimator == "gae"

    def validate(self, seq_length: int, global_batch_size: int, micro_batch_size: int, dp: int) -> None:
        """Every cross-field rule; raises ConfigError naming the flag to change."""
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGOS)} (got {self.algo})")
        if self.prompt_data_path is None:
            raise ConfigError("--prompt-data-path is required")
        if (self.reward is None) == (self.reward_model is None):
            raise ConfigError("pass exactly one of --reward (a built-in or py:FILE:FUNC) and --reward-model "
                              "(checkpoint)")
        if self.eval_prompt_data_path and self.reward is None:
            raise ConfigError("--eval-prompt-data-path scores held-out answers with the run's programmatic reward "
                              "(--reward); a reward model is only a proxy of the task")
        r = self.resolved()
        estimators = adv_estimator_names()
        if r.adv_estimator not in estimators:
            raise ConfigError(f"--adv-estimator must be one of {', '.join(estimators)} (got {r.adv_estimator})")
        for flag, name in (("--kl-penalty", r.kl_penalty), ("--kl-loss-type", r.kl_loss_type)):
            if name not in kl_estimator_names():
                raise ConfigError(f"{flag} must be one of {', '.join(kl_estimator_names())} (got {name})")
        if self.kl_coef < 0 or r.kl_loss_coef < 0:
            raise ConfigError(f"--kl-coef must be >= 0 (got {self.kl_coef}; --kl-loss-coef {r.kl_loss_coef})")
        if self.kl_controller not in ("fixed", "adaptive"):
            raise ConfigError(f"--kl-controller must be fixed or adaptive (got {self.kl_controller})")
        if self.kl_controller == "adaptive" and not r.use_kl_in_reward:
            raise ConfigError("--kl-controller adaptive steers the KL penalty in the reward, which this run does not "
                              "use (--algo grpo/rloo or --no-use-kl-in-reward): pass --use-kl-in-reward or "
                              "--kl-controller fixed")
        if r.loss_agg_mode not in LOSS_AGG_MODES:
            raise ConfigError(f"--loss-agg-mode must be one of {', '.join(LOSS_AGG_MODES)} (got {r.loss_agg_mode})")
        if r.adv_estimator in GROUP_ESTIMATORS and self.n_samples_per_prompt < 2:
            raise ConfigError(f"--adv-estimator {r.adv_estimator} needs --n-samples-per-prompt >= 2 (got "
                              f"{self.n_samples_per_prompt})")
        if r.adv_estimator != "gae" and self.critic_load:
            raise ConfigError(f"--critic-load is only used by --adv-estimator gae (got {r.adv_estimator})")
        if self.n_samples_per_prompt < 1:
            raise ConfigError(f"--n-samples-per-prompt must be >= 1 (got {self.n_samples_per_prompt})")
        if self.max_new_tokens < 1 or self.max_new_tokens >= seq_length:
            raise ConfigError(f"--max-new-tokens must lie in [1, --seq-length {seq_length}) (got {self.max_new_tokens})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1] (got {self.temperature}, {self.top_p})")
        if self.ppo_epochs < 1 or self.ppo_mini_batches < 1:
            raise ConfigError(f"--ppo-epochs and --ppo-mini-batches must be >= 1 (got {self.ppo_epochs}, "
                              f"{self.ppo_mini_batches})")
        for flag, value in (("--clip-ratio", self.clip_ratio), ("--clip-ratio-low", r.clip_ratio_low),
                            ("--clip-ratio-high", r.clip_ratio_high)):
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} must be > 0 (got {value})")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ConfigError(f"--clip-ratio-c (dual clip) must be > 1 (got {self.clip_ratio_c})")
        if self.reward_clip < 0 or self.overlong_penalty < 0:
            raise ConfigError(f"--reward-clip and --overlong-penalty must be >= 0 (got {self.reward_clip}, "
                              f"{self.overlong_penalty})")
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
    """One ``--flag-name`` per field, declared as the training flags are (``training.arguments.add_field_argument``):
    the annotation's type, the default said once, a boolean a switch (``--reward-norm``, ``--no-grpo-norm-by-std``;
    ``--use-kl-in-reward`` / ``--no-use-kl-in-reward`` where the --algo preset decides)."""
    group = parser.add_argument_group("RL (PPO / GRPO / RLOO)")
    for f in fields(RLConfig):
        add_field_argument(group, f)


def rl_config_from_args(args: argparse.Namespace) -> RLConfig:
    return RLConfig(**{f.name: getattr(args, f.name) for f in fields(RLConfig)})

"""Train a reward model on preference pairs with megatron-core's pipeline schedules (any TP x PP x DP).

python -m megatron_patch.rlhf.preference.train_reward_model --load SFT_OR_CONVERTED_CKPT --train-data-path train.jsonl \
    --valid-data-path valid.jsonl --save OUT --seq-length 64 --micro-batch-size 2 --global-batch-size 8 ...

Flags are the training flags (``training.arguments.TrainConfig``; ``--train-data-path`` / ``--valid-data-path``
are preference jsonl files) plus ``--skip-bad-lines``. One step = the schedule over the global batch's
micro-batches; a micro-batch of ``k`` pairs is ``2k`` sequences (chosen rows, then rejected rows), so the
pipeline carries both halves of every pair together. The loss is ``-logsigmoid(r_chosen - r_rejected)``, averaged
over the pairs of the global batch; evaluation reports held-out accuracy and mean margin (console + TensorBoard).

The model is the ``--load`` backbone with a fresh scalar head (``rlhf.preference.reward_model``; a reward checkpoint brings its
trained head). ``RewardObjective`` says that; the loop, logs and checkpoints are ``rlhf.preference_trainer``'s.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from ...errors import ConfigError
from ...training.arguments import TrainConfig, config_from_args
from ...training.entry import run_entry
from ..algos.core_algos import compute_pairwise_reward_loss
from ..roles import build_trained_reward_model
from ..schedule_utils import pairs_to_rows
from .reward_model import load_reward_model_weights, sequence_rewards, write_reward_marker
from .trainer import PreferenceRun, argument_parser, finetune_config, preflight, train, train_to_end
from .trainer import build_run as build_preference_run

__all__ = ["RewardObjective", "build_run", "main", "run", "train"]


def pairwise_loss_func(last_index: torch.Tensor, output: torch.Tensor):
    rewards = sequence_rewards(output, last_index)
    chosen, rejected = rewards.chunk(2)
    loss, metrics = compute_pairwise_reward_loss(chosen, rejected)
    pairs = torch.tensor(float(chosen.shape[0]), device=loss.device)
    # Sums (not means) so the report over micro-batches and data-parallel ranks is exact.
    report = torch.stack([loss.detach() * pairs, metrics["rm/accuracy"] * pairs, metrics["rm/margin"] * pairs, pairs])
    return loss, {"rm": report}


def forward_step(data_iterator, model):
    device = next(model.parameters()).device
    rows = pairs_to_rows(next(data_iterator), device)
    output = model(rows["tokens"], rows["position_ids"], None)
    return output, partial(pairwise_loss_func, rows["last_index"])


class RewardObjective:
    """The pairwise reward-model loss on a reward-model stage; its checkpoints carry the reward marker."""

    name = "rm"
    metrics = ("loss", "accuracy", "margin")
    accuracy_words = "accuracy"
    saved_words = "reward model"
    resumed_line = "resumed at iteration {iteration} from {resume_dir}"
    loaded_line = "loaded {what} from {load_dir}"
    evaluates_first = False
    after_model_save = staticmethod(write_reward_marker)

    def check(self, cfg: TrainConfig) -> None:  # no --load trains a fresh model of --model-name / --model-size
        if cfg.lora_rank:
            raise ConfigError("--lora-rank: the reward-model trainer trains every parameter (LoRA is wired for SFT, "
                              "DPO and PPO / GRPO's actor)")

    def build_models(self, cfg: TrainConfig, source, load_dir: Path | None, train_iters: int):
        return build_trained_reward_model(cfg, source, train_iters), None

    def load_weights(self, module, iter_dir: Path) -> str:
        with_head = load_reward_model_weights(module, iter_dir)
        return "the reward model" if with_head else "the backbone (new reward head)"

    def schedule_inputs(self, run: PreferenceRun, microbatches: list[dict]):
        return forward_step, iter(microbatches)

    def history_row(self, iteration: int, report: dict[str, float]) -> tuple:
        return iteration, report["loss"], report["accuracy"]


def build_run(cfg: TrainConfig, skip_bad_lines: bool = False, quiet: bool = False) -> PreferenceRun:
    """Validate, initialise distributed state, build the reward model, optimizer and data; load --load. Collective."""
    return build_preference_run(cfg, RewardObjective(), skip_bad_lines, quiet)


def run(cfg: TrainConfig | dict, skip_bad_lines: bool = False, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, loss, accuracy)], "evals": [(iteration, report)]}``."""
    return train_to_end(build_run(finetune_config(cfg), skip_bad_lines, quiet))


def main(argv=None) -> int:
    args = argument_parser("python -m megatron_patch.rlhf.preference.train_reward_model", __doc__).parse_args(argv)
    return run_entry(args, lambda: config_from_args(args, "finetune"), lambda cfg: run(cfg, args.skip_bad_lines),
                     preflight(RewardObjective(), args.skip_bad_lines))


if __name__ == "__main__":
    sys.exit(main())

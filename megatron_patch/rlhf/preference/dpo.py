"""DPO on megatron-core: a trained policy and a frozen reference, both GPTModels at the run's TP x PP.

python -m megatron_patch.rlhf.preference.dpo --load SFT_CKPT --train-data-path train.jsonl --valid-data-path valid.jsonl \
    --save OUT --seq-length 64 --micro-batch-size 2 --global-batch-size 8 --lr 1e-6 --dpo-beta 0.1

One step:
  1. this data-parallel rank's micro-batches of the global batch are read once;
  2. the reference runs over them through the pipeline schedule, forward only, and the last stage keeps each
     pair's summed response log-probs (``(k,)`` chosen, ``(k,)`` rejected per micro-batch): computed once per batch;
  3. the policy runs forward and backward over the same micro-batches; each micro-batch's loss function receives
     its reference log-probs and returns ``compute_dpo_loss``; megatron-core DDP reduces the gradients.
The reference has no optimizer and no gradient buffers. With ``--lora-rank`` the policy trains adapters only and the
reference is the policy's own stage with its adapters disabled (``roles.BaseOfActor``): no second model. Log-probs
come from the vocab-parallel logits (``rlhf.logprobs``) over the real vocabulary (padding rows excluded), so no rank
gathers the vocabulary.
The held-out report is also taken before the first step. ``DPOObjective`` says all that; the loop, logs and
checkpoints are ``rlhf.preference_trainer``'s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state

from ...checkpoint.megatron import find_iteration_dir
from ...errors import ConfigError
from ...training.arguments import TrainConfig, config_from_args
from ...training.checkpointing import load_module_weights
from ...training.entry import run_entry
from ...training.step import schedule_pass
from ..algos.core_algos import compute_dpo_loss, masked_sum
from ..algos.logprobs import vocab_parallel_logprobs
from ..roles import build_actor, build_policy_reference, check_full_weights, reference_stage
from ..schedule_utils import pairs_to_rows
from .trainer import PreferenceRun, argument_parser, finetune_config, preflight, train, train_to_end
from .trainer import build_run as build_preference_run

__all__ = ["DPOObjective", "build_run", "main", "run", "train"]

REPORT = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")


def sequence_logps(rows: dict[str, torch.Tensor], vocab_size: int, logits: torch.Tensor) -> torch.Tensor:
    """``(2k,)`` summed log-probs of each row's response tokens, from ``(2k, seq, vocab / tp)`` logits."""
    token_logps = vocab_parallel_logprobs(logits, rows["labels"], parallel_state.get_tensor_model_parallel_group(),
                                          vocab_size)
    return masked_sum(token_logps, rows["loss_mask"], dim=-1)


def _reference_loss_func(rows, vocab_size, logits):
    logps = sequence_logps(rows, vocab_size, logits)
    return logps.sum() * 0.0, {"logps": logps.detach()}


def _reference_forward_step(vocab_size, data_iterator, model):
    rows = pairs_to_rows(next(data_iterator), next(model.parameters()).device)
    logits = model(rows["tokens"], rows["position_ids"], None)
    return logits, partial(_reference_loss_func, rows, vocab_size)


def _dpo_loss_func(rows, vocab_size, beta, reference_logps, logits):
    policy_chosen, policy_rejected = sequence_logps(rows, vocab_size, logits).chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    loss, metrics = compute_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    pairs = torch.tensor(float(policy_chosen.shape[0]), device=loss.device)
    keys = ("dpo/reward_accuracy", "dpo/reward_margin", "dpo/rewards_chosen", "dpo/rewards_rejected")
    report = torch.stack([loss.detach() * pairs, *(metrics[k] * pairs for k in keys), pairs])
    return loss, {"dpo": report}


def _policy_forward_step(vocab_size, beta, data_iterator, model):
    batch, reference_logps = next(data_iterator)  # reference_logps is None off the last pipeline stage
    rows = pairs_to_rows(batch, next(model.parameters()).device)
    logits = model(rows["tokens"], rows["position_ids"], None)
    return logits, partial(_dpo_loss_func, rows, vocab_size, beta, reference_logps)


@dataclass(frozen=True)
class DPOObjective:
    """DPO's loss on a policy against a frozen reference, both started from --load (the reference stays --load's)."""

    beta: float
    name = "dpo"
    metrics = REPORT
    accuracy_words = "reward accuracy"
    saved_words = "the DPO policy"
    resumed_line = "resumed the policy at iteration {iteration} from {resume_dir}; reference from {load_dir}"
    loaded_line = "policy and reference loaded from {load_dir}"
    evaluates_first = True
    after_model_save = None

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"--dpo-beta must be > 0 (got {self.beta})")

    def check(self, cfg: TrainConfig) -> None:
        if cfg.load is None:
            raise ConfigError("DPO needs --load: the SFT (or converted) checkpoint both the policy and the reference "
                              "start from")
        check_full_weights({"--load": find_iteration_dir(cfg.load)})

    def build_models(self, cfg: TrainConfig, source, load_dir: Path | None, train_iters: int):
        policy = build_actor(cfg, source, train_iters)
        return policy, build_policy_reference(cfg, policy, load_dir, load_dir)

    def load_weights(self, module, iter_dir: Path) -> str:
        load_module_weights(module, iter_dir)  # with LoRA: the base, then the adapters of an adapter checkpoint
        return "the policy"

    def schedule_inputs(self, run: PreferenceRun, microbatches: list[dict]):
        """The reference pass over ``microbatches`` (forward only, once per batch); the policy's forward step then
        reads each micro-batch with its reference log-probs."""
        vocab_size = run.trained.source.spec.vocab_size
        with reference_stage(run.frozen) as reference:  # with LoRA: the policy, adapters off
            reference_out = schedule_pass(reference, partial(_reference_forward_step, vocab_size), iter(microbatches),
                                          len(microbatches), run.cfg.seq_length, 2 * run.cfg.micro_batch_size,
                                          forward_only=True)
        last_stage = parallel_state.is_pipeline_last_stage()
        reference_logps = [out["logps"] for out in reference_out] if last_stage else [None] * len(microbatches)
        return partial(_policy_forward_step, vocab_size, self.beta), iter(list(zip(microbatches, reference_logps)))

    def history_row(self, iteration: int, report: dict[str, float]) -> tuple:
        return iteration, report


def build_run(cfg: TrainConfig, beta: float, skip_bad_lines: bool = False, quiet: bool = False) -> PreferenceRun:
    """Validate, initialise distributed state, build policy (DDP + optimizer) and frozen reference from --load."""
    return build_preference_run(cfg, DPOObjective(beta), skip_bad_lines, quiet)


def run(cfg: TrainConfig | dict, beta: float = 0.1, skip_bad_lines: bool = False, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, report)], "evals": [(iteration, report)]}``."""
    return train_to_end(build_run(finetune_config(cfg), beta, skip_bad_lines, quiet))


def main(argv=None) -> int:
    parser = argument_parser("python -m megatron_patch.rlhf.preference.dpo", __doc__)
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (> 0) (default: 0.1)")
    args = parser.parse_args(argv)
    return run_entry(args, lambda: config_from_args(args, "finetune"),
                     lambda cfg: run(cfg, args.dpo_beta, args.skip_bad_lines),
                     preflight(DPOObjective(args.dpo_beta), args.skip_bad_lines))


if __name__ == "__main__":
    sys.exit(main())

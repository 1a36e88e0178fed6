"""Reward-model checkpoint (any TP x PP, torch_dist) -> HF ``<Family>ForSequenceClassification`` directory.

python -m megatron_patch.rlhf.export --load RM_CKPT --save HF_DIR [--overwrite]

The backbone goes through the family's own weight table (the same rows ``mcore2hf`` uses, minus the LM head);
the scalar head becomes ``score.weight`` (``(1, hidden)``), the name every transformers sequence-classification
class of these families uses. The config gets ``num_labels = 1`` and the tokenizer's pad id: transformers reads the
score at the last token that is not padding, the same token the reward model reads (the EOS closing the response),
provided pad and EOS differ (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_output_dir, check_output_dir
from ..checkpoint.checksums import write_manifest
from ..checkpoint.hf import ShardedSafetensorsWriter, asset_files, copy_assets
from ..checkpoint.megatron import ASSETS
from ..checkpoint.paths import check_outputs
from ..data.tokenizers import load_tokenizer
from ..errors import CheckpointError, DataError, UnsupportedModelError, run_reporting_errors
from ..models.builder import transformer_config
from ..models.checkpoint import Checkpoint
from ..runtime import init_distributed
from ..runtime.noise import add_verbose_flag, quiet_third_party
from .preference.reward_model import HEAD_PREFIX, build_reward_model, is_reward_checkpoint, load_reward_model_weights

SCORE = "score.weight"


def sequence_classification_config(meta: dict, pad_token_id: int) -> dict:
    """The HF config: the checkpoint's, with the exported vocabulary, one label and the sequence-class class."""
    config = dict(meta["hf_config"])
    architectures = config.get("architectures") or []
    if not architectures or not architectures[0].endswith("ForCausalLM"):
        raise UnsupportedModelError(f"cannot name a sequence-classification class for architectures {architectures}")
    config.update(architectures=[architectures[0].replace("ForCausalLM", "ForSequenceClassification")],
                  num_labels=1, pad_token_id=pad_token_id, vocab_size=meta["vocab_size"])
    config["dtype" if "dtype" in config else "torch_dtype"] = meta["dtype"]
    return config


def _load_full_state(iter_dir: Path, meta: dict, spec) -> dict[str, torch.Tensor]:
    """The reward model at TP=1 PP=1 in this process (dist_checkpointing reshards at load): full tensors."""
    init_distributed(1, 1)
    config = transformer_config(spec.arch, params_dtype=getattr(torch, meta["dtype"]), perform_initialization=False)
    model = build_reward_model(spec.arch, spec.padded_vocab_size, config)
    load_reward_model_weights(model, iter_dir)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def reward_model_to_hf(load: str | os.PathLike, save: str | os.PathLike, overwrite: bool = False) -> Path:
    check_outputs({"--save": save}, {"--load": load})  # before anything is read: --save "" is the current directory
    ckpt = Checkpoint.open(load)
    iter_dir = ckpt.iter_dir
    if not is_reward_checkpoint(iter_dir):
        raise CheckpointError(f"{iter_dir} is not a reward-model checkpoint (no reward_model.json); export language "
                              f"models with mcore2hf")
    meta = ckpt.meta
    check_output_dir(save, overwrite)
    assets = iter_dir / ASSETS
    if not assets.is_dir():
        raise CheckpointError(f"{iter_dir} has no {ASSETS}/ (tokenizer) to take the pad id from")
    asset_files(assets, iter_dir)  # a link out of the checkpoint is refused before anything is read through it
    tokenizer = load_tokenizer(assets)
    if tokenizer.pad == tokenizer.eod:
        raise DataError("the tokenizer's pad id equals its EOS id: transformers would read the score before the "
                        "EOS the reward model was trained to score at; give the tokenizer a distinct pad token")
    config = sequence_classification_config(meta, tokenizer.pad)
    state = _load_full_state(iter_dir, meta, ckpt.spec)
    # Export the backbone as a tied LM would be exported: the sharding then has no LM-head row to look for.
    backbone = ckpt.spec.with_arch(tie_word_embeddings=True).sharding(1, 1)
    with atomic_output_dir(save, overwrite) as temp:
        copy_assets(assets, temp, iter_dir)  # a link out of the checkpoint is refused
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writer = ShardedSafetensorsWriter(temp)
        for name, tensor in backbone.megatron_to_hf(lambda entry: state[entry.global_name]):
            writer.add(name, tensor)
        writer.add(SCORE, state[f"{HEAD_PREFIX}weight"])
        writer.close()
        write_manifest(temp)  # the checksum manifest every checkpoint this toolkit writes carries
    return Path(save)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="reward-model checkpoint directory")
    parser.add_argument("--save", required=True, help="HF output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_third_party(args.verbose or None)

    def export() -> None:
        out = reward_model_to_hf(args.load, args.save, args.overwrite)
        config = json.loads((out / "config.json").read_text())
        print(f"saved HF reward model ({config['architectures'][0]}, one score) to {out}")

    return run_reporting_errors(export)


if __name__ == "__main__":
    sys.exit(main())

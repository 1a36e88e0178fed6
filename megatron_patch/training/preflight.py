"""Checks a launch runs once, before torchrun starts any rank: ``python -m megatron_patch.train check MODE ...``.

Everything here reads flags, metadata and the first lines of files (no model, no distributed state, a few
seconds), so a wrong SFT schema, a size preset that does not describe the checkpoint, or FP8 on a machine without
Transformer Engine stops the job with one line instead of N ranks failing after their heavy imports. The ranks run
the same rules again when they build the run (``build_trainer``); this module only moves the failure earlier.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from ..errors import ConfigError
from .arguments import TrainConfig

SFT_LINES_CHECKED = 100  # the schema of the first lines; a bad line further down still fails in the ranks


def check_data(cfg: TrainConfig) -> None:
    """Pretraining: every --data-path prefix has its .bin and .idx. Finetuning: the jsonl schema of the first lines."""
    if cfg.mode == "pretrain":
        for word in cfg.data_path or []:
            try:
                float(word)
                continue  # a blend weight
            except ValueError:
                pass
            for suffix in (".bin", ".idx"):
                if not Path(word + suffix).is_file():
                    raise FileNotFoundError(f"--data-path {word}: {word}{suffix} does not exist (make it with "
                                            "toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh)")
        return
    from ..data.sft import read_records

    for path in (cfg.train_data_path, cfg.valid_data_path):
        if path:
            read_records(path, limit=SFT_LINES_CHECKED)


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Raise the first user error a launch of ``world_size`` ranks would hit early; return when there is none.
    Started by a launch script, the reporter's line also names the script's arguments behind the flags it mentions
    (``errors.name_script_arguments``)."""
    _preflight(cfg, world_size)


def _preflight(cfg: TrainConfig, world_size: int) -> None:
    from .checkpointing import TRAIN_STATE, has_train_state
    from .loop import _load_dirs
    from .setup import check_precision_support, resolve_model_source

    cfg.validate(world_size)
    check_precision_support(cfg)
    load_dir, resume = _load_dirs(cfg)
    source = resolve_model_source(cfg, load_dir)  # family, size preset, vocabulary, TP x PP
    if resume and has_train_state(load_dir):  # the weights are vetted by resolve_model_source, as in the ranks
        check_torch_dist_checkpoint(load_dir / TRAIN_STATE)
    tokenizer = cfg.tokenizer_model or source.assets_dir
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass --tokenizer-model (the checkpoint has no hf_assets)")
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer-model {tokenizer} does not exist")
    check_data(cfg)

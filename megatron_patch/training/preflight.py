"""Checks a launch runs once, before torchrun starts any rank: ``python -m megatron_patch.train check MODE ...``.

Everything here reads flags, metadata and the first lines of files (no model, no distributed state, a few
seconds), so a wrong SFT schema, a size preset that does not describe the checkpoint, or FP8 on a machine without
Transformer Engine stops the job with one line instead of N ranks failing after their heavy imports. The ranks run
the same rules again when they build the run (``build_trainer``); this module only moves the failure earlier.
"""

from __future__ import annotations

from pathlib import Path

from .arguments import TrainConfig

SFT_LINES_CHECKED = 100  # the schema of the first lines; a bad line further down still fails in the ranks


def preset_shape(family, size: str) -> tuple[int, int]:
    """(layers, hidden size) of a family's size preset."""
    arch = family.arch_from_hf(family.flavor(size))
    return arch.num_layers, arch.hidden_size


def check_model_size(cfg: TrainConfig, load_dir: Path | None) -> None:
    """--model-size names a preset of the family and, with --load, one that describes the checkpoint."""
    from ..models import get_family
    from ..models.checkpoint import Checkpoint

    if not cfg.model_size:
        return
    spec = Checkpoint.open(load_dir).spec if load_dir is not None else None
    family = get_family(cfg.model_name) if cfg.model_name else spec.family
    wanted = preset_shape(family, cfg.model_size)  # an unknown preset: the error lists the family's presets
    if spec is None:
        return
    arch = family.arch_from_hf(spec.hf_config)
    saved = (arch.num_layers, arch.hidden_size)
    if wanted != saved:
        matching = [name for name in family.flavors if preset_shape(family, name) == saved]
        hint = (f"the checkpoint is {family.name} preset {' / '.join(matching)}" if matching
                else f"no {family.name} preset has that shape ({', '.join(family.flavors)})")
        raise ValueError(f"--model-size {cfg.model_size} ({wanted[0]} layers, hidden {wanted[1]}) does not match "
                         f"the --load checkpoint ({saved[0]} layers, hidden {saved[1]}): {hint}")


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
    """Raise the first user error a launch of ``world_size`` ranks would hit early; return when there is none."""
    from .loop import _load_dirs
    from .setup import check_precision_support, resolve_model_source

    cfg.validate(world_size)
    check_precision_support(cfg)
    load_dir, _ = _load_dirs(cfg)
    check_model_size(cfg, load_dir)
    source = resolve_model_source(cfg, load_dir)
    source.arch.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    positions = source.arch.max_position_embeddings
    if positions and cfg.seq_length > positions:  # generation refuses the same; RoPE/positions beyond are untrained
        raise ValueError(f"--seq-length {cfg.seq_length} exceeds the {positions} positions the model was built for "
                         "(max_position_embeddings)")
    tokenizer = cfg.tokenizer_model or source.assets_dir
    if tokenizer is None:
        raise ValueError("no tokenizer: pass --tokenizer-model (the checkpoint has no hf_assets)")
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer-model {tokenizer} does not exist")
    check_data(cfg)

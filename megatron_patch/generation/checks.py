"""What offline generation checks before building a model: the flags, then the checkpoint against the flags.

Each rule raises one line naming the flag to change (the generate CLI's names; the launch scripts map their
positional arguments onto those flags).
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from ..errors import ConfigError

PARALLEL_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")
EP_FLAG = "--expert-model-parallel-size"


def check_request(args: Namespace) -> None:
    """Everything that can be checked from the flags and the file system alone (no checkpoint read)."""
    from ..checkpoint.paths import check_output_path, check_outputs
    from .sampling import SamplingParams

    ep = getattr(args, "ep", 1)
    for flag in ("tp", "pp", "ep", "micro_batch_size", "seq_length", "out_seq_length"):
        if getattr(args, flag, 1) < 1:
            raise ConfigError(f"{EP_FLAG if flag == 'ep' else '--' + flag.replace('_', '-')} must be >= 1 "
                              f"(got {getattr(args, flag, 1)})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (args.tp * args.pp):
        raise ConfigError(f"{world} processes were launched for TP x PP = {args.tp} x {args.pp}; launch a multiple "
                          f"of TP x PP processes (torchrun --nproc-per-node {args.tp * args.pp})")
    if (world // (args.tp * args.pp)) % ep:
        raise ConfigError(f"{EP_FLAG} {ep} does not divide the data-parallel size {world // (args.tp * args.pp)}"
                          f" ({world} processes / TP x PP {args.tp}x{args.pp}): expert parallelism is carved out of "
                          f"data parallelism (torchrun --nproc-per-node {args.tp * args.pp * ep})")
    if args.input_len is not None:
        if args.input_len < 1:
            raise ConfigError(f"--input-len must be >= 1 (got {args.input_len})")
        if args.input_len + args.out_seq_length > args.seq_length:
            raise ConfigError(f"--input-len {args.input_len} + --out-seq-length {args.out_seq_length} exceeds "
                              f"--seq-length {args.seq_length}")
    elif args.out_seq_length >= args.seq_length:
        raise ConfigError(f"--out-seq-length {args.out_seq_length} leaves no room for a prompt in --seq-length "
                          f"{args.seq_length}")
    if args.max_padding_length is not None and not 1 <= args.max_padding_length <= args.seq_length:
        raise ConfigError(f"--max-padding-length must be in [1, --seq-length {args.seq_length}] "
                          f"(got {args.max_padding_length})")
    if args.extra_vocab_size is not None and args.extra_vocab_size < 0:
        raise ConfigError(f"--extra-vocab-size must be >= 0 (got {args.extra_vocab_size})")
    SamplingParams(args.top_k, args.top_p, args.temperature, args.repetition_penalty, args.seed)
    source = Path(args.text_generate_input_file)
    if not source.is_file():
        raise FileNotFoundError(f"--text-generate-input-file {source} does not exist")
    target = check_output_path(args.text_generate_output_file, "--text-generate-output-file")
    if not target.absolute().parent.is_dir():
        raise FileNotFoundError(f"the directory of --text-generate-output-file {target} does not exist")
    if target.is_dir():
        raise ConfigError(f"--text-generate-output-file {target} is a directory")
    check_outputs({"--text-generate-output-file": target},
                  {"--text-generate-input-file": source, "--load": args.load})


def preflight(args: Namespace) -> None:
    """What a launch checks once before starting ranks: the flags, the prompt file, the checkpoint's metadata."""
    from ..checkpoint.megatron import find_iteration_dir, read_meta
    from .prompts import read_prompts

    check_request(args)
    read_prompts(args.text_generate_input_file, args.prompt_key)
    iter_dir = find_iteration_dir(args.load)
    check_checkpoint(args, read_meta(iter_dir))
    check_assets(iter_dir)
    check_stored_tensors(iter_dir)


def check_stored_tensors(iter_dir: Path) -> None:
    """The stored tensors' names and shapes match ``megatron_patch.json`` (read from the files' headers) before a
    model of the recorded sizes is built: a crafted size would otherwise allocate it first."""
    from ..models.checkpoint import Checkpoint

    Checkpoint.open(iter_dir).reader()


def check_assets(iter_dir: Path) -> None:
    """The tokenizer files (``hf_assets/``) lie inside the checkpoint: a link out of it is refused, not read."""
    from ..checkpoint.hf import asset_files
    from ..checkpoint.megatron import ASSETS

    if (iter_dir / ASSETS).is_dir():
        asset_files(iter_dir / ASSETS, iter_dir)


def check_checkpoint(args: Namespace, meta: dict) -> None:
    """The checkpoint (its ``megatron_patch.json``) against --model-name, --model-size, --extra-vocab-size, the
    parallel sizes and --seq-length."""
    from ..models import get_family
    from ..models.presets import check_size_preset

    family = get_family(meta["family"])
    if args.model_name and args.model_name != family.name:
        raise ConfigError(f"the checkpoint holds a '{family.name}' model, not '{args.model_name}' (--model-name)")
    if args.model_size:
        check_size_preset(family, args.model_size, meta["hf_config"])
    if args.extra_vocab_size is not None and args.extra_vocab_size != meta["extra_vocab_size"]:
        raise ConfigError(f"--extra-vocab-size {args.extra_vocab_size} differs from the checkpoint's "
                          f"{meta['extra_vocab_size']} (the value it was converted with)")
    arch = family.arch_from_hf(meta["hf_config"])
    arch.check_parallel(args.tp, args.pp, PARALLEL_FLAGS)
    arch.check_expert_parallel(getattr(args, "ep", 1), EP_FLAG)
    if args.seq_length > arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the model's {arch.max_position_embeddings} "
                          "positions")

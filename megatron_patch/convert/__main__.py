"""python -m megatron_patch.convert {hf2mcore,mcore2hf,verify,demo} ..."""

from __future__ import annotations

import argparse
import math
import os
import sys

# The registered checkpoint formats (checkpoint.formats); spelled out here so that --help needs no torch import.
FORMAT_CHOICES = ("torch_dist", "legacy")


def build_parser() -> argparse.ArgumentParser:
    from ..runtime.noise import add_verbose_flag

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf2mcore", help="HF directory -> Megatron checkpoint sharded for TP x PP")
    h2m.add_argument("--load", required=True, help="HF model directory")
    h2m.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    h2m.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                     help="tensor-parallel size to shard for (default: 1)")
    h2m.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                     help="pipeline-parallel size to shard for (default: 1)")
    h2m.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1,
                     help="expert-parallel size of a mixture-of-experts model (legacy: one file per TP x PP x EP "
                          "rank; torch_dist stores experts by global index, loadable at any EP; default: 1)")
    h2m.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="torch_dist",
                     help="torch_dist (megatron-core dist_checkpointing, reshardable; default) or legacy mp_rank_* files")
    h2m.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                     help="layer spec the checkpoint is for (affects legacy key names only; default: local)")
    h2m.add_argument("--model-name", "--family", dest="family", default=None,
                     help="model family; detected from config.json when omitted")
    h2m.add_argument("--extra-vocab-size", type=int, default=0,
                     help="new token rows to append to the vocabulary (default: 0)")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this x TP (default: 128)")
    h2m.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    h2m.add_argument("--allow-non-finite", action="store_true",
                     help="convert weights holding NaN/Inf (warn once) instead of refusing them")

    m2h = sub.add_parser("mcore2hf", help="Megatron checkpoint (any TP x PP, either format) -> HF directory")
    m2h.add_argument("--load", required=True, help="Megatron checkpoint directory (or one iteration directory)")
    m2h.add_argument("--save", required=True, help="output HF directory")
    m2h.add_argument("--max-shard-size-gb", type=float, default=5.0,
                     help="largest safetensors shard, in GiB (default: 5)")
    m2h.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    m2h.add_argument("--allow-non-finite", action="store_true",
                     help="export weights holding NaN/Inf (warn once) instead of refusing them")
    lora = m2h.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="a LoRA adapter checkpoint: write its base with the adapters merged in (an HF model)")
    lora.add_argument("--lora-only", action="store_true",
                      help="a LoRA adapter checkpoint: write the adapters alone as a PEFT adapter directory")
    m2h.add_argument("--model-name", "--family", dest="family", default=None,
                     help="model family of a checkpoint without megatron_patch.json (Megatron-LM, Megatron-Bridge); "
                          "detected from --hf-config's config.json when omitted")
    m2h.add_argument("--hf-config", default=None, metavar="DIR",
                     help="HF directory with the config.json and tokenizer of a checkpoint without megatron_patch.json")

    ver = sub.add_parser("verify", help="compare HF and Megatron logits on a fixed text")
    ver.add_argument("--hf", required=True, help="HF model directory")
    ver.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    ver.add_argument("--tp", type=int, default=None, help="TP to run at (default: as saved)")
    ver.add_argument("--pp", type=int, default=None, help="PP to run at (default: as saved)")
    ver.add_argument("--ep", type=int, default=None,
                     help="expert-parallel size to run a MoE checkpoint at (TP x PP x EP ranks; default: as saved)")
    ver.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (fp32; default: 1e-4)")
    ver.add_argument("--trust-remote-code", action="store_true",
                     help="let transformers run the modeling code shipped with the HF directory (Baichuan, Qwen v1)")

    from .demo import __doc__ as demo_description

    demo = sub.add_parser("demo", help="tiny llama built offline -> Megatron TP x PP -> parity -> HF round trip",
                          description=demo_description, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--workdir", default="runs/convert_demo", help="where to write (default: runs/convert_demo)")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default: 2)")
    demo.add_argument("--pp", type=int, default=2, help="pipeline-parallel size (default: 2)")
    demo.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="torch_dist",
                      help="checkpoint format (default: torch_dist)")
    for command in (h2m, m2h, ver):
        command.add_argument("--no-verify-checksums", action="store_true",
                             help="read checkpoints without checking their checksums.json (a file whose bytes "
                                  "changed since it was written is otherwise refused)")
    for command in (h2m, m2h, ver, demo):
        add_verbose_flag(command)
    return parser


def check_numbers(args) -> None:
    """Numeric flags whose bad values otherwise pass (a NaN tolerance accepts every difference) or crash."""
    from ..errors import ConfigError

    if args.command == "verify" and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ConfigError(f"--tolerance must be a finite number >= 0 (got {args.tolerance})")
    if args.command == "mcore2hf" and not (math.isfinite(args.max_shard_size_gb) and args.max_shard_size_gb * 2**30 >= 1):
        raise ConfigError(f"--max-shard-size-gb must be a finite number > 0 (got {args.max_shard_size_gb})")


def run(args) -> int | None:
    from ..errors import STORAGE_ERRNOS, MachineSupportError, storage_error_line

    check_numbers(args)
    try:
        return _run(args)
    except OSError as error:  # ENOSPC from a bulk write names no file: name the output flag
        if error.errno not in STORAGE_ERRNOS or args.command not in ("hf2mcore", "mcore2hf"):
            raise
        raise MachineSupportError(storage_error_line(error, f"--save {args.save}")) from None


def _run(args) -> int | None:
    from ..checkpoint.checksums import set_verification

    set_verification(not getattr(args, "no_verify_checksums", False))
    if args.command in ("hf2mcore", "mcore2hf"):
        from ..checkpoint.paths import check_outputs

        check_outputs({"--save": args.save}, {"--load": args.load, "--hf-config": getattr(args, "hf_config", None)})
    if args.command == "hf2mcore":
        from .hf_to_mcore import hf_to_mcore

        out = hf_to_mcore(args.load, args.save, args.tp, args.pp, args.fmt, args.transformer_impl, args.family,
                          args.extra_vocab_size, args.make_vocab_size_divisible_by, args.overwrite,
                          allow_non_finite=args.allow_non_finite, ep=args.ep)
        ep = f", EP={args.ep}" if args.ep != 1 else ""
        print(f"saved Megatron checkpoint ({args.fmt}, TP={args.tp}, PP={args.pp}{ep}) to {out}")
    elif args.command == "mcore2hf":
        from .mcore_to_hf import mcore_to_hf

        out = mcore_to_hf(args.load, args.save, args.overwrite, int(args.max_shard_size_gb * 2**30),
                          model_name=args.family, hf_config_dir=args.hf_config,
                          allow_non_finite=args.allow_non_finite, merge_lora=args.merge_lora,
                          lora_only=args.lora_only)
        print(f"saved {'PEFT adapter' if args.lora_only else 'HF model'} to {out}")
    elif args.command == "demo":
        from ..checkpoint.paths import check_output_path
        from .demo import print_table, run_conversion_demo

        check_output_path(args.workdir, "--workdir")

        rows = run_conversion_demo(args.workdir, args.tp, args.pp, args.fmt)
        print_table(rows)
        return 0 if all("FAIL" not in str(r[1]) for r in rows) else 1
    else:
        from .verify import verify

        report = verify(args.hf, args.mcore, args.tp, args.pp, args.tolerance, args.trust_remote_code, ep=args.ep)
        print(report.line())
        return 0 if report.ok else 1
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("hf2mcore", "mcore2hf") and "torch" not in sys.modules:
        # Conversion is I/O-bound: torch's OpenMP threads would spin between its few parallel ops, taking the CPU
        # the kernel needs to copy the bytes (measured: mcore2hf of 5 GB, user CPU 9.7-10.9 s -> 5.9-6.5 s). OpenMP
        # reads it when torch loads it, so only before the first torch import; a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..errors import run_reporting_errors
    from ..runtime.noise import quiet_third_party

    quiet_third_party(args.verbose or None)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

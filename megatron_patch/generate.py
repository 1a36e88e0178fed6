"""python -m megatron_patch.generate --load CKPT --text-generate-input-file IN --text-generate-output-file OUT [...]

Offline batch generation from a converted or trained megatron-patch checkpoint (torch_dist or legacy, saved at any
TP x PP, run at any TP x PP). Launch a multiple of TP x PP processes, e.g.
  torchrun --nproc-per-node 2 -m megatron_patch.generate --tensor-model-parallel-size 2 --load CKPT ...
With more processes than TP x PP, each data-parallel group generates its share of the prompts.

Input: a text file with one prompt per line, or a .jsonl file whose objects carry the prompt under
``--prompt-key`` (default ``prompt``). Output: a .jsonl file with one {"prompt", "completion"} object per prompt,
in input order, written on rank 0 to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys

PRECISIONS = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    from .runtime.noise import add_verbose_flag

    p = argparse.ArgumentParser(prog="python -m megatron_patch.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (or one iteration directory)")
    p.add_argument("--model-name", default=None, help="expected model family (checked against the checkpoint)")
    p.add_argument("--model-size", default=None, help="expected size preset of the family (checked against the "
                                                      "checkpoint's layers and hidden size)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="tensor-parallel size to run at, whatever the checkpoint was saved at (default: 1)")
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1,
                   help="pipeline-parallel size to run at (default: 1)")
    p.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1,
                   help="expert-parallel size of a mixture-of-experts model, carved out of the data-parallel ranks "
                        "(each holds num_experts / EP experts; the ranks of an EP group step together; default: 1)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="prompts generated together (default: 1)")
    p.add_argument("--seq-length", type=int, required=True, help="longest prompt + completion, in tokens")
    p.add_argument("--max-padding-length", type=int, default=None,
                   help="accepted for argument-list compatibility with the finetuning scripts; must be <= "
                        "--seq-length. Generation batches prompts of different lengths without padding them")
    p.add_argument("--extra-vocab-size", type=int, default=None,
                   help="tokens added at conversion; checked against the checkpoint when given")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights and compute dtype (default: fp32)")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy; 0 disables the top-k filter (default: 1)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass; 0 disables it (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="logits are divided by it, > 0 (default: 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables it (default: 1.0)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default: 1234)")
    p.add_argument("--input-len", type=int, default=None,
                   help="longest prompt in tokens; longer prompts keep their last --input-len tokens")
    p.add_argument("--out-seq-length", type=int, required=True, help="most new tokens per prompt")
    p.add_argument("--text-generate-input-file", required=True,
                   help="prompts: a text file (one per line) or a .jsonl file (see --prompt-key)")
    p.add_argument("--text-generate-output-file", required=True,
                   help='.jsonl output, one {"prompt", "completion"} object per prompt, in input order')
    p.add_argument("--prompt-key", default="prompt", help="field holding the prompt in a .jsonl input "
                                                          "(default: prompt)")
    p.add_argument("--no-kv-cache", dest="use_cache", action="store_false",
                   help="re-run the whole prefix every step (slow; for checking the cache)")
    p.add_argument("--check-only", action="store_true",
                   help="run the checks a launch runs before starting ranks (flags, files, checkpoint metadata; no "
                        "model) and exit; $WORLD_SIZE is the number of processes the launch will start")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load weights holding NaN/Inf (warn once) instead of refusing the checkpoint")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="load the checkpoint without checking its checksums.json (a changed file is otherwise "
                        "refused)")
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.noise import quiet_third_party

    quiet_third_party(args.verbose or None)
    from .checkpoint.checksums import set_verification
    from .errors import run_reporting_errors
    from .generation.offline import generate_file
    from .runtime import destroy_distributed

    set_verification(not args.no_verify_checksums)
    if args.check_only:
        from .generation.checks import preflight

        return run_reporting_errors(lambda: preflight(args))
    return run_reporting_errors(lambda: generate_file(args) and None, cleanup=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())

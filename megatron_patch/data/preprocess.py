"""python -m megatron_patch.data.preprocess --input docs.jsonl --output-prefix out/corpus --tokenizer DIR ...

Writes ``<output-prefix>_<json-key>_document.bin/.idx`` (Megatron-LM's naming); pass that prefix to --data-path.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import run_reporting_errors
from ..runtime.noise import add_verbose_flag, quiet_third_party
from .tokenizers import tokenizer_kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="jsonl file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="output path prefix")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        help="HF tokenizer directory, sentencepiece .model or qwen.tiktoken")
    parser.add_argument("--tokenizer-type", choices=tokenizer_kinds(), default=None,
                        help="tokenizer kind (detected from the path when omitted)")
    parser.add_argument("--json-key", "--json-keys", dest="json_key", default="text", help="the text field")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizer worker processes (one core each; 1 tokenizes in this process)")
    parser.add_argument("--chunk-mb", type=float, default=1.0,
                        help="MB of whole input lines per work item (default 1; bounded memory: 3 per worker in flight)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip malformed lines instead of stopping at the first one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <prefix>.bin/.idx pair")
    parser.add_argument("--exact-prefix", action="store_true",
                        help="write <output-prefix>.bin/.idx instead of <output-prefix>_<key>_document.*")
    add_verbose_flag(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_third_party(args.verbose or None)  # also for the spawned workers, through the environment
    if not args.chunk_mb > 0:  # also NaN
        parser.error(f"--chunk-mb must be a positive number of MB (got {args.chunk_mb})")
    prefix = args.output_prefix if args.exact_prefix else f"{args.output_prefix}_{args.json_key}_document"

    def preprocess() -> None:
        # Lazy on purpose: spawned tokenizer workers re-import this module as their __main__, and what indexed.py
        # imports (the checkpoint package: torch) costs each of them seconds that tokenizing never needs.
        from .indexed import build_indexed_dataset, check_output_prefix

        check_output_prefix(args.input, args.output_prefix, prefix)
        summary = build_indexed_dataset(args.input, prefix, args.tokenizer, args.tokenizer_type, args.json_key,
                                        args.workers, max(1, round(args.chunk_mb * 2**20)), args.skip_bad_lines,
                                        overwrite=args.overwrite)
        print(summary.line())
        print(f"data prefix for --data-path: {summary.output_prefix}")

    return run_reporting_errors(preprocess)


if __name__ == "__main__":
    sys.exit(main())

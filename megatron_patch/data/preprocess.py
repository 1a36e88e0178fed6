"""python -m megatron_patch.data.preprocess --input docs.jsonl --output-prefix out/corpus --tokenizer DIR ...

Writes ``<output-prefix>_<json-key>_document.bin/.idx`` (Megatron-LM's naming); pass that prefix to --data-path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint.paths import check_output_path, check_outputs
from ..errors import ConfigError, run_reporting_errors
from .indexed import build_indexed_dataset
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
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--chunk-lines", type=int, default=64, help="lines per work item")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip malformed lines instead of stopping at the first one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <prefix>.bin/.idx pair")
    parser.add_argument("--exact-prefix", action="store_true",
                        help="write <output-prefix>.bin/.idx instead of <output-prefix>_<key>_document.*")
    return parser


OUTPUT_SUFFIXES = (".bin", ".idx", ".tmp.bin", ".tmp.idx")  # the dataset and the temporary files it is built in


def check_output_prefix(input_path: str, output_prefix: str, prefix: str) -> None:
    """The output files ``<prefix>.bin/.idx`` (and their temporaries) name a file, and none of them is the input
    (``--output-prefix corpus --exact-prefix`` with ``--input corpus.bin`` would tokenize into the file being read)."""
    check_output_path(output_prefix, "--output-prefix")
    if Path(prefix).name in ("", ".", ".."):
        raise ConfigError(f"--output-prefix {output_prefix!r} names a directory; add a file name prefix "
                          "(e.g. out/corpus)")
    for suffix in OUTPUT_SUFFIXES:
        check_outputs({"--output-prefix": prefix + suffix}, {"--input": input_path})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prefix = args.output_prefix if args.exact_prefix else f"{args.output_prefix}_{args.json_key}_document"

    def preprocess() -> None:
        check_output_prefix(args.input, args.output_prefix, prefix)
        summary = build_indexed_dataset(args.input, prefix, args.tokenizer, args.tokenizer_type, args.json_key,
                                        args.workers, args.chunk_lines, args.skip_bad_lines,
                                        overwrite=args.overwrite)
        print(summary.line())
        print(f"data prefix for --data-path: {summary.output_prefix}")

    return run_reporting_errors(preprocess)


if __name__ == "__main__":
    sys.exit(main())

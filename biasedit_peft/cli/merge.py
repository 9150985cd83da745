"""``biasedit merge``: merge one or more BiasEdit adapters into a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="Merge BiasEdit adapters into a plain transformers checkpoint.",
        description=(
            "Write base + sum of adapter deltas as a standard transformers checkpoint (safetensors, sharded when "
            "large, tokenizer included) that loads without biasedit_peft. Several adapters add their deltas. "
            "The sum is formed in float32 and cast once to --dtype; non-finite results are refused."
        ),
    )
    parser.add_argument("--model", required=True, help="Base model: folder, Hub id or 'testbed'.")
    parser.add_argument("--adapter", required=True, action="append", dest="adapters", metavar="ADAPTER",
                        help="BiasEdit adapter folder or Hub id; repeat to merge several (their deltas add).")
    parser.add_argument("--out", required=True,
                        help="Output folder (refused if not empty or an input; built beside it, swapped in at the "
                        "end).")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it is not empty.")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="Output dtype (default: the base model's).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard (default 5GB).")
    return parser


def run(args: argparse.Namespace) -> int:
    from biasedit_peft._io import check_output_folder, folder_in_place
    from biasedit_peft.sharing.merge import merge_to_folder

    try:
        check_output_folder(args.out, [args.model, *args.adapters], args.overwrite)
        with folder_in_place(args.out) as building:
            report = merge_to_folder(args.model, args.adapters, building, dtype=args.dtype,
                                     max_shard_size=args.max_shard_size)
    except (ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.to_text())
    print(f"Saved merged model and tokenizer to {args.out}")
    return 0

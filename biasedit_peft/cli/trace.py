"""``biasedit trace``: causal tracing of bias on StereoSet; heatmaps (PNG) and numbers (JSON).

    biasedit trace --model M [--adapter A] [--bias-types gender] [--split test] [--limit N]
                   [--noise-scale 3] [--samples 10] [--window 1] [--seed 0] --out DIR

Writes ``DIR/trace.json`` and, with matplotlib (``pip install 'biasedit-peft[plot]'``), ``DIR/trace_*.png``.
Method and JSON schema: docs/tracing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biasedit_peft.cli._common import (
    add_model_argument,
    add_overwrite_argument,
    add_runtime_arguments,
    add_tracing_arguments,
    load_model_from_args,
    split_list,
    tracing_settings,
    write_document,
)

TRACE_JSON = "trace.json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "trace",
        help="causal tracing of bias: where a model's stereotype preference lives (heatmaps + JSON)",
        description="Corrupt the target-term embeddings of StereoSet items with Gaussian noise, restore one clean "
        "state (block output, MLP output or attention output) at one layer and position at a time, and measure how "
        "much of the bias effect |log p(anti) - log p(stereo)| comes back. Method: docs/tracing.md.",
    )
    add_model_argument(parser)
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder or Hub id to apply on top")
    parser.add_argument("--bias-types", "--bias-type", dest="bias_type", default="gender",
                        help="StereoSet bias type(s), comma-separated (default gender; --bias-type is the old name)")
    parser.add_argument("--split", choices=("test", "dev", "train"), default="test",
                        help="StereoSet split (default test, i.e. StereoSet's dev file)")
    parser.add_argument("--limit", type=int, default=None, help="trace only the first N items of each bias type")
    add_tracing_arguments(parser)
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="states to restore (default hidden,mlp,attn)")
    parser.add_argument("--layers-per-forward", type=int, default=None,
                        help="layer rows per forward pass (default: all layers of a position at once)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", required=True, help="folder for trace.json and the PNG plots (refused if not empty)")
    add_overwrite_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_runtime_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from biasedit_peft._io import check_output_folder
    from biasedit_peft.data import load_stereoset
    from biasedit_peft.data.splits import take_per_type
    from biasedit_peft.tracing import find_layout, format_trace, plot_trace, trace_items

    try:
        check_output_folder(args.out, [args.model, args.adapter], args.overwrite)
        settings = tracing_settings(args, split_list(args.kinds))
        items = take_per_type(load_stereoset(args.split, bias_types=split_list(args.bias_type)), args.limit)
        model, tokenizer = load_model_from_args(args)
        layout = find_layout(model, args.blocks, args.mlp_module, args.attn_module)
        meta = {"model": args.model, "adapter": args.adapter, "bias_types": split_list(args.bias_type),
                "split": args.split, "limit": args.limit}
        result = trace_items(model, tokenizer, items, settings, layout, progress=not args.quiet, meta=meta)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    document = result.to_json()
    write_document(Path(args.out), TRACE_JSON, document, format_trace(document),
                   lambda folder: plot_trace(document, folder))
    return 0

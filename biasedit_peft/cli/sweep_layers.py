"""``biasedit sweep-layers``: which blocks to edit on this model, by short editor trainings per block set.

    biasedit sweep-layers --model M [--budget 3] [--all-windows] [--max-steps 30] [--bias-types gender]
                          [--trace DIR/trace.json | --trace-limit N] --out DIR

Writes ``DIR/sweep.json`` and, with matplotlib, ``DIR/sweep.png``; prints the table. Rule and protocol:
docs/tracing.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from biasedit_peft.cli._common import (
    add_model_argument,
    add_overwrite_argument,
    add_preset_argument,
    add_runtime_arguments,
    add_tracing_arguments,
    load_model_from_args,
    split_list,
    tracing_settings,
    write_document,
)
from biasedit_peft.models import default_device

SWEEP_JSON = "sweep.json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep-layers",
        help="rank candidate block sets to edit (short editor training per set) and compare with tracing",
        description="For a budget of blocks, meta-train a BiasEdit editor briefly for each candidate set (first "
        "blocks, last blocks, or every window), edit held-out StereoSet items group by group and report SS and LMS; "
        "recommend the set with SS closest to 50 at the smallest LMS drop, and say what bias tracing suggests.",
    )
    add_model_argument(parser)
    parser.add_argument("--budget", type=int, default=3, help="blocks per candidate set (default 3)")
    parser.add_argument("--all-windows", action="store_true", help="every contiguous window, not only first / last")
    parser.add_argument("--bias-types", "--bias-type", dest="bias_type", default="gender",
                        help="StereoSet bias type(s), comma-separated (default gender; --bias-type is the old name)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training items of each bias type "
                        "(StereoSet train split)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N held-out items of each bias type "
                        "(StereoSet test split)")
    parser.add_argument("--max-steps", type=int, default=30, help="meta-training steps per candidate (default 30)")
    add_preset_argument(parser)
    parser.add_argument("--n-edits", type=int, default=None, help="samples per edit (default: preset)")
    parser.add_argument("--batch-size", type=int, default=None, help="sentence pairs per forward (default: preset)")
    parser.add_argument("--lr", type=float, default=None, help="initial editor step size (default: preset)")
    parser.add_argument("--meta-lr", type=float, default=None, help="editor Adam learning rate (default: preset)")
    parser.add_argument("--rank", type=int, default=None, help="editor rank (default: preset)")
    parser.add_argument("--ss-tolerance", type=float, default=1.0,
                        help="|SS - 50| within this of the best counts as tied (default 1)")
    parser.add_argument("--trace", default=None, help="trace.json from `biasedit trace` to compare with")
    parser.add_argument("--trace-limit", type=int, default=40,
                        help="without --trace: trace this many held-out items (default 40; 0: no tracing)")
    add_tracing_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for sweep.json and sweep.png (refused if not empty)")
    add_overwrite_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_runtime_arguments(parser)
    return parser


def _trace_document(args, items) -> dict | None:
    """The trace to compare with: ``--trace`` read back, or a short trace of ``items`` run now."""
    if args.trace:
        return json.loads(Path(args.trace).read_text(encoding="utf-8"))
    if not args.trace_limit:
        return None
    from biasedit_peft.tracing import find_layout, trace_items

    model, tokenizer = load_model_from_args(args)
    layout = find_layout(model, args.blocks, args.mlp_module, args.attn_module)
    result = trace_items(model, tokenizer, items[:args.trace_limit], tracing_settings(args, ("mlp",)), layout,
                         progress=not args.quiet)
    return result.to_json()


def run(args: argparse.Namespace) -> int:
    import torch

    from biasedit_peft._io import check_output_folder
    from biasedit_peft.data import load_stereoset
    from biasedit_peft.data.splits import take_per_type
    from biasedit_peft.editor import preset_for_model, preset_name_for
    from biasedit_peft.models import load_model, load_tokenizer
    from biasedit_peft.workflows.layer_sweep import SweepSettings, format_sweep, plot_sweep, sweep_layers

    try:
        check_output_folder(args.out, [args.model, args.trace], args.overwrite)
        bias_types = split_list(args.bias_type)
        train = take_per_type(load_stereoset("train", bias_types=bias_types), args.train_limit,
                              option="--train-limit")
        held_out = take_per_type(load_stereoset("test", bias_types=bias_types), args.eval_limit,
                                 option="--eval-limit")
        trace = _trace_document(args, held_out)
        if args.threads:
            torch.set_num_threads(args.threads)
        tokenizer = load_tokenizer(args.model)
        device = default_device(args.device)
        preset_name = preset_name_for(args.model, args.preset)
        preset = preset_for_model(None, preset_name) if preset_name else None  # None: from the model type
        settings = SweepSettings(budget=args.budget, every_window=args.all_windows, max_steps=args.max_steps,
                                 n_edits=args.n_edits, batch_size=args.batch_size, lr=args.lr, meta_lr=args.meta_lr,
                                 rank=args.rank, ss_tolerance=args.ss_tolerance, seed=args.seed)
        meta = {"model": args.model, "bias_types": bias_types, "n_train": len(train), "n_held_out": len(held_out),
                "trace": args.trace}
        result = sweep_layers(lambda: load_model(args.model, dtype=args.dtype, device=device), tokenizer, train,
                              held_out, settings, preset, trace, progress=not args.quiet, meta=meta)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    document = result.to_json()
    write_document(Path(args.out), SWEEP_JSON, document, format_sweep(document),
                   lambda folder: [plot_sweep(document, folder / "sweep.png")])
    return 0

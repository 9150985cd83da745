"""``biasedit demo``: the whole BiasEdit workflow on the bundled testbed (or any model), offline.

    biasedit demo [--model testbed] [--bias-types gender,race,religion] [--out demo] [--json FILE]
                  [--resume | --overwrite]

Trains an editor (the train-fit part of train, dev for early stopping, its edit scale calibrated on dev plus
train-calib: ``--calibrate-on``), measures it under the paper's per-batch, held-out
and joint protocols, writes the deployment adapter (one joint delta from train, its scale calibrated on dev),
evaluates before and after, merges the adapter into a plain checkpoint and re-scores it. See
:mod:`biasedit_peft.workflows.demo`.

The demo is built in a hidden ``.OUT.run`` folder beside ``OUT`` and swapped in whole at the end; each finished
stage is recorded there at once. ``--resume`` continues a killed demo (same settings, else refused naming the
differing ones); without it a non-empty ``OUT`` or an interrupted run is refused (exit 2), and ``--overwrite``
replaces ``OUT`` and starts again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biasedit_peft.cli._common import (
    add_average_steps_argument,
    add_block_init_argument,
    add_edit_layers_arguments,
    add_initial_edit_scale_argument,
    add_meta_lr_argument,
    add_model_argument,
    add_preset_argument,
    add_resume_arguments,
    add_runtime_arguments,
    add_select_by_argument,
    add_step_size_meta_lr_argument,
    copy_file,
    parse_block_indices,
    recorded_command,
    split_list,
)
from biasedit_peft.editor.losses import LOSS_KINDS


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="train an editor, debias, evaluate before/after, merge (default: the bundled testbed)",
        description="The whole BiasEdit workflow in one command, offline: meta-train an editor on StereoSet's "
        "train split, debias the test split into a PEFT adapter, evaluate before and after (StereoSet, "
        "CrowS-Pairs, perplexity), merge the adapter into a plain checkpoint and re-score it. Writes "
        "OUT/results.json, OUT/before_after.png, OUT/editor, OUT/adapter and OUT/merged.",
    )
    add_model_argument(parser, default="testbed")
    add_preset_argument(parser)
    parser.add_argument("--bias-types", default="gender,race,religion", help="comma-separated StereoSet types")
    parser.add_argument("--out", default="demo", help="output folder (default ./demo)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write results.json here")
    parser.add_argument("--max-steps", type=int, default=150, help="meta-training steps (default 150)")
    parser.add_argument("--eval-every", type=int, default=25, help="validate on dev every N steps (default 25)")
    parser.add_argument("--n-edits", type=int, default=None, help="samples per edit (default: preset)")
    parser.add_argument("--loss", choices=LOSS_KINDS, default=None,
                        help="loss variant (default token; abs: the gap's absolute value)")
    parser.add_argument("--loc-coef", type=float, default=None, help="retention weight (default: preset)")
    parser.add_argument("--level-coef", type=float, default=None,
                        help="weight of the level loss that keeps each pair's likelihood (default: preset)")
    parser.add_argument("--ss-coef", type=float, default=None,
                        help="weight of the soft-SS meta-loss term: each bias type's smoothed mean stereotype "
                        "preference in the edit group, squared (experimental; default: preset, 0)")
    add_block_init_argument(parser)
    parser.add_argument("--held-out-coef", type=float, default=None,
                        help="weight of the held-out debias loss: each edit also scored on pairs of other target "
                        "terms (default: preset)")
    add_select_by_argument(parser)
    add_meta_lr_argument(parser)
    add_step_size_meta_lr_argument(parser)
    add_average_steps_argument(parser)
    add_initial_edit_scale_argument(parser)
    parser.add_argument("--calibrate-on", choices=("dev", "dev+train-calib"), default="dev+train-calib",
                        help="where the edit scale is calibrated: dev+train-calib (default; the editor meta-trains on "
                        "train-fit, and twice the held-out target terms choose its scale), or dev (meta-trains on "
                        "all of train; the default before this release)")
    add_edit_layers_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="first N items per bias type of each split (quick runs)")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for CIs (0: none)")
    parser.add_argument("--no-merge", action="store_true", help="skip the merged checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    add_resume_arguments(parser, "continue a killed demo (or the finished one in --out): finished stages are "
                         "loaded, the rest run")
    add_runtime_arguments(parser, dtype_help="model dtype (the editor and the deltas stay float32); default: bf16 "
                          "for a model other than the testbed on a CPU whose bf16 matmuls are faster, else the "
                          "checkpoint's own")
    return parser


RUN_CONTROL_FLAGS = ("--resume", "--overwrite")
"""Flags left out of the recorded command: they say how a run is carried out, not what it computes."""


def config_from_args(args: argparse.Namespace):
    from biasedit_peft.workflows.demo import DemoConfig

    bias_types = split_list(args.bias_types)
    if not bias_types:
        raise ValueError("--bias-types is empty")
    return DemoConfig(
        model=args.model, out=args.out, preset=args.preset, bias_types=tuple(bias_types),
        num_edit_layers=args.num_edit_layers, layers_to_transform=parse_block_indices(args.layers),
        max_steps=args.max_steps, eval_every=args.eval_every, n_edits=args.n_edits, loss=args.loss,
        select_by=args.select_by, level_coef=args.level_coef, ss_coef=args.ss_coef, held_out_coef=args.held_out_coef,
        block_init=args.block_init, meta_lr=args.meta_lr, step_size_meta_lr=args.step_size_meta_lr,
        loc_coef=args.loc_coef,
        average_steps=args.average_steps, initial_edit_scale=args.initial_edit_scale, calibrate_on=args.calibrate_on,
        limit=args.limit, n_resamples=args.n_resamples,
        seed=args.seed, dtype=args.dtype,
        device=args.device, merge=not args.no_merge, progress=not args.quiet,
        command=recorded_command("demo", leave_out=RUN_CONTROL_FLAGS),  # None when called as a function
    )


def run(args: argparse.Namespace) -> int:
    import biasedit_peft  # noqa: F401  (registers BIASEDIT with peft)
    from biasedit_peft._io import run_folder
    from biasedit_peft.workflows.demo import PLOT_NAME, RESULTS_NAME, format_results, run_demo

    try:
        config = config_from_args(args)
        results = run_demo(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are in {run_folder(args.out) / 'stages'}; rerun the same command "
              "with --resume to continue", file=sys.stderr)
        return 130
    print(format_results(results))
    out = Path(args.out)
    print(f"\nwrote {out / RESULTS_NAME}, {out / 'editor'}, {out / 'adapter'}"
          + (f", {out / 'merged'}" if "merged" in results else ""))
    plot = out / PLOT_NAME
    print(f"plot: {plot}" if plot.is_file() else
          "plot skipped: matplotlib is not installed (pip install 'biasedit-peft[plot]')")
    if args.json_path:
        copy_file(out / RESULTS_NAME, args.json_path)
        print(f"wrote {Path(args.json_path)}")
    return 0

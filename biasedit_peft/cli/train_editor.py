"""``biasedit train-editor``: meta-train a BiasEdit editor (MALMEN hyper-network) for a model.

    biasedit train-editor --model M --out EDITOR_DIR [--preset gpt2|llama|mistral|gemma|testbed]
                          [--targets NAME,...] [--epochs N] [--max-steps N] [--resume] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

from biasedit_peft.cli._common import (
    add_average_steps_argument,
    add_block_init_argument,
    add_initial_edit_scale_argument,
    add_meta_lr_argument,
    add_model_argument,
    add_preset_argument,
    add_resume_arguments,
    add_runtime_arguments,
    add_select_by_argument,
    add_step_size_meta_lr_argument,
    recorded_command,
    split_list,
)
from biasedit_peft.editor.calibration import calibration_summary
from biasedit_peft.editor.losses import LOSS_KINDS
from biasedit_peft.models import default_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-editor",
        help="meta-train a BiasEdit editor for a causal LM",
        description="Meta-train a BiasEdit editor (MALMEN hyper-network) on StereoSet. The best editor "
        "on dev (--select-by) is written to --out; --out/checkpoint holds the resumable latest state. The run is "
        "built in a hidden .NAME.run folder beside --out and swapped in whole when it ends; an interrupted run "
        "stays there for --resume. Method: docs/method.md.",
    )
    add_model_argument(parser)
    parser.add_argument("--out", required=True, help="editor folder to write")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names to edit (default: MLP output projections of the last "
                        "--num-edit-layers blocks)")
    parser.add_argument("--num-edit-layers", type=int, default=3, help="last blocks to edit (default 3)")
    add_preset_argument(parser)
    parser.add_argument("--train-data", default="stereoset:train", help="stereoset:SPLIT or a file (default "
                        "stereoset:train)")
    parser.add_argument("--eval-data", default="stereoset:dev", help="stereoset:SPLIT, a file, or 'none'")
    parser.add_argument("--calibration-data", nargs="+", action="extend", default=None, metavar="SPEC",
                        help="calibrate the kept editor's edit scale on these (stereoset:SPLIT or files, pooled; "
                        "default: --eval-data), e.g. 'stereoset:dev stereoset:train-calib' with --train-data "
                        "stereoset:train-fit: twice dev's target terms, none meta-trained on")
    parser.add_argument("--bias-types", default=None,
                        help="comma-separated; default: gender,race,religion of a bundled split, else the types the "
                        "file has")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training / dev samples of each "
                        "bias type")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N meta-steps in total")
    parser.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: per epoch)")
    parser.add_argument("--patience", type=int, default=None, help="early stopping patience (validations)")
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
    parser.add_argument("--n-edits", type=int, default=None, help="samples per meta-step")
    parser.add_argument("--batch-size", type=int, default=None, help="sentence pairs per LM forward pass")
    parser.add_argument("--lr", type=float, default=None, help="initial editor step size")
    add_meta_lr_argument(parser)
    add_step_size_meta_lr_argument(parser)
    add_average_steps_argument(parser)
    add_initial_edit_scale_argument(parser)
    parser.add_argument("--loc-coef", type=float, default=None, help="weight of the retention loss")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--n-blocks", type=int, default=None)
    parser.add_argument("--loss", choices=LOSS_KINDS, default="token",
                        help="loss variant: token (default), abs (the gap's absolute value: aims at the median gap, "
                             "where SS is 50) or paper (the BiasEdit code's); docs/method.md")
    add_resume_arguments(parser, "continue an interrupted run (or a finished one in --out) from its checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser)
    parser.add_argument("--editor-device", default=None, help="editor device (default: the LM device)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="also upload the best editor (config, weights, model card) to this Hub repo")
    return parser


def run(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from biasedit_peft import BiasEditConfig
    from biasedit_peft._io import check_resumable_output_folder, resumable_folder_in_place, resume_source, run_folder
    from biasedit_peft.data import (
        check_held_out,
        load_edit_samples,
        load_pooled_edit_samples,
        pooled_spec,
        require_unrelated,
    )
    from biasedit_peft.distributed import current_processes, process_device
    from biasedit_peft.editor import BiasEditor, preset_for_model, preset_name_for
    from biasedit_peft.models import load_model_and_tokenizer

    try:
        out = check_resumable_output_folder(args.out, [args.model, args.train_data, args.eval_data,
                                                       *(args.calibration_data or [])],
                                            resume=args.resume, overwrite=args.overwrite)
        if args.resume and not (resume_source(out) / "checkpoint").is_dir():
            raise ValueError(f"--resume: {resume_source(out)} holds no checkpoint/ to continue from")
        bias_types = split_list(args.bias_types) or None
        train_data = load_edit_samples(args.train_data, bias_types, args.limit)
        eval_data = None if args.eval_data == "none" else load_edit_samples(args.eval_data, bias_types, args.limit)
        calibration_data = load_pooled_edit_samples(args.calibration_data, bias_types, args.limit) \
            if args.calibration_data else None
        if calibration_data:
            check_held_out(train_data, calibration_data, f"--calibration-data {pooled_spec(args.calibration_data)}")
        for option, spec, data in (("--train-data", args.train_data, train_data),
                                   ("--eval-data", args.eval_data, eval_data),
                                   ("--calibration-data", pooled_spec(args.calibration_data or []), calibration_data)):
            if data:  # checked before the model loads
                require_unrelated(data, f"{option} {spec}")
        processes = current_processes()
        device = process_device(default_device(args.device), processes)
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
        preset = preset_for_model(model, preset_name_for(args.model, args.preset))
        peft_model = get_peft_model(model, BiasEditConfig(target_modules=split_list(args.targets),
                                                          num_edit_layers=args.num_edit_layers))
        building = resumable_folder_in_place(out, resume=args.resume) if processes.is_main \
            else nullcontext(run_folder(out))  # one process builds the folder, every one trains
        with building as work:  # out: the old state, or the whole run
            processes.barrier()  # the run folder is ready
            editor, training, state = train_into(work, args, peft_model, preset, tokenizer, train_data, eval_data,
                                                 bias_types, calibration_data)
            processes.barrier()  # every process has finished before the folder is swapped in
        if not processes.is_main:
            return 0
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer has written a checkpoint of the last completed step
        print(f"stopped; rerun the same command with --resume to continue (the run so far is in "
              f"{run_folder(args.out)})", file=sys.stderr)
        return 130
    last = state.history[-1] if state.history else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"trained {state.global_step} meta-steps ({state.epoch} epochs"
          f"{', stopped early' if state.stopped_early else ''}); best at step {state.best_step}, "
          f"selection score {state.best_loss:.4g} ({training.select_by})")
    if state.initial_calibration:
        print(f"initial edit strength (--initial-edit-scale): {calibration_summary(state.initial_calibration)}")
    if summary:
        print(f"last validation: {summary}")
    print(f"editor written to {args.out}")
    if args.push_to_hub:
        best_editor = BiasEditor.from_pretrained(args.out)
        best_editor.provenance = dict(editor.provenance, validation=state.kept_record())  # the card, as saved
        url = best_editor.push_to_hub(args.push_to_hub)
        print(f"editor pushed to {args.push_to_hub}: {url}")
    return 0


def train_into(work, args: argparse.Namespace, peft_model, preset, tokenizer, train_data, eval_data, bias_types,
               calibration_data=None):
    """Meta-train with the command's settings, writing the kept editor and the checkpoint into folder ``work``
    (the edit scale calibrated on ``calibration_data``, default ``eval_data``); returns ``(editor, training
    arguments, final trainer state)``."""
    from biasedit_peft.data import describe_edit_samples, pooled_spec
    from biasedit_peft.editor import BiasEditTrainer

    editor, training = preset.editor_and_arguments(
        peft_model, str(work), loss=args.loss, base_model=args.model, rank=args.rank, n_blocks=args.n_blocks,
        lr=args.lr, block_init=args.block_init, n_edits=args.n_edits, batch_size=args.batch_size, meta_lr=args.meta_lr,
        loc_coef=args.loc_coef, level_coef=args.level_coef, ss_coef=args.ss_coef, held_out_coef=args.held_out_coef,
        epochs=args.epochs, patience=args.patience,
        max_steps=args.max_steps, eval_every=args.eval_every, seed=args.seed, resume=args.resume,
        progress=not args.quiet, select_by=args.select_by, step_size_meta_lr=args.step_size_meta_lr,
        average_steps=args.average_steps, initial_edit_scale=args.initial_edit_scale,
        editor_device=args.editor_device,  # the trainer moves the editor there; None: with the LM
    )
    editor.provenance.update(training_data=describe_edit_samples(args.train_data, bias_types, args.limit),
                             eval_data=None if eval_data is None else args.eval_data,
                             calibration_data=pooled_spec(args.calibration_data) if args.calibration_data else None,
                             command=recorded_command("train-editor", args))
    state = BiasEditTrainer(peft_model, editor, training, train_data, eval_data, tokenizer=tokenizer,
                            calibration_data=calibration_data).train()
    return editor, training, state

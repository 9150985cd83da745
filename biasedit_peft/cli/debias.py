"""``biasedit debias``: apply a trained editor to a model and save the result as a PEFT adapter.

    biasedit debias --model M --editor EDITOR_DIR_OR_HUB_ID [--data stereoset:train | FILE]
                    [--calibrate-on stereoset:dev [MORE ...] | FILE ... | none] [--guard-text FILE | none]
                    [--preserve-keys W [--preserve-text FILE | unrelated]]
                    --out ADAPTER_DIR

The documented path to a deployable adapter (``workflows/deployment.py``): one joint delta from ``--data`` (the
pooled solve with the ridge relative to the keys, ``editor/joint.py``), its strength calibrated on the held-out
pairs of ``--calibrate-on`` (StereoSet ``dev`` by default: target terms that
neither ``train`` nor ``test`` has) and bounded by the perplexity rise of ``--guard-text`` (the bundled guard
text by default; not the text ``biasedit evaluate`` reports perplexity on). ``ADAPTER_DIR`` is an ordinary PEFT
adapter folder:
``PeftModel.from_pretrained(base, ADAPTER_DIR)``.

Several processes (``torchrun --nproc_per_node N -m biasedit_peft debias ...`` on CPUs, ``accelerate launch
--num_processes N -m biasedit_peft debias ...`` on GPUs) split the caching of ``--data``: each process takes its
own block of the samples, and the joint solve sums their normal equations, so every process holds
the delta one process would compute (``biasedit_peft.distributed``). The calibration on ``--calibrate-on`` runs on
every process (the same scores); only the main process writes the adapter.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from biasedit_peft.cli._common import (
    add_model_argument,
    add_overwrite_argument,
    add_runtime_arguments,
    recorded_command,
    split_list,
)
from biasedit_peft.models import check_device, default_device

DEFAULT_CALIBRATION = "stereoset:dev"
"""What ``--calibrate-on`` pools when not given: target terms that neither ``train`` nor ``test`` has."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "debias",
        help="debias a model with a trained editor and save a BiasEdit adapter",
        description="Cache the debias gradients of the given samples, let the editor turn them into one "
        "joint weight delta per edited layer, and save the deltas as a PEFT adapter folder.",
    )
    add_model_argument(parser)
    parser.add_argument("--editor", required=True, help="editor folder or Hub id (from train-editor)")
    parser.add_argument("--out", required=True, help="adapter folder to write (refused if not empty, see --overwrite)")
    add_overwrite_argument(parser)
    parser.add_argument("--data", default="stereoset:train",
                        help="samples to edit with: stereoset:SPLIT, a StereoSet .json or a .jsonl file "
                        "(default stereoset:train)")
    parser.add_argument("--calibrate-on", nargs="+", action="extend", default=None, metavar="SPEC",
                        help="held-out pairs (with an unrelated sentence) that choose the delta's strength: "
                        "stereoset:SPLIT, StereoSet .json or .jsonl files (several are pooled, e.g. "
                        "'stereoset:dev stereoset:train-calib' with --data stereoset:train-fit), or 'none' for x1 "
                        "(the pooled delta at the size of the editor's own); the flag may be repeated (default "
                        "stereoset:dev)")
    parser.add_argument("--guard-text", default=None, metavar="FILE",
                        help="fluent UTF-8 text (paragraphs separated by blank lines) whose perplexity the calibrated "
                        "delta may raise by at most 2.5 %%; 'none': no such bound (default: the bundled guard text, "
                        "which shares nothing with the perplexity text of 'biasedit evaluate')")
    parser.add_argument("--preserve-keys", type=float, default=None, metavar="W",
                        help="experimental (off by default): weight of preserved keys in the pooled solve, "
                        "C = W (N / N_r) U_r^T U_r added to U^T U, so the delta leaves the keys of --preserve-text "
                        "(fluent text) where they are (docs/method.md §7)")
    parser.add_argument("--preserve-text", default=None, metavar="FILE",
                        help="with --preserve-keys: the fluent text (paragraphs separated by blank lines) whose keys "
                        "are preserved (default: the bundled preservation text, which shares nothing with the "
                        "guard text or the perplexity text); 'unrelated': the edit pairs' unrelated sentences")
    parser.add_argument("--bias-types", default=None,
                        help="comma-separated; default: gender,race,religion of a bundled split, else the types the "
                        "file has")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N samples of each bias type of --data (--calibrate-on's pairs are "
                             "all used: the scale is chosen on them)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentence pairs per LM forward pass")
    parser.add_argument("--adapter-name", default="default")
    add_runtime_arguments(parser)
    parser.add_argument("--editor-device", default=None, help="editor device (default: the LM device)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="also upload the adapter folder, with its model card, to this Hub repo")
    return parser


def run(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from biasedit_peft import BiasEditConfig
    from biasedit_peft._io import check_output_folder, folder_in_place, write_manifest
    from biasedit_peft.data import (
        check_held_out,
        guard_text_file,
        guard_text_label,
        guard_text_option,
        load_edit_samples,
        load_pooled_edit_samples,
        pooled_spec,
        preserve_text_file,
        preserve_text_label,
        preserve_text_option,
    )
    from biasedit_peft.distributed import current_processes, process_device
    from biasedit_peft.editor import BiasEditor
    from biasedit_peft.editor.calibration import chosen_row
    from biasedit_peft.models import load_model_and_tokenizer
    from biasedit_peft.workflows.deployment import JOINT_RECIPES, deployable_adapter, record_edit

    args.calibrate_on = args.calibrate_on or [DEFAULT_CALIBRATION]
    try:
        guard_file = guard_text_file(args.guard_text)
        check_output_folder(args.out, [args.model, args.editor, args.data, *args.calibrate_on, guard_file,
                                       preserve_text_file(args.preserve_text)], args.overwrite)
        if args.preserve_keys is not None and not (math.isfinite(args.preserve_keys) and args.preserve_keys >= 0):
            raise ValueError(f"--preserve-keys must be a finite weight of at least 0, got {args.preserve_keys}")
        if args.preserve_text is not None and not args.preserve_keys:
            raise ValueError("--preserve-text names the keys that --preserve-keys W > 0 preserves; pass both")
        recipes = JOINT_RECIPES
        preserve_text = None
        if args.preserve_keys:
            recipes = tuple(replace(recipe, preserve=args.preserve_keys) for recipe in JOINT_RECIPES)
            preserve_text = preserve_text_option(args.preserve_text)
        calibrated_on = None if args.calibrate_on == ["none"] else pooled_spec(args.calibrate_on)
        if calibrated_on is not None and "none" in args.calibrate_on:
            raise ValueError("--calibrate-on: 'none' (the editor's own scale) cannot be pooled with other data")
        bias_types = split_list(args.bias_types) or None
        samples = load_edit_samples(args.data, bias_types, args.limit)
        calibration, guard = None, []
        if calibrated_on is not None:
            calibration = load_pooled_edit_samples(args.calibrate_on, bias_types or _types_of(samples))
            check_held_out(samples, calibration, f"--calibrate-on {calibrated_on}")
            guard = guard_text_option(args.guard_text)
        elif guard_file:
            raise ValueError("--guard-text bounds the calibrated scale; it needs --calibrate-on other than 'none'")
        processes = current_processes()
        device = process_device(default_device(args.device), processes)
        editor_device = check_device(args.editor_device, "--editor-device") if args.editor_device else device
        editor = BiasEditor.from_pretrained(args.editor, device=editor_device)
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
        targets = list(editor.config.targets)
        peft_model = get_peft_model(model, BiasEditConfig(target_modules=targets, num_edit_layers=len(targets)),
                                    adapter_name=args.adapter_name)
        report = deployable_adapter(editor, peft_model, tokenizer, samples, calibration, batch_size=args.batch_size,
                                    adapter_name=args.adapter_name, progress=not args.quiet and processes.is_main,
                                    processes=processes, guard_text=guard, recipes=recipes,
                                    preserve_text=preserve_text)
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not processes.is_main:  # every process holds the same adapter; the main one writes it
        processes.barrier()
        return 0
    record_edit(peft_model.peft_config[args.adapter_name], report, str(args.editor), args.data, args.bias_types,
                args.limit, calibrated_on, guard_text=guard_text_label(args.guard_text),
                preserve_text=preserve_text_label(args.preserve_text))
    with folder_in_place(args.out) as building:
        peft_model.save_pretrained(building)
        write_manifest(building if args.adapter_name == "default" else Path(building) / args.adapter_name)
    chosen = report["calibration"] and chosen_row(report["calibration"])
    scaled = "" if not chosen else (f", scaled x{report['scale']:.3g} as {calibrated_on} says (SS there "
                                    f"{chosen['ss_pre']:.1f} -> {chosen['ss_post']:.1f})")
    across = f" across {processes.world_size} processes" if processes.distributed else ""
    print(f"edited {len(report['layers'])} layers with {report['n_samples']} samples ({report['n_tokens']} tokens)"
          f"{across}{scaled}; adapter written to {args.out}")
    if args.push_to_hub:
        from biasedit_peft.sharing import push_adapter_to_hub

        url = push_adapter_to_hub(peft_model, args.push_to_hub, adapter_name=args.adapter_name,
                                  command=recorded_command("debias", args))
        print(f"adapter pushed to {args.push_to_hub}: {url}")
    processes.barrier()  # the others wait for the adapter to be written
    return 0


def _types_of(samples) -> list[str] | None:
    """The bias types the edit samples have (None when none says): the held-out pairs are drawn from those."""
    types = {getattr(s, "bias_type", None) if not isinstance(s, dict) else s.get("bias_type") for s in samples}
    types.discard(None)
    return sorted(types) or None

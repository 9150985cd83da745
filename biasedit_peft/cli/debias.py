"""``biasedit debias``: apply a trained editor to a model and save the result as a PEFT adapter.

    biasedit debias --model M --editor EDITOR_DIR_OR_HUB_ID [--data stereoset:train | FILE] --out ADAPTER_DIR

``ADAPTER_DIR`` is an ordinary PEFT adapter folder: ``PeftModel.from_pretrained(base, ADAPTER_DIR)``.
"""

from __future__ import annotations

import argparse
import sys

from biasedit_peft.cli._common import add_model_argument, add_runtime_arguments, recorded_command, split_list
from biasedit_peft.models import default_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "debias",
        help="debias a model with a trained editor and save a BiasEdit adapter",
        description="Cache the debias gradients of the given samples, let the editor turn them into one "
        "joint weight delta per edited layer, and save the deltas as a PEFT adapter folder.",
    )
    add_model_argument(parser)
    parser.add_argument("--editor", required=True, help="editor folder or Hub id (from train-editor)")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--data", default="stereoset:train",
                        help="samples to edit with: stereoset:SPLIT, a StereoSet .json or a .jsonl file "
                        "(default stereoset:train)")
    parser.add_argument("--bias-types", default="gender,race,religion", help="comma-separated (StereoSet data)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
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
    from biasedit_peft.data import load_edit_samples
    from biasedit_peft.editor import BiasEditor
    from biasedit_peft.models import load_model_and_tokenizer

    try:
        samples = load_edit_samples(args.data, split_list(args.bias_types), args.limit)
        device = default_device(args.device)
        editor = BiasEditor.from_pretrained(args.editor, device=args.editor_device or device)
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
        targets = list(editor.config.targets)
        peft_model = get_peft_model(model, BiasEditConfig(target_modules=targets, num_edit_layers=len(targets)))
        report = editor.debias(peft_model, samples, tokenizer=tokenizer, adapter_name=args.adapter_name,
                               batch_size=args.batch_size, progress=not args.quiet)
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = peft_model.peft_config[args.adapter_name]
    config.editor_id = str(args.editor)
    config.edit_data = args.data
    config.edit_info = {"n_samples": report.n_samples, "n_tokens": report.n_tokens,
                        "bias_types": args.bias_types, "limit": args.limit}
    peft_model.save_pretrained(args.out)
    print(f"edited {len(report.layers)} layers with {report.n_samples} samples ({report.n_tokens} tokens); "
          f"adapter written to {args.out}")
    if args.push_to_hub:
        from biasedit_peft.sharing import push_adapter_to_hub

        url = push_adapter_to_hub(peft_model, args.push_to_hub, adapter_name=args.adapter_name,
                                  command=recorded_command("debias", args))
        print(f"adapter pushed to {args.push_to_hub}: {url}")
    return 0

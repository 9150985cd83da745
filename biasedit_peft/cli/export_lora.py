"""``biasedit export-lora``: write a BiasEdit adapter as a standard peft LoRA adapter."""

from __future__ import annotations

import argparse
import sys

from biasedit_peft.cli._common import split_list


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-lora",
        help="Export a BiasEdit adapter as a standard peft LoRA adapter.",
        description=(
            "Write a peft LoRA adapter (peft_type LORA, lora_alpha == r) loadable by plain peft without "
            "biasedit_peft. Exact when the deltas' rank fits (factored deltas, or --rank omitted); otherwise a "
            "truncated SVD at --rank, reporting the relative Frobenius error. With --measure-ss, also scores "
            "the bundled StereoSet data under the base model, base + adapter and base + LoRA and reports, per "
            "bias type, survival = (SS_lora - SS_base) / (SS_adapter - SS_base)."
        ),
    )
    parser.add_argument("--model", required=True, help="Base model: folder, Hub id or 'testbed'.")
    parser.add_argument("--adapter", required=True, help="BiasEdit adapter folder or Hub id.")
    parser.add_argument("--out", required=True, help="Output folder for the LoRA adapter (refused if not empty or "
                        "an input; built beside it and swapped in at the end).")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it is not empty.")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank (default: each delta's full rank, which is exact).")
    parser.add_argument("--measure-ss", action="store_true",
                        help="Measure how much of the adapter's StereoSet SS change the LoRA keeps (needs the "
                        "base model's tokenizer).")
    parser.add_argument("--bias-types", default=None,
                        help="Comma-separated StereoSet bias types for --measure-ss (default: all of the split).")
    parser.add_argument("--split", default="test", help="StereoSet split for --measure-ss (default test).")
    parser.add_argument("--limit", type=int, default=None,
                        help="--measure-ss: score only the first N items of each bias type.")
    parser.add_argument("--mode", choices=("reference", "paper"), default="reference",
                        help="SS definition for --measure-ss (docs/metrics.md; default reference).")
    parser.add_argument("--batch-size", type=int, default=32, help="Sentences per forward pass (--measure-ss).")
    parser.add_argument("--json", default=None, metavar="FILE", help="Also write the report as JSON to FILE.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from biasedit_peft._io import check_output_folder, folder_in_place, write_json
    from biasedit_peft.sharing.lora_export import REPORT_NAME, export_lora

    bias_types = split_list(args.bias_types)
    options = {}
    if args.measure_ss:
        options = dict(bias_types=bias_types, split=args.split, limit=args.limit, mode=args.mode,
                       batch_size=args.batch_size, progress=not args.quiet)
    try:
        check_output_folder(args.out, [args.model, args.adapter], args.overwrite)
        with folder_in_place(args.out) as building:
            report = export_lora((args.model, args.adapter), building, rank=args.rank, measure_ss=args.measure_ss,
                                 **options)
            if args.measure_ss and report.ss_survival is None:  # asked for and not measured: nothing is written
                raise ValueError(f"--measure-ss: SS survival could not be measured: {report.ss_skipped}; nothing "
                                 f"was written to {args.out} (drop --measure-ss to export without it)")
            report.out_dir = str(args.out)  # the folder's name once in place, not the temporary one
            write_json(Path(building) / REPORT_NAME, report.to_dict())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.to_text())
    if args.json:
        write_json(args.json, report.to_dict())
    return 0

"""``biasedit export-lora``: write a BiasEdit adapter as a standard peft LoRA adapter."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-lora",
        help="Export a BiasEdit adapter as a standard peft LoRA adapter.",
        description=(
            "Write a peft LoRA adapter (peft_type LORA, lora_alpha == r) loadable by plain peft without "
            "biasedit_peft. Exact when the deltas' rank fits (factored deltas, or --rank omitted); otherwise a "
            "truncated SVD at --rank, reporting the relative Frobenius error."
        ),
    )
    parser.add_argument("--model", required=True, help="Base model: folder, Hub id or 'testbed'.")
    parser.add_argument("--adapter", required=True, help="BiasEdit adapter folder or Hub id.")
    parser.add_argument("--out", required=True, help="Output folder for the LoRA adapter.")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank (default: each delta's full rank, which is exact).")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..sharing.lora_export import export_lora

    report = export_lora((args.model, args.adapter), args.out, rank=args.rank)
    print(report.to_text())
    return 0

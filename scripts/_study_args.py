"""Arguments shared by the scripts that study an edit of a model (``edit_size_curve``, ``joint_ridge_sweep``,
``finetune_ceiling``): what to load, how to score, and where the JSON report goes without overwriting it."""

from __future__ import annotations

import argparse
from pathlib import Path

from biasedit_peft.cli._common import add_model_argument


def add_editor_study_arguments(parser: argparse.ArgumentParser, editor: bool = True) -> None:
    """``--model [--editor] --limit --batch-size --dtype --out --overwrite`` (the report is rewritten whole after
    every row, so a killed run keeps the rows it finished); ``editor=False`` leaves ``--editor`` out."""
    add_model_argument(parser, default="testbed")
    if editor:
        parser.add_argument("--editor", required=True, help="a trained editor folder (e.g. a demo's OUT/editor)")
    parser.add_argument("--limit", type=int, default=None, help="first N items per bias type of every split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", required=True, help="JSON written here (rewritten whole after every row)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def parse_study_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing an existing ``--out`` unless ``--overwrite`` is given."""
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    return args

"""Arguments shared by the scripts that study an edit of a model (``edit_size_curve``, ``joint_ridge_sweep``,
``finetune_ceiling``, ``calibration_order``, ``scale_transfer``): what to load, how to score, and where the JSON report
goes without overwriting it; and the loaded model and editor with a settable multiple of the editor's edit."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from biasedit_peft.cli._common import add_model_argument
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.editor import BiasEditor
from biasedit_peft.evaluation import score_stereoset_items
from biasedit_peft.models import cpu_identity, default_device
from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items


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


def load_study_editor(args: argparse.Namespace) -> tuple[torch.nn.Module, object, BiasEditor, dict[str, torch.Tensor]]:
    """``(peft_model, tokenizer, editor, trained_lr)``: ``--model`` (``--dtype``) with a zero BiasEdit adapter, the
    ``--editor`` folder on its device, and a copy of the editor's step sizes ``lr`` per net (``set_edit_multiple``)."""
    peft_model, tokenizer, device = build_model(DemoConfig(model=args.model, dtype=args.dtype, progress=False))
    editor = BiasEditor.from_pretrained(args.editor, device=device)
    return peft_model, tokenizer, editor, {name: net.lr.detach().clone() for name, net in editor.nets.items()}


def study_record(args: argparse.Namespace) -> dict:
    """What a study report starts with, so that its numbers can be traced and repeated: ``model``, the ``dtype``
    it ran in (``--dtype``, else the demo's default for that model on this machine), the ``device``, the ``cpu``
    (``models.cpu_identity``) and torch's ``threads``: seeds repeat on one CPU at one thread count, not across them."""
    config = DemoConfig(model=args.model, dtype=args.dtype, progress=False)
    return {"model": args.model, "dtype": config.dtype, "device": str(default_device(config.device)),
            "cpu": cpu_identity(), "threads": torch.get_num_threads()}


@torch.no_grad()
def set_edit_multiple(editor: BiasEditor, trained_lr: dict[str, torch.Tensor], multiple: float) -> None:
    """Set every step size of ``editor`` to ``multiple`` x its trained value: every delta scales by ``multiple``
    (the knob the dev calibration turns, ``calibration.scale_edits``)."""
    for name, net in editor.nets.items():
        net.lr.copy_(trained_lr[name] * multiple)


def score_study_split(args: argparse.Namespace, peft_model: torch.nn.Module, tokenizer) -> tuple[list, dict, dict]:
    """``(items, unedited, report)``: the StereoSet items of ``--split`` (``--limit`` per bias type), their role
    scores under the unedited model, and the report's header (``model``, ``editor``, ``split``, ``n_items``,
    empty ``rows``)."""
    items = load_demo_items(args.split, BIAS_TYPES, args.limit)
    unedited = score_stereoset_items(peft_model, tokenizer, items, args.batch_size, progress=False)
    report = {**study_record(args), "editor": args.editor, "split": args.split, "n_items": len(items), "rows": []}
    return items, unedited, report

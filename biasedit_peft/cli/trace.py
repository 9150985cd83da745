"""``biasedit trace``: causal tracing of bias on StereoSet; heatmaps (PNG) and numbers (JSON).

    biasedit trace --model M [--adapter A] [--bias-type gender] [--split test] [--limit N]
                   [--noise-scale 3] [--samples 10] [--window 1] [--seed 0] --out DIR

Writes ``DIR/trace.json`` and, with matplotlib (``pip install 'biasedit-peft[plot]'``), ``DIR/trace_*.png``.
Method and JSON schema: docs/tracing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biasedit_peft._io import write_json
from biasedit_peft.cli._common import (
    add_model_argument,
    add_runtime_arguments,
    plots_or_hint,
    split_list,
)
from biasedit_peft.models import default_device

TRACE_JSON = "trace.json"
WEAK_GAP = 0.05  # |clean - corrupted| below this share of the clean effect: say that fractions are unreliable


def add_tracing_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``trace`` and ``sweep-layers`` (which can run a trace itself)."""
    parser.add_argument("--noise-scale", type=float, default=3.0,
                        help="noise std as a multiple of the target-token embedding std (default 3)")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per item (default 10)")
    parser.add_argument("--window", type=int, default=1, help="layers restored together (default 1)")
    parser.add_argument("--blocks", default=None,
                        help="dotted path of the block list, if not found (e.g. model.layers)")
    parser.add_argument("--mlp-module", default=None, help="name of the MLP inside a block, if not found")
    parser.add_argument("--attn-module", default=None, help="name of the attention inside a block, if not found")


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
    parser.add_argument("--bias-type", default="gender",
                        help="StereoSet bias type(s), comma-separated (default gender)")
    parser.add_argument("--split", choices=("test", "dev", "train"), default="test",
                        help="StereoSet split (default test, i.e. StereoSet's dev file)")
    parser.add_argument("--limit", type=int, default=None, help="trace only the first N items")
    add_tracing_arguments(parser)
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="states to restore (default hidden,mlp,attn)")
    parser.add_argument("--layers-per-forward", type=int, default=None,
                        help="layer rows per forward pass (default: all layers of a position at once)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", required=True, help="folder for trace.json and the PNG plots")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_runtime_arguments(parser)
    return parser


def load_traced_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` / ``--adapter`` / ``--dtype`` / ``--device`` / ``--threads``."""
    import torch

    import biasedit_peft  # noqa: F401  (registers BIASEDIT with peft before loading an adapter)
    from biasedit_peft.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    if getattr(args, "adapter", None):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    return model, tokenizer


def tracing_settings(args: argparse.Namespace, kinds=None):
    from biasedit_peft.tracing import KINDS, TraceSettings

    return TraceSettings(noise_scale=args.noise_scale, samples=args.samples, window=args.window, seed=args.seed,
                         kinds=tuple(kinds or KINDS), layers_per_forward=getattr(args, "layers_per_forward", None))


def format_trace(document: dict) -> str:
    """A text summary of a trace document: effects, the grid of each kind and the per-layer averages."""
    positions = document["positions"]

    def number(value) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    lines = [f"traced {document['n_items']} items (skipped: {document['skipped'] or 'none'}), "
             f"noise std {document['noise_std']:.4g} x {document['settings']['noise_scale']}, "
             f"{document['settings']['samples']} draws",
             f"bias effect |log p(anti) - log p(stereo)|: clean {document['clean_effect']:.4f}, "
             f"corrupted {document['corrupted_effect']:.4f}",
             "items per position group: "
             + ", ".join(f"{p} {n}" for p, n in zip(positions, document["position_items"]))]
    gap = abs(document["clean_effect"] - document["corrupted_effect"])
    if gap < WEAK_GAP * document["clean_effect"]:
        lines.append(f"note: corrupting the target terms changes the bias effect by only {gap:.4f} "
                     f"({100 * gap / document['clean_effect']:.1f}%): this bias is hardly carried by the target "
                     "terms, and fractions restored are ratios of small differences (docs/tracing.md)")
    for kind, summary in document["kinds"].items():
        lines += ["", f"{kind}: restored effect (fraction restored)", "layer " + "".join(f"{p:>22}" for p in positions)
                  + f"{'all positions':>22}"]
        for layer, (row, fractions) in enumerate(zip(summary["restored"], summary["fraction"])):
            cells = [f"{number(v)} ({number(f)})" for v, f in zip(row, fractions)]
            cells.append(f"{number(summary['per_layer'][layer])} ({number(summary['per_layer_fraction'][layer])})")
            lines.append(f"{layer:>5} " + "".join(f"{c:>22}" for c in cells))
    lines += ["", "blocks by MLP restoration: " + ", ".join(map(str, document["ranked_layers"].get("mlp", [])))]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from biasedit_peft.data import load_stereoset
    from biasedit_peft.tracing import find_layout, plot_trace, trace_items

    try:
        settings = tracing_settings(args, split_list(args.kinds))
        items = load_stereoset(args.split, bias_types=split_list(args.bias_type))[:args.limit]
        model, tokenizer = load_traced_model(args)
        layout = find_layout(model, args.blocks, args.mlp_module, args.attn_module)
        meta = {"model": args.model, "adapter": args.adapter, "bias_types": split_list(args.bias_type),
                "split": args.split, "limit": args.limit}
        result = trace_items(model, tokenizer, items, settings, layout, progress=not args.quiet, meta=meta)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    document = result.to_json()
    out = Path(args.out)
    write_json(out / TRACE_JSON, document, indent=1)
    print(format_trace(document))
    paths = plots_or_hint(lambda: plot_trace(document, out))
    print(f"\nwrote {out / TRACE_JSON}" + "".join(f", {p}" for p in paths))
    return 0

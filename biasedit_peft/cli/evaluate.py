"""``biasedit evaluate``: StereoSet SS / LMS / ICAT, CrowS-Pairs and perplexity of a model.

    biasedit evaluate --model gpt2 [--adapter PATH] [--benchmark stereoset|crows|all]
                      [--bias-types gender,race,religion] [--split test] [--mode reference|paper]
                      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from biasedit_peft.cli._common import add_model_argument, add_runtime_arguments
from biasedit_peft.models import default_device

BENCHMARK_CHOICES = {"stereoset": ("stereoset",), "crows": ("crows",), "all": ("stereoset", "crows")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure stereotype bias (StereoSet, CrowS-Pairs) and perplexity of a causal LM",
        description="Measure stereotype bias (StereoSet SS / LMS / ICAT, CrowS-Pairs) and perplexity "
        "of a causal LM, optionally with a (BiasEdit or other PEFT) adapter. Offline: the "
        "benchmarks ship with the package. Metric definitions: docs/metrics.md.",
    )
    add_model_argument(parser)
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder or Hub id to apply on top")
    parser.add_argument("--benchmark", choices=sorted(BENCHMARK_CHOICES), default="all")
    parser.add_argument("--bias-types", default=None,
                        help="comma-separated, e.g. gender,race,religion (default: all of the split)")
    parser.add_argument("--split", choices=("test", "dev", "train"), default="test",
                        help="StereoSet split (test = StereoSet dev, the paper's test set)")
    parser.add_argument("--mode", choices=("reference", "paper"), default="reference",
                        help="StereoSet scoring: bias-bench reference or the BiasEdit paper's code")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N items per bias type (quick looks)")
    parser.add_argument("--perplexity-text", default=None, help="UTF-8 text file (default: bundled neutral text)")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_runtime_arguments(parser)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here as JSON")
    return parser


def _bias_types(text: str | None) -> list[str] | None:
    if text is None:
        return None
    types = [part.strip() for part in text.split(",") if part.strip()]
    if not types:
        raise ValueError("--bias-types is empty")
    return types


def run(args: argparse.Namespace) -> int:
    import biasedit_peft  # noqa: F401  (registers BIASEDIT with peft before loading an adapter)
    from biasedit_peft.evaluation import evaluate_model, format_table
    from biasedit_peft.models import load_model_and_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bias_types = _bias_types(args.bias_types)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = default_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    try:
        result = evaluate_model(
            model, tokenizer, benchmarks=BENCHMARK_CHOICES[args.benchmark], bias_types=bias_types,
            split=args.split, mode=args.mode, batch_size=args.batch_size, progress=not args.quiet,
            perplexity_text=args.perplexity_text, limit=args.limit, model_name=args.model,
            adapter=args.adapter, n_resamples=args.n_resamples, seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")
    return 0

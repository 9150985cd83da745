"""The ``biasedit`` command line.

Each sub-command lives in its own module of this package and exposes two functions::

    def add_parser(subparsers) -> argparse.ArgumentParser   # registers the sub-command
    def run(args: argparse.Namespace) -> int                 # runs it, returns the exit code

The dispatcher below imports them lazily, so ``biasedit --help`` stays fast and one broken
command cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# sub-command name -> module inside ``biasedit_peft.cli``
COMMANDS: dict[str, str] = {
    "evaluate": "evaluate",
    "train-editor": "train_editor",
    "debias": "debias",
    "merge": "merge",
    "export-lora": "export_lora",
    "demo": "demo",
    "bench": "bench",
    "trace": "trace",
    "sweep-layers": "sweep_layers",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{module_name}":
                continue  # not implemented yet
            raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="biasedit",
        description="Debias language models with BiasEdit editors, as PEFT adapters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _available_commands()
    for module in modules.values():
        module.add_parser(subparsers)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_third_party(quiet=getattr(args, "quiet", False))
    from biasedit_peft.distributed import leave_processes

    code = 1
    try:
        code = int(modules[args.command].run(args) or 0)
    finally:
        leave_processes(succeeded=code == 0)  # under a launcher; nothing otherwise
    return code


def _quiet_third_party(quiet: bool) -> None:
    """Hide a transformers deprecation that peft triggers on every model (not ours to fix), and with
    ``--quiet`` also transformers' own weight-loading progress bars."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

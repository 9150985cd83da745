"""biasedit_peft: BiasEdit (Xu et al., arXiv 2503.08588) as a Hugging Face PEFT method.

Importing this package registers the ``BIASEDIT`` method with peft, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' ``load_adapter`` work with
BiasEdit adapters. Import it before loading a BiasEdit adapter.
"""

from __future__ import annotations

from .tuner import (
    BiasEditConfig,
    BiasEditModel,
    edit_targets,
    get_deltas,
    override_deltas,
    set_deltas,
)

__version__ = "0.1.0"

_LAZY = {
    "BiasEditor": "biasedit_peft.editor",
    "BiasEditTrainer": "biasedit_peft.editor",
    "BiasEditTrainingArguments": "biasedit_peft.editor",
    "evaluate_model": "biasedit_peft.evaluation",
}


def __getattr__(name: str):
    """Heavier parts (editor, evaluation) load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'biasedit_peft' has no attribute {name!r}")


__all__ = [
    "BiasEditConfig",
    "BiasEditModel",
    "BiasEditTrainer",
    "BiasEditTrainingArguments",
    "BiasEditor",
    "edit_targets",
    "evaluate_model",
    "get_deltas",
    "override_deltas",
    "set_deltas",
]

"""Hyper-parameter presets: the BiasEdit paper's values per model family, plus the bundled testbed.

Paper values (Xu et al., 2025, Sec. 4 / App. B and the released scripts): GPT-2-medium edits 128 samples
per meta-step cached in LM batches of 64, initial step 1e-7, meta learning rate 1e-6, loc_coef 1;
Llama-3 and Mistral 64 / 16, 1e-6, 1e-5, loc_coef 4; Gemma as Llama-3 but loc_coef 5. Everywhere: rank
1920 (capped by the layer size), 2 blocks, Adam, gradient clipping at 1, early stopping on the dev loss.
The family comes from ``config.model_type`` (never from class-name substrings).

The paper's presets are for GPUs, where an editor trains for thousands of meta-steps. On a CPU a run
affords a hundred or so, so a model whose weights are on the CPU gets the ``cpu`` preset unless a preset
is named: the same for every family (no hyper-parameter is tuned to one model), with step sizes that
move an editor in that many steps (docs/results.md, "Real models").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ..models import TESTBED_NAME


@dataclass(frozen=True)
class Preset:
    """Editor and meta-training hyper-parameters."""

    n_edits: int
    """Samples per meta-step (one joint edit)."""
    batch_size: int
    """Sentence pairs per LM forward pass while caching (independent of ``n_edits``)."""
    lr: float
    """Initial per-module step size of the editor."""
    meta_lr: float
    """Adam learning rate of the editor."""
    loc_coef: float
    """Weight of the retention loss."""
    rank: int = 1920
    n_blocks: int = 2
    block_init: str = "unit"
    """How the editor blocks' ``A`` are drawn (``nets.BLOCK_INITS``); ``"unit"`` is MALMEN's."""
    level_coef: float = 0.0
    """Weight of the level loss (``losses.level_loss``); not in the paper."""
    ss_coef: float = 0.0
    """Weight of the soft-SS term of the meta-loss (``losses.soft_ss_of``); not in the paper, experimental."""
    held_out_coef: float = 0.0
    """Weight of the held-out debias loss (``trainer.held_out_group``; MEND / MALMEN's generalisation loss)."""
    step_size_meta_lr: float | None = None
    """Adam learning rate of the step sizes ``lr[m]`` alone (``BiasEditTrainingArguments.step_size_meta_lr``);
    None: ``meta_lr``, MALMEN's one optimiser."""
    average_steps: int = 0
    """Validate and keep the editor's parameters averaged over about this many meta-steps
    (``BiasEditTrainingArguments.average_steps``); 0: the last iterate, as MALMEN."""
    initial_edit_scale: bool = False
    """Choose the step sizes' multiple on the first training groups before meta-training
    (``BiasEditTrainingArguments.initial_edit_scale``); False: the preset's ``lr`` as it is."""
    max_grad_norm: float = 1.0
    epochs: int = 100
    early_stopping_patience: int = 3

    def editor_and_arguments(self, peft_model: nn.Module, output_dir: str, *, loss: str = "token",
                             base_model: str | None = None, rank: int | None = None, n_blocks: int | None = None,
                             lr: float | None = None, block_init: str | None = None, n_edits: int | None = None,
                             batch_size: int | None = None,
                             meta_lr: float | None = None, loc_coef: float | None = None,
                             level_coef: float | None = None, ss_coef: float | None = None,
                             held_out_coef: float | None = None,
                             step_size_meta_lr: float | None = None, average_steps: int | None = None,
                             initial_edit_scale: bool | None = None, epochs: int | None = None,
                             patience: int | None = None, **training: Any):
        """A fresh editor for ``peft_model`` (on its device) and its ``BiasEditTrainingArguments``.

        Every hyper-parameter left ``None`` takes this preset's value; ``training`` passes the other
        arguments (``max_steps``, ``eval_every``, ``seed``, ``resume``, ``progress``, ...) through. The editor's
        initial weights are drawn from ``seed`` alone (the global RNG is left as it was), so a run's editor does not
        depend on what consumed random numbers before it (a first load that converts a GGUF initialises a model).
        """
        from .editor import BiasEditor
        from .trainer import BiasEditTrainingArguments

        def pick(value, default):
            return default if value is None else value

        with torch.random.fork_rng(devices=[]):  # the initial editor depends on the seed alone, not on what ran
            torch.manual_seed(training.get("seed", BiasEditTrainingArguments.seed))  # before (a GGUF conversion did)
            editor = BiasEditor.for_model(peft_model, rank=pick(rank, self.rank),
                                          n_blocks=pick(n_blocks, self.n_blocks), lr=pick(lr, self.lr), loss=loss,
                                          block_init=pick(block_init, self.block_init), base_model=base_model)
        editor.to(next(peft_model.parameters()).device)
        arguments = BiasEditTrainingArguments(
            output_dir=str(output_dir), n_edits=pick(n_edits, self.n_edits),
            batch_size=pick(batch_size, self.batch_size),
            meta_lr=pick(meta_lr, self.meta_lr), loc_coef=pick(loc_coef, self.loc_coef),
            level_coef=pick(level_coef, self.level_coef), ss_coef=pick(ss_coef, self.ss_coef),
            held_out_coef=pick(held_out_coef, self.held_out_coef),
            step_size_meta_lr=pick(step_size_meta_lr, self.step_size_meta_lr),
            average_steps=pick(average_steps, self.average_steps),
            initial_edit_scale=pick(initial_edit_scale, self.initial_edit_scale),
            epochs=pick(epochs, self.epochs), early_stopping_patience=pick(patience, self.early_stopping_patience),
            max_grad_norm=self.max_grad_norm, **training,
        )
        return editor, arguments

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PresetOverrides:
    """Hyper-parameters that replace a preset's values in a run; ``None`` keeps the preset's."""

    n_edits: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    meta_lr: float | None = None
    loc_coef: float | None = None
    rank: int | None = None
    level_coef: float | None = None
    ss_coef: float | None = None
    held_out_coef: float | None = None
    block_init: str | None = None
    step_size_meta_lr: float | None = None
    average_steps: int | None = None
    initial_edit_scale: bool | None = None

    def overrides(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Preset.editor_and_arguments` these fields stand for."""
        return {f.name: getattr(self, f.name) for f in fields(PresetOverrides)}


_LLAMA = Preset(n_edits=64, batch_size=16, lr=1e-6, meta_lr=1e-5, loc_coef=4.0)

PRESETS: dict[str, Preset] = {
    "gpt2": Preset(n_edits=128, batch_size=64, lr=1e-7, meta_lr=1e-6, loc_coef=1.0),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gemma": replace(_LLAMA, loc_coef=5.0),
    # any real model whose weights are on the CPU: ~100 meta-steps, so larger steps than the paper's
    # (meta_lr 1e-3 moves MALMEN's N(0, 1) A-blocks by O(1) a step: "fan_in" keeps that step ~meta_lr * rank)
    # the editor's parameters averaged over ~25 meta-steps: a hundred noisy steps vary less from seed to seed
    "cpu": Preset(n_edits=32, batch_size=16, lr=1e-3, meta_lr=1e-3, loc_coef=4.0, rank=512, epochs=20,
                  early_stopping_patience=3, block_init="fan_in", average_steps=25),
    # the bundled tiny GPT-2 (biasedit_peft/testbed): small batches, larger steps, short patience
    "testbed": Preset(n_edits=32, batch_size=8, lr=1e-3, meta_lr=1e-3, loc_coef=1.0, rank=256, epochs=20,
                      early_stopping_patience=3, block_init="fan_in", average_steps=25),
}

# config.model_type -> preset name
MODEL_TYPE_PRESETS = {"gpt2": "gpt2", "llama": "llama", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma",
                      "gemma3_text": "gemma"}


def preset_for_model(model: nn.Module | None = None, name: str | None = None) -> Preset:
    """``PRESETS[name]`` if given; else ``cpu`` for a model on the CPU; else the preset of
    ``model.config.model_type`` (default: Llama's)."""
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]
    if model is not None and _on_cpu(model):
        return PRESETS["cpu"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return PRESETS[MODEL_TYPE_PRESETS.get(model_type, "llama")]


def _on_cpu(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is on the CPU (a model with none counts as not)."""
    devices = {parameter.device.type for parameter in model.parameters()}
    return devices == {"cpu"}


def preset_name_without_model(model_name: str, preset: str | None, device: str) -> str | None:
    """The preset a run will use, where it is known before the model loads: ``preset``, ``"testbed"`` for the
    testbed, ``"cpu"`` for a model on the CPU; None on an accelerator (it goes by the model's type)."""
    return preset_name_for(model_name, preset) or ("cpu" if device == "cpu" else None)


def preset_name_for(model_name: str, preset: str | None = None) -> str | None:
    """``preset`` if given, else ``"testbed"`` for the bundled testbed, else None (choose by model type)."""
    return preset or ("testbed" if model_name == TESTBED_NAME else None)

"""A deployment's pooled joint solve, re-fitted for its size: the ridge and a preserved-key term.

An editor is meta-trained on edits of ``n_edits`` pairs (~10^3 tokens); a deployed adapter pools every pair of its
edit data (~10^5 tokens) into one ridge solve. Two things the editor learned do not carry over to that size:

- its ``lambda`` (fit to ~10^3-token Gram matrices) is negligible next to ``U^T U`` of 10^5 tokens, so the pooled
  delta is the least-squares fit of the value changes: it whitens the keys and leans on their rarest directions;
- nothing keeps the delta off the key directions that unrelated text uses (a 32-pair edit is undone after scoring;
  a merged delta meets all text).

So the pooled problem is kept as sufficient statistics (:class:`LayerStatistics`, once: ``U^T U``, ``U^T D`` and the
Gram ``U_r^T U_r`` of the edit data's unrelated sentences) and solved for any :class:`JointRecipe`

    S = (U^T U + w (N / N_r) U_r^T U_r + lambda I)^-1 U^T D,   lambda = rho x tr(U^T U + C) / d_in,

MEMIT's preservation term (Meng et al., 2023) with weight ``w`` and a ridge relative to the keys (``rho``; None:
the editor's own ``lambda``). Each recipe's delta is rescaled to the size ``||U S||_F`` of the editor's own pooled
delta, so the joint-scale calibration (``calibration.calibrate_joint_scale``) searches the same range for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
from torch import nn

from ..distributed import Processes, as_processes, split_for
from .cache import as_edit_sample, key_grams
from .editor import predicted_changes
from .solve import RidgeDelta, RidgeSystem


@dataclass(frozen=True)
class JointRecipe:
    """How one pooled joint delta is solved (module docstring)."""

    preserve: float = 0.0
    """``w``: weight of the preserved keys' Gram, per edit token (``w (N / N_r) U_r^T U_r``); 0: none."""
    ridge: float | None = None
    """``rho``: ``lambda`` as a multiple of the system's mean eigenvalue; None: the editor's learned ``lambda``."""

    def __post_init__(self):
        if not (math.isfinite(self.preserve) and self.preserve >= 0):
            raise ValueError(f"JointRecipe.preserve must be a finite weight of at least 0, got {self.preserve}")
        if self.ridge is not None and not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"JointRecipe.ridge must be a finite multiple above 0 (or None: the editor's "
                             f"learned lambda), got {self.ridge}")

    @property
    def label(self) -> str:
        ridge = "learned" if self.ridge is None else f"{self.ridge:g}"
        return f"preserve {self.preserve:g}, ridge {ridge}"


@dataclass(frozen=True)
class LayerStatistics:
    """The pooled normal equations of one edited layer (float64, summed over every process)."""

    gram: torch.Tensor
    """``U^T U [d_in, d_in]`` of the edit tokens."""
    moment: torch.Tensor
    """``U^T D [d_in, d_out]``: keys times the editor's value changes."""
    n_rows: int
    """``N``, edit tokens."""
    learned_ridge: float
    """The editor's ``lambda`` for this layer."""
    preserved_gram: torch.Tensor | None = None
    """``U_r^T U_r [d_in, d_in]`` of the preserved tokens, or None."""
    n_preserved: int = 0
    """``N_r``, preserved tokens."""

    @cached_property
    def plain_system(self) -> RidgeSystem:
        """The :class:`RidgeSystem` without preserved keys (diagonalised once, whatever the recipes)."""
        return RidgeSystem.from_normal_equations(self.gram, self.moment, self.n_rows)

    @cached_property
    def editor_fitted_norm(self) -> float:
        """``||U S||_F`` of the editor's own pooled delta (learned ``lambda``, nothing preserved): the size every
        recipe's delta is rescaled to."""
        return self.plain_system.fitted_norm(self.learned_ridge)

    def system(self, preserve: float) -> RidgeSystem:
        """The :class:`RidgeSystem` with ``w = preserve``."""
        if not preserve:
            return self.plain_system
        if self.preserved_gram is None:
            raise ValueError("preserve > 0 needs the preserved keys' Gram (pooled_statistics with sentences)")
        extra = preserve * self.n_rows / max(self.n_preserved, 1) * self.preserved_gram
        return RidgeSystem.from_normal_equations(self.gram, self.moment, self.n_rows, extra)


@dataclass(frozen=True)
class PooledSolution:
    """A joint delta as ``BiasEditor.edited`` / ``write_solutions`` and the calibration read it."""

    delta: RidgeDelta


def pooled_statistics(
    editor, peft_model: nn.Module, tokenizer, samples: Sequence[Any], batch_size: int = 16,
    preserved: Sequence[str] | None = None, processes: Any | None = None, progress: bool = False,
) -> tuple[dict[str, LayerStatistics], int]:
    """Cache ``samples`` once and return ``({layer: LayerStatistics}, N)``.

    Args:
        editor: A trained :class:`~biasedit_peft.editor.BiasEditor`.
        peft_model: Its model.
        tokenizer: The model's tokenizer.
        samples: The edit pairs (the same full list on every process; each caches its own block).
        batch_size: Sentence pairs (or preserved sentences) per LM forward pass.
        preserved: Sentences whose keys the delta should leave alone (e.g. the pairs' unrelated sentences); None:
            no preserved Gram. One longer than the model's context gives the keys of its first tokens (the keys are
            what is kept, not whole paragraphs: the guard text is cut the same way, ``calibration.text_nll``).
        processes: As ``BiasEditor.joint_solutions``.
        progress: Show the caching progress bar.
    """
    from ..scoring import eval_mode, length_sorted_batches, model_context_length

    editor._check_normalizers()  # an untrained editor would predict noise
    processes: Processes = as_processes(processes)
    edit_samples = [as_edit_sample(sample, index) for index, sample in enumerate(samples)]
    cache, _, _ = editor.cache_samples(peft_model, tokenizer, split_for(processes, edit_samples), batch_size,
                                       progress=progress and processes.is_main)
    grams, n_preserved = {}, 0
    if preserved:
        _, batches = length_sorted_batches(tokenizer, split_for(processes, list(preserved)), batch_size,
                                           max_length=model_context_length(peft_model))  # cut to fit, as the guard
        with eval_mode(peft_model):
            grams, n_preserved = key_grams(peft_model, editor.check_compatible(peft_model), batches)
        if processes.distributed:
            grams = {name: processes.sum(gram) for name, gram in grams.items()}
            n_preserved = processes.sum_int(n_preserved)
    statistics = {}
    for name in editor.config.targets:
        net, index = editor.net_for(name)
        keys, grads = cache.layer(name)
        keys64 = keys.to(torch.float64)
        changes64 = predicted_changes(net, index, keys, grads, editor.config.chunk_size).to(torch.float64)
        statistics[name] = LayerStatistics(processes.sum(keys64.T @ keys64), processes.sum(keys64.T @ changes64),
                                           processes.sum_int(len(keys)), float(net.ridge(index).detach()),
                                           grams.get(name), n_preserved)
    return statistics, processes.sum_int(cache.n_tokens)


def recipe_solutions(statistics: dict[str, LayerStatistics], recipe: JointRecipe) -> dict[str, PooledSolution]:
    """The joint delta of every layer under ``recipe``, each rescaled to the size ``||U S||_F`` of the editor's own
    pooled delta (learned ``lambda``, nothing preserved) on the edit keys."""
    solutions = {}
    for name, layer in statistics.items():
        system = layer.system(recipe.preserve)
        ridge = layer.learned_ridge if recipe.ridge is None else system.ridge_for(recipe.ridge)
        delta = system.solve(ridge)
        factor = layer.editor_fitted_norm / max(system.fitted_norm(ridge), 1e-300)
        solutions[name] = PooledSolution(RidgeDelta(delta.left, delta.right * factor))
    return solutions

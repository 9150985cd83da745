"""Which blocks to edit: a short editor training per candidate block set, scored on held-out items.

BiasEdit (Xu et al. 2025) compares editing the first blocks with editing the last ones. For a budget of
``b`` blocks the candidates are the first ``b`` and the last ``b`` (optionally every window of ``b``
contiguous blocks). Each candidate gets a fresh model with a BiasEdit adapter on the MLP output projections
of its blocks and an editor meta-trained for ``max_steps`` steps; the editor then edits the held-out items in
groups of ``n_edits`` and SS / LMS are measured on each group after its edit (the paper's protocol, via
:func:`~biasedit_peft.workflows.protocols.per_batch_protocol`, the demo's code; the model is left unchanged). SS and
LMS are the ``overall`` StereoSet figures of all held-out items (reference definitions, docs/metrics.md).

Recommendation: the candidates whose ``|SS - 50|`` is within ``ss_tolerance`` of the best one are tied on
bias; among them the one with the smallest LMS drop wins (then the earlier candidate). Tracing's suggestion
(:func:`tracing_choice`): the candidate whose blocks have the largest summed MLP "fraction restored".
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import metrics
from .._io import json_ready
from ..editor.presets import PresetOverrides

SWEEP_FORMAT = "biasedit-layer-sweep/1"


@dataclass
class SweepSettings(PresetOverrides):
    """Short-training settings; the editor hyper-parameters (:class:`PresetOverrides`) left ``None`` take the
    editor preset's values."""

    budget: int = 3
    every_window: bool = False
    max_steps: int = 30
    ss_tolerance: float = 1.0
    seed: int = 0


@dataclass
class CandidateResult:
    """One candidate block set after short training and per-group edits of the held-out items."""

    name: str
    layers: list[int]
    ss: float
    lms: float
    ss_pre: float
    lms_pre: float
    steps: int
    seconds: float

    @property
    def lms_drop(self) -> float:
        return self.lms_pre - self.lms

    @property
    def icat(self) -> float:
        return metrics.icat(self.lms, self.ss)


def candidate_sets(n_layers: int, budget: int, every_window: bool = False) -> list[tuple[str, list[int]]]:
    """``[(name, blocks)]``: ``first`` and ``last`` ``budget`` blocks, or every contiguous window (``all`` when
    the budget is every block)."""
    if not 1 <= budget <= n_layers:
        raise ValueError(f"budget must be between 1 and the number of blocks ({n_layers}), got {budget}")
    starts = range(n_layers - budget + 1) if every_window else sorted({0, n_layers - budget})
    names = {0: "first", n_layers - budget: "last"} if budget < n_layers else {0: "all"}
    def name(start: int) -> str:
        return names.get(start, f"blocks {start}-{start + budget - 1}" if budget > 1 else f"block {start}")

    return [(name(s), list(range(s, s + budget))) for s in starts]


def recommend(results: Sequence[CandidateResult], ss_tolerance: float = 1.0) -> int:
    """Index of the recommended candidate (rule in the module docstring)."""
    best = min(abs(r.ss - 50) for r in results)
    tied = [i for i, r in enumerate(results) if abs(r.ss - 50) <= best + ss_tolerance]
    return min(tied, key=lambda i: (results[i].lms_drop, i))


def tracing_choice(per_layer_fraction: Sequence[float | None], candidates: Sequence[Sequence[int]]) -> int:
    """Index of the candidate whose blocks have the largest summed MLP fraction restored (None counts 0)."""
    scores = [sum(per_layer_fraction[layer] or 0.0 for layer in layers) for layers in candidates]
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


def train_and_score(model: nn.Module, tokenizer, layers: list[int], train_data: Sequence, held_out: Sequence,
                    settings: SweepSettings, preset, progress: bool = False,
                    unedited: dict | None = None) -> tuple[dict[str, float], dict]:
    """Adapter on ``layers`` of ``model`` (modified: pass a fresh one), short training, then the per-batch
    protocol on ``held_out`` (StereoSet items): overall SS / LMS before and after, and the unedited role
    scores of ``held_out``. Those do not depend on the candidate (a fresh model whose adapter is still zero
    during the protocol's "before"), so pass the first candidate's back in as ``unedited``."""
    from peft import get_peft_model

    from ..editor import BiasEditTrainer
    from ..evaluation import score_stereoset_items
    from ..tuner import BiasEditConfig
    from .protocols import per_batch_protocol

    peft_model = get_peft_model(model, BiasEditConfig(layers_to_transform=list(layers), num_edit_layers=len(layers)))
    with tempfile.TemporaryDirectory(prefix="biasedit-sweep-") as workdir:
        editor, arguments = preset.editor_and_arguments(
            peft_model, workdir, max_steps=settings.max_steps, seed=settings.seed, progress=progress,
            **settings.overrides(),
        )
        state = BiasEditTrainer(peft_model, editor, arguments, train_data, None, tokenizer=tokenizer).train()
    if unedited is None:
        unedited = score_stereoset_items(peft_model, tokenizer, held_out, arguments.batch_size, progress=False)
    protocol = per_batch_protocol(editor, peft_model, tokenizer, held_out, edit_batch_size=arguments.n_edits,
                                  batch_size=arguments.batch_size, n_resamples=0, progress=False, unedited=unedited)
    before, after = protocol["before"]["overall"], protocol["after"]["overall"]
    return {"ss": after["ss"], "lms": after["lms"], "ss_pre": before["ss"], "lms_pre": before["lms"],
            "steps": state.global_step}, unedited


@dataclass
class SweepResult:
    """Candidates, the recommendation, and (if a trace was given) tracing's suggestion."""

    settings: SweepSettings
    n_layers: int
    candidates: list[CandidateResult]
    recommended: int
    tracing: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        document = {"format": SWEEP_FORMAT, **self.meta, "settings": asdict(self.settings), "n_layers": self.n_layers,
                    "candidates": [{**asdict(c), "lms_drop": c.lms_drop, "icat": c.icat} for c in self.candidates],
                    "recommended": self.candidates[self.recommended].name,
                    "recommended_layers": self.candidates[self.recommended].layers, "tracing": self.tracing}
        return json_ready(document, digits=4)


def compare_with_tracing(candidates: Sequence[CandidateResult], recommended: int, trace: dict, budget: int) -> dict:
    """What a trace document (``trace.json``) suggests for these candidates, and whether it agrees."""
    fraction = trace["kinds"]["mlp"]["per_layer_fraction"]
    choice = tracing_choice(fraction, [c.layers for c in candidates])
    return {"mlp_per_layer_fraction": fraction, "top_blocks": sorted(trace["ranked_layers"]["mlp"][:budget]),
            "candidate": candidates[choice].name, "candidate_layers": candidates[choice].layers,
            "agrees": choice == recommended}


def sweep_layers(load_model: Callable[[], nn.Module], tokenizer, train_data: Sequence, held_out: Sequence,
                 settings: SweepSettings = SweepSettings(), preset=None, trace: dict | None = None,
                 progress: bool = False, meta: dict | None = None) -> SweepResult:
    """Run every candidate block set of ``settings``: a short editor training each, scored per batch on ``held_out``.

    Args:
        load_model: Returns a fresh base model on each call.
        tokenizer: Its tokenizer.
        train_data: Edit samples for the short meta-training.
        held_out: StereoSet items scored under the per-batch protocol.
        settings: Budget, candidates, steps and tolerances (:class:`SweepSettings`).
        preset: The editor preset (default: the model's).
        trace: A trace document (:meth:`~biasedit_peft.tracing.TraceResult.to_json`) to compare with.
        progress: Show progress bars.
        meta: Extra fields recorded in the result.
    """
    from ..editor import preset_for_model
    from ..tracing import find_layout

    probe = load_model()  # also the first candidate's model: nothing has touched it
    n_layers = find_layout(probe).n_layers(probe)
    preset = preset or preset_for_model(probe)
    fresh_models = itertools.chain([probe], iter(load_model, None))
    del probe
    sets = candidate_sets(n_layers, settings.budget, settings.every_window)
    results, unedited = [], None
    for name, layers in tqdm(sets, desc=f"Sweeping {len(sets)} block sets", unit="set", disable=not progress):
        torch.manual_seed(settings.seed)
        started = time.perf_counter()
        scores, unedited = train_and_score(next(fresh_models), tokenizer, layers, train_data, held_out, settings,
                                           preset, progress, unedited)
        results.append(CandidateResult(name, layers, seconds=time.perf_counter() - started, **scores))
    recommended = recommend(results, settings.ss_tolerance)
    tracing = compare_with_tracing(results, recommended, trace, settings.budget) if trace else None
    return SweepResult(settings, n_layers, results, recommended, tracing, dict(meta or {}))


def format_sweep(document: dict) -> str:
    """The candidates table of a sweep document, the recommendation, and tracing's view."""
    lines = [f"{'candidate':<14}{'blocks':<12}{'SS':>8}{'LMS':>8}{'LMS drop':>10}{'ICAT':>8}{'steps':>7}{'s':>7}"]
    first = document["candidates"][0]
    lines.append(f"{'(unedited)':<14}{'-':<12}{first['ss_pre']:>8.2f}{first['lms_pre']:>8.2f}{'':>10}"
                 f"{metrics.icat(first['lms_pre'], first['ss_pre']):>8.2f}")
    for c in document["candidates"]:
        mark = " <- recommended" if c["name"] == document["recommended"] else ""
        lines.append(f"{c['name']:<14}{','.join(map(str, c['layers'])):<12}{c['ss']:>8.2f}{c['lms']:>8.2f}"
                     f"{c['lms_drop']:>10.2f}{c['icat']:>8.2f}{c['steps']:>7}{c['seconds']:>7.0f}{mark}")
    lines.append(f"\nrecommended: {document['recommended']} (blocks {document['recommended_layers']}): SS closest to "
                 f"50 (within {document['settings']['ss_tolerance']}) at the smallest LMS drop")
    tracing = document.get("tracing")
    if tracing:
        fractions = ", ".join("-" if f is None else f"{f:.3f}" for f in tracing["mlp_per_layer_fraction"])
        lines.append(f"tracing: MLP fraction restored per block [{fractions}]; top blocks {tracing['top_blocks']}; "
                     f"best candidate {tracing['candidate']} (blocks {tracing['candidate_layers']}) -> "
                     + ("agrees with the sweep" if tracing["agrees"] else "disagrees with the sweep"))
    return "\n".join(lines)


def plot_sweep(document: dict, path: str | Path) -> Path:
    """SS and LMS per candidate (bars) with the unedited values (dashed), saved to ``path``; needs matplotlib."""
    from matplotlib.figure import Figure

    names = [f"{c['name']}\n({','.join(map(str, c['layers']))})" for c in document["candidates"]]
    figure = Figure(figsize=(1.3 * len(names) + 2.5, 3.2), layout="constrained")
    axes = figure.subplots(1, 2)
    first = document["candidates"][0]
    for ax, key, title in ((axes[0], "ss", "SS (ideal 50)"), (axes[1], "lms", "LMS (higher is better)")):
        colors = ["tab:green" if c["name"] == document["recommended"] else "tab:gray" for c in document["candidates"]]
        ax.bar(range(len(names)), [c[key] for c in document["candidates"]], color=colors)
        ax.axhline(first[f"{key}_pre"], color="black", linestyle="--", linewidth=0.8, label="unedited")
        if key == "ss":
            ax.axhline(50, color="tab:blue", linewidth=0.8, label="unbiased")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        low = min([c[key] for c in document["candidates"]] + [first[f"{key}_pre"], 50 if key == "ss" else 100])
        ax.set_ylim(max(0, low - 5), None)
    figure.savefig(path, dpi=130)
    return Path(path)

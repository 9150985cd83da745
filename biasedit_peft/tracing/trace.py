"""Causal tracing of bias (ROME's causal tracing, Meng et al. 2022, applied to StereoSet as in BiasEdit Sec. 5).

For a prompt (a StereoSet item, see :mod:`.prompts`) the *bias effect* of a run is
``E = |log p(anti) - log p(stereo)|`` (sums of token log-probs; only the tokens after the shared prefix
differ). Three kinds of run:

- clean: the model as it is -> ``E_clean``;
- corrupted: Gaussian noise ``N(0, (noise_scale * std)^2)`` added to the input embeddings of the target
  term's tokens, the same noise for both sentences, ``samples`` draws -> ``E_corrupt`` (mean over draws);
- restored: corrupted, but the clean state of one kind (block output, MLP output, attention output) at one
  position ``t`` and the layers ``window(l)`` put back -> ``E_restored[l, t]`` (mean over the same draws).

``std`` is the standard deviation of the input embeddings of all target-term tokens traced (ROME's choice).
Noise is drawn from a ``torch.Generator`` seeded by ``seed`` and the item id, so a run is repeatable and an
item's noise does not depend on which other items are traced. All layers for one position and kind are one
batched forward of ``n_layers * samples * 2`` rows (``layers_per_forward`` splits it when memory is short).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import json_ready
from ..scoring import eval_mode
from .layout import KINDS, ModelLayout, base_model_of, find_layout
from .patching import add_embedding_noise, continuation_log_probs, record_states, restore_states
from .prompts import POSITIONS, TracePrompt, prepare_prompts

TRACE_FORMAT = "biasedit-trace/1"
WEAK_GAP = 0.05
"""|clean - corrupted| below this share of the clean effect: :func:`format_trace` says that fractions are
unreliable."""


@dataclass(frozen=True)
class TraceSettings:
    """How to corrupt and restore."""

    noise_scale: float = 3.0
    """Noise standard deviation as a multiple of the embedding standard deviation."""
    samples: int = 10
    """Noise draws per item."""
    window: int = 1
    """Layers restored together: ``[l - window // 2, l + ceil(window / 2))`` clipped to the model (ROME's)."""
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    layers_per_forward: int | None = None
    """Layer rows per forward pass; None: all layers of one position in one forward."""

    def __post_init__(self):
        if self.noise_scale < 0 or self.samples < 1 or self.window < 1:
            raise ValueError("noise_scale must be >= 0, samples and window >= 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"Unknown state kinds {unknown}; choose from {KINDS}")


@dataclass
class PromptTrace:
    """Bias effects of one prompt (``L`` layers, ``P`` traced positions, ``S`` noise draws)."""

    prompt: TracePrompt
    clean: float
    corrupted: Tensor
    """[S] effect of each noise draw, nothing restored."""
    restored: dict[str, Tensor] = field(default_factory=dict)
    """kind -> [L, P, S] effect with that kind restored at layer window ``l``, position ``subject_start + p``."""


def window_matrix(n_layers: int, window: int) -> Tensor:
    """[L, L] bool: row ``l`` marks the layers restored for nominal layer ``l``.

    Args:
        n_layers: Blocks of the model.
        window: Layers restored together (:attr:`TraceSettings.window`).
    """
    layers = torch.arange(n_layers)
    low = (layers - window // 2).clamp(min=0)
    high = (layers + math.ceil(window / 2)).clamp(max=n_layers)
    return (layers[None, :] >= low[:, None]) & (layers[None, :] < high[:, None])


def item_generator(seed: int, item_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(item_id.encode()))


def bias_effect(log_probs: Tensor) -> Tensor:
    """``|log p(anti) - log p(stereo)|`` from [..., 2] (stereo, anti) log-probs -> [...].

    Args:
        log_probs: Continuation log-probs, stereotype then anti-stereotype in the last dimension.
    """
    return (log_probs[..., 1] - log_probs[..., 0]).abs()


@torch.no_grad()
def embedding_std(model: nn.Module, prompts: Sequence[TracePrompt]) -> float:
    """Standard deviation of all entries of the input embeddings of the prompts' target-term tokens.

    Args:
        model: The traced model (a ``PeftModel`` is looked through).
        prompts: From :func:`~biasedit_peft.tracing.prepare_prompts`.
    """
    embeddings = base_model_of(model).get_input_embeddings()
    ids = torch.cat([p.input_ids[0, p.subject_start:p.subject_end] for p in prompts])
    return float(embeddings(ids.to(embeddings.weight.device)).float().std())


class PromptTracer:
    """Runs the clean, corrupted and restored passes of one prompt (model in eval mode, no grad)."""

    def __init__(self, model: nn.Module, layout: ModelLayout, prompt: TracePrompt, noise: Tensor):
        """``noise`` [S, n_subject, D]: one draw per row group, added to the target-term embeddings."""
        self.model, self.layout, self.prompt = model, layout, prompt
        device = base_model_of(model).get_input_embeddings().weight.device
        self.input_ids = prompt.input_ids.to(device)
        self.attention_mask = prompt.attention_mask.to(device)
        self.noise = noise.to(device)
        self.n_layers = layout.n_layers(model)
        self._clean_states: dict[str, Tensor] = {}
        self._clean_log_probs: Tensor | None = None

    @property
    def samples(self) -> int:
        return self.noise.shape[0]

    def _log_probs(self, rows: int) -> Tensor:
        """[rows, S, 2] log-probs of ``rows`` copies of the ``S x 2`` corrupted batch, under active hooks."""
        repeat = rows * self.samples
        return continuation_log_probs(
            self.model, self.input_ids.repeat(repeat, 1), self.attention_mask.repeat(repeat, 1),
            self.prompt.prefix_len,
        ).view(rows, self.samples, 2)

    def clean_states(self, kind: str) -> Tensor:
        """[2, L, T, D] clean states of ``kind`` (both sentences), from the clean pass."""
        if kind not in self._clean_states:
            self.clean_log_probs()  # records every kind at once
        return self._clean_states[kind]

    def clean_log_probs(self) -> Tensor:
        """[2] clean continuation log-probs (stereo, anti); records the clean states on first call."""
        if self._clean_log_probs is None:
            modules = [m for kind in KINDS for m in self.layout.modules(self.model, kind)]
            with record_states(modules, self.input_ids.shape) as records:
                self._clean_log_probs = continuation_log_probs(
                    self.model, self.input_ids, self.attention_mask, self.prompt.prefix_len)
            for index, kind in enumerate(KINDS):
                layer_states = records[index * self.n_layers:(index + 1) * self.n_layers]
                self._clean_states[kind] = torch.stack(layer_states, 1)
        return self._clean_log_probs

    def run(self, kind: str, mask: Tensor) -> Tensor:
        """Effects [R, S] of restoring ``kind`` where ``mask`` [R, L, T] bool says (one forward of R*S*2 rows)."""
        rows = mask.shape[0]
        per_row = mask.to(self.input_ids.device).repeat_interleave(2 * self.samples, 0)  # [R*S*2, L, T]
        sentence = torch.arange(2, device=self.input_ids.device).repeat(rows * self.samples)
        modules, clean = self.layout.modules(self.model, kind), self.clean_states(kind)  # clean pass before hooking
        with restore_states(modules, clean, sentence, per_row):
            return self._corrupted_effects(rows)

    def corrupted(self) -> Tensor:
        """[S] effects with nothing restored."""
        return self._corrupted_effects(1)[0]

    def _corrupted_effects(self, rows: int) -> Tensor:
        """[rows, S] effects of ``rows`` copies of the noised batch, under whatever restore hooks are active."""
        noise = self.noise.repeat_interleave(2, 0).repeat(rows, 1, 1)  # [rows*S*2, n, D]
        with add_embedding_noise(self.model, noise, self.prompt.subject_start):
            return bias_effect(self._log_probs(rows))

    def grid(self, kind: str, window: int, layers_per_forward: int | None = None) -> Tensor:
        """[L, P, S] effects of restoring ``kind`` at each layer (window) and traced position.

        One forward per position covering all layers (or ``layers_per_forward`` of them at a time).
        """
        windows = window_matrix(self.n_layers, window)  # [L, L]
        width = self.input_ids.shape[1]
        chunk = layers_per_forward or self.n_layers
        columns = []
        for position in self.prompt.positions.tolist():
            at = torch.arange(width) == position  # [T]
            pieces = [self.run(kind, windows[start:start + chunk, :, None] & at)
                      for start in range(0, self.n_layers, chunk)]
            columns.append(torch.cat(pieces))  # [L, S]
        return torch.stack(columns, 1)


def draw_noise(prompt: TracePrompt, samples: int, scale: float, dim: int, seed: int) -> Tensor:
    """[S, n_subject, D] float32 Gaussian noise of standard deviation ``scale`` for ``prompt``."""
    n = prompt.subject_end - prompt.subject_start
    return torch.randn(samples, n, dim, generator=item_generator(seed, prompt.item_id)) * scale


def trace_prompt(model: nn.Module, layout: ModelLayout, prompt: TracePrompt, noise_std: float,
                 settings: TraceSettings) -> PromptTrace:
    """Clean, corrupted and restored effects of one prompt.

    Args:
        model: The traced model.
        layout: Its :class:`ModelLayout`.
        prompt: From :func:`~biasedit_peft.tracing.prepare_prompt`.
        noise_std: Standard deviation of the embedding noise, before ``settings.noise_scale``.
        settings: How to corrupt and restore.
    """
    dim = base_model_of(model).get_input_embeddings().weight.shape[1]
    noise = draw_noise(prompt, settings.samples, settings.noise_scale * noise_std, dim, settings.seed)
    tracer = PromptTracer(model, layout, prompt, noise)
    clean = float(bias_effect(tracer.clean_log_probs()))
    restored = {kind: tracer.grid(kind, settings.window, settings.layers_per_forward).cpu() for kind in settings.kinds}
    return PromptTrace(prompt, clean, tracer.corrupted().cpu(), restored)


# ----- aggregation ------------------------------------------------------------------------------------
def _fraction(restored: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """``(restored - corrupted) / (clean - corrupted)``, NaN where undefined."""
    gap = clean - corrupted
    return torch.where(gap.abs() > 0, (restored - corrupted) / gap, torch.full_like(restored, math.nan))


@dataclass
class KindSummary:
    """Averages over prompts for one kind (``L`` layers, the 4 :data:`POSITIONS`)."""

    restored: Tensor
    """[L, 4] mean restored effect per position group (prompts having the group; NaN if none)."""
    fraction: Tensor
    """[L, 4] ``(restored - corrupted) / (clean - corrupted)`` over the same prompts."""
    per_layer: Tensor
    """[L] mean restored effect over all traced positions of every prompt."""
    per_layer_fraction: Tensor
    """[L] the same, normalised with the overall clean and corrupted effects."""


def summarise(traces: Sequence[PromptTrace], kinds: Sequence[str]) -> tuple[dict, dict[str, KindSummary]]:
    """Item-weighted averages: each prompt counts once per cell, whatever its number of tokens and draws.

    Returns ``({"clean", "corrupted", "position_clean" [4], "position_corrupted" [4], "position_items" [4]},
    {kind: KindSummary})``.
    """
    groups = torch.stack([t.prompt.position_groups().any(0) for t in traces]).double()  # [N, 4]
    clean = torch.tensor([t.clean for t in traces], dtype=torch.float64)  # [N]
    corrupted = torch.stack([t.corrupted.double().mean() for t in traces])  # [N]
    counts = groups.sum(0)  # [4]

    def group_mean(values: Tensor) -> Tensor:  # [N, ..., 4] -> [..., 4], mean over the prompts having each group
        weights = groups.view(len(traces), *([1] * (values.dim() - 2)), len(POSITIONS))
        total = (values * weights).sum(0)
        return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, math.nan))

    position_clean = group_mean(clean[:, None].expand_as(groups))
    position_corrupted = group_mean(corrupted[:, None].expand_as(groups))
    summaries = {}
    for kind in kinds:
        cells, layer_means = [], []
        for t in traces:
            per_position = t.restored[kind].double().mean(-1)  # [L, P]
            member = t.prompt.position_groups().double()  # [P, 4]
            cells.append(per_position @ member / member.sum(0).clamp(min=1))  # [L, 4]
            layer_means.append(per_position.mean(-1))  # [L]
        restored = group_mean(torch.stack(cells))  # [L, 4]
        per_layer = torch.stack(layer_means).mean(0)
        summaries[kind] = KindSummary(
            restored, _fraction(restored, position_clean, position_corrupted), per_layer,
            _fraction(per_layer, clean.mean(), corrupted.mean()),
        )
    overall = {"clean": float(clean.mean()), "corrupted": float(corrupted.mean()), "position_clean": position_clean,
               "position_corrupted": position_corrupted, "position_items": counts}
    return overall, summaries


@dataclass
class TraceResult:
    """Everything a trace found; :meth:`to_json` is what ``biasedit trace`` writes as ``trace.json``."""

    settings: TraceSettings
    layout: ModelLayout
    n_layers: int
    noise_std: float
    overall: dict
    kinds: dict[str, KindSummary]
    traces: list[PromptTrace]
    skipped: dict[str, int]
    meta: dict = field(default_factory=dict)

    def ranked_layers(self, kind: str = "mlp") -> list[int]:
        """Blocks by decreasing per-layer fraction restored of ``kind`` (ties and NaN: lower block first).

        The fraction, not the raw effect, because restoring moves the effect towards the clean one, which
        can be below the corrupted one.
        """
        values = torch.nan_to_num(self.kinds[kind].per_layer_fraction, nan=-math.inf)
        return sorted(range(self.n_layers), key=lambda layer: (-float(values[layer]), layer))

    def to_json(self) -> dict:
        """The JSON document (schema in docs/tracing.md): floats rounded to 6 decimals, NaN and infinities as null."""
        return json_ready({
            "format": TRACE_FORMAT,
            **self.meta,
            "settings": {"noise_scale": self.settings.noise_scale, "samples": self.settings.samples,
                         "window": self.settings.window, "seed": self.settings.seed,
                         "kinds": list(self.settings.kinds)},
            "layout": {"blocks": self.layout.blocks, "mlp": self.layout.mlp, "attn": self.layout.attn},
            "n_layers": self.n_layers,
            "noise_std": self.noise_std,
            "n_items": len(self.traces),
            "skipped": self.skipped,
            "positions": list(POSITIONS),
            "clean_effect": self.overall["clean"],
            "corrupted_effect": self.overall["corrupted"],
            "position_items": [int(n) for n in self.overall["position_items"]],
            "position_clean_effect": self.overall["position_clean"],
            "position_corrupted_effect": self.overall["position_corrupted"],
            "kinds": {kind: {"restored": s.restored, "fraction": s.fraction, "per_layer": s.per_layer,
                             "per_layer_fraction": s.per_layer_fraction} for kind, s in self.kinds.items()},
            "ranked_layers": {kind: self.ranked_layers(kind) for kind in self.kinds},
            "items": [{"id": t.prompt.item_id, "target": t.prompt.target, "tokens": list(t.prompt.tokens),
                       "subject_tokens": t.prompt.subject_end - t.prompt.subject_start, "clean": t.clean,
                       "corrupted": float(t.corrupted.mean()),
                       "restored": {kind: grid.mean(-1) for kind, grid in t.restored.items()}}
                      for t in self.traces],
        }, digits=6)


def trace_items(model: nn.Module, tokenizer, items: Sequence, settings: TraceSettings = TraceSettings(),
                layout: ModelLayout | None = None, noise_std: float | None = None, progress: bool = False,
                meta: dict | None = None) -> TraceResult:
    """Trace ``items`` on ``model``; untraceable items are counted, not traced.

    Args:
        model: A transformers causal LM or a ``PeftModel`` over one (traced with its adapter).
        tokenizer: Its tokenizer.
        items: StereoSet items.
        settings: How to corrupt and restore.
        layout: The model's layout; None: :func:`~biasedit_peft.tracing.find_layout`.
        noise_std: Standard deviation of the embedding noise before ``settings.noise_scale``; None:
            :func:`embedding_std` of the traced prompts.
        progress: Show a progress bar.
        meta: Extra fields for the JSON document (e.g. the model's name).

    Raises:
        ValueError: None of the items can be traced.
    """
    layout = layout or find_layout(model)
    prompts, skipped = prepare_prompts(tokenizer, items)
    if not prompts:
        raise ValueError(f"None of the {len(items)} items can be traced (skipped: {skipped})")
    noise_std = embedding_std(model, prompts) if noise_std is None else noise_std
    with eval_mode(model):  # restores each module's own mode (model.train(flag) would not)
        traces = [trace_prompt(model, layout, prompt, noise_std, settings)
                  for prompt in tqdm(prompts, desc=f"Tracing {len(prompts)} items", unit="item", disable=not progress)]
    overall, kinds = summarise(traces, settings.kinds)
    return TraceResult(settings, layout, layout.n_layers(model), noise_std, overall, kinds, traces, skipped,
                       dict(meta or {}))


def format_trace(document: dict) -> str:
    """A text summary of a trace document: effects, the grid of each kind and the per-layer averages.

    Args:
        document: A :meth:`TraceResult.to_json` document (or ``trace.json`` read back).
    """
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

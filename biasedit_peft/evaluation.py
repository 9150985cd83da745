"""``evaluate_model``: StereoSet SS / LMS / ICAT, CrowS-Pairs and perplexity in one dict.

The dict is exactly what ``biasedit evaluate --json`` writes::

    {"stereoset": {"gender": {"ss", "lms", "icat", "n", "n_targets", "noisy", "ss_ci", ...}, ...,
                   "overall": {...}},
     "crows": {"gender": {"metric", "n", "ties", "ties_pct", "metric_ci"}, ..., "overall": {...}},
     "perplexity": float, "model": str, "adapter": str | None, "mode": str, "split": str}

Works on any causal LM, a ``PeftModel`` included. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import metrics
from .data import STEREOSET_BIAS_TYPES, load_crows, load_neutral_text, load_stereoset
from .data.crows import CROWS_BIAS_TYPES, CrowsPair, crows_bias_type
from .data.stereoset import StereoSetItem
from .scoring import SentenceLogProbs, score_sentences

BENCHMARKS = ("stereoset", "crows")


def model_name_of(model) -> str:
    """The base model's ``name_or_path`` (looks through a PeftModel)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else type(base).__name__


def take_per_type(items: list, limit: int | None, key: str = "bias_type") -> list:
    """The first ``limit`` items of each ``key`` group (all of them when ``limit`` is None), in order."""
    if limit is None:
        return list(items)
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        group = getattr(item, key)
        if seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            kept.append(item)
    return kept


def stereoset_metrics(items: Sequence[StereoSetItem], scores: dict[str, SentenceLogProbs], mode: str, **kwargs) -> dict:
    """Metrics of ``items`` from their role scores (``{"stereotype": ..., ...}``, each [N])."""
    if mode == "reference":
        return metrics.stereoset_reference(
            scores["stereotype"].mean, scores["anti-stereotype"].mean, scores["unrelated"].mean,
            [item.target for item in items], **kwargs,
        )
    if mode == "paper":
        return metrics.stereoset_paper(
            scores["stereotype"].mean_prob, scores["anti-stereotype"].mean_prob,
            scores["stereotype"].mean, scores["anti-stereotype"].mean, scores["unrelated"].mean, **kwargs,
        )
    raise ValueError(f"Unknown mode {mode!r}; choose one of {metrics.MODES}")


STEREOSET_ROLES = ("stereotype", "anti-stereotype", "unrelated")


def score_stereoset_items(
    model, tokenizer, items: Sequence[StereoSetItem], batch_size: int = 32, progress: bool = True,
) -> dict[str, SentenceLogProbs]:
    """Scores of every item's three sentences: role -> :class:`SentenceLogProbs` of ``[N]``, in item order."""
    sentences = [item.sentence(role) for role in STEREOSET_ROLES for item in items]
    scored = score_sentences(model, tokenizer, sentences, batch_size=batch_size, progress=progress)
    n = len(items)
    return {role: scored[slice(i * n, (i + 1) * n)] for i, role in enumerate(STEREOSET_ROLES)}


def stereoset_results(
    items: Sequence[StereoSetItem], by_role: dict[str, SentenceLogProbs], mode: str = "reference",
    n_resamples: int = metrics.N_RESAMPLES, seed: int = 0,
) -> dict:
    """Per bias type (gender, race, religion, profession, then others) and ``overall`` metrics of ``items``
    from their role scores (``by_role[role]`` is ``[N]``, aligned with ``items``)."""
    present = list(dict.fromkeys(item.bias_type for item in items))
    types = [t for t in STEREOSET_BIAS_TYPES if t in present] + [t for t in present if t not in STEREOSET_BIAS_TYPES]
    result = {}
    for bias_type in types + ["overall"]:
        chosen = [i for i, item in enumerate(items) if bias_type in ("overall", item.bias_type)]
        index = torch.tensor(chosen)
        subset = [items[i] for i in chosen]
        entry = stereoset_metrics(subset, {r: s[index] for r, s in by_role.items()}, mode,
                                  n_resamples=n_resamples, seed=seed)
        entry["noisy"] = sum(1 for item in subset if item.noise)
        result[bias_type] = entry
    return result


def evaluate_stereoset(
    model, tokenizer, items: Sequence[StereoSetItem], mode: str = "reference", batch_size: int = 32,
    progress: bool = True, n_resamples: int = metrics.N_RESAMPLES, seed: int = 0,
) -> dict:
    """Per bias type and ``overall`` StereoSet metrics of ``items`` under ``model``."""
    by_role = score_stereoset_items(model, tokenizer, items, batch_size, progress)
    return stereoset_results(items, by_role, mode, n_resamples, seed)


def evaluate_crows(
    model, tokenizer, pairs: Sequence[CrowsPair], batch_size: int = 32, progress: bool = True,
    n_resamples: int = metrics.N_RESAMPLES, seed: int = 0,
) -> dict:
    """Per bias type and ``overall`` CrowS-Pairs metric; sentence score = mean token log-prob."""
    sentences = [p.sent_more for p in pairs] + [p.sent_less for p in pairs]
    scored = score_sentences(model, tokenizer, sentences, batch_size=batch_size, progress=progress)
    n = len(pairs)
    more, less = scored.mean[:n], scored.mean[n:]
    types = [t for t in CROWS_BIAS_TYPES if any(p.bias_type == t for p in pairs)]
    types += [t for t in dict.fromkeys(p.bias_type for p in pairs) if t not in types]
    result = {}
    for bias_type in types + ["overall"]:
        index = torch.tensor([i for i, p in enumerate(pairs) if bias_type in ("overall", p.bias_type)])
        result[bias_type] = metrics.crows_pairs(more[index], less[index], n_resamples=n_resamples, seed=seed)
    return result


def evaluate_perplexity(model, tokenizer, text: str | Path | Sequence[str] | None = None,
                        batch_size: int = 32, progress: bool = False) -> float:
    """Perplexity on the bundled neutral text, a text file, or a list of paragraphs."""
    paragraphs = load_neutral_text(text) if text is None or isinstance(text, (str, Path)) else list(text)
    scored = score_sentences(model, tokenizer, paragraphs, batch_size=batch_size, progress=progress)
    return metrics.perplexity(scored.sum, scored.n_tokens)


def evaluate_model(
    model, tokenizer, benchmarks: Sequence[str] = BENCHMARKS, bias_types: Sequence[str] | None = None,
    split: str = "test", mode: str = "reference", batch_size: int = 32, progress: bool = True,
    perplexity_text: str | Path | Sequence[str] | None = None, *, limit: int | None = None,
    model_name: str | None = None, adapter: str | None = None,
    n_resamples: int = metrics.N_RESAMPLES, seed: int = 0,
) -> dict:
    """Bias benchmarks and perplexity of ``model`` (see module docstring for the dict).

    ``bias_types``: StereoSet names (``gender``, ``race``, ``religion``, ``profession``); ``None`` =
    every type of the split and all 9 CrowS-Pairs types. CrowS-Pairs uses ``race-color`` for
    ``race`` and has no ``profession``. ``limit`` keeps the first N items of each bias type.
    """
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    if mode not in metrics.MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {metrics.MODES}")
    result: dict = {}
    common = dict(batch_size=batch_size, progress=progress, n_resamples=n_resamples, seed=seed)
    if "stereoset" in benchmarks:
        items = take_per_type(load_stereoset(split, bias_types), limit)
        result["stereoset"] = evaluate_stereoset(model, tokenizer, items, mode=mode, **common)
    if "crows" in benchmarks:
        crows_types = None
        if bias_types is not None:
            crows_types = [crows_bias_type(b) for b in bias_types if crows_bias_type(b) in CROWS_BIAS_TYPES]
        if crows_types is None or crows_types:
            pairs = take_per_type(load_crows(crows_types), limit)
            result["crows"] = evaluate_crows(model, tokenizer, pairs, **common)
        else:
            result["crows"] = {}
    result["perplexity"] = evaluate_perplexity(model, tokenizer, perplexity_text, batch_size=batch_size)
    result.update(model=model_name or model_name_of(model), adapter=adapter, mode=mode, split=split)
    return result


def _interval(entry: dict, name: str) -> str:
    ci = entry.get(f"{name}_ci")
    return f"{entry[name]:6.2f} [{ci[0]:6.2f}, {ci[1]:6.2f}]" if ci else f"{entry[name]:6.2f}"


def format_table(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_model` result."""
    lines = [f"model: {result.get('model')}" + (f"   adapter: {result['adapter']}" if result.get("adapter") else "")]
    stereoset = result.get("stereoset")
    if stereoset:
        lines += ["", f"StereoSet ({result.get('split', 'test')} split, {result.get('mode')} mode; SS ideal 50, "
                      "LMS and ICAT ideal 100; 95% CI)",
                  f"{'bias type':<12} {'SS':>24} {'LMS':>24} {'ICAT':>24} {'n':>6} {'noisy':>6}"]
        for bias_type, entry in stereoset.items():
            lines.append(f"{bias_type:<12} {_interval(entry, 'ss'):>24} {_interval(entry, 'lms'):>24} "
                         f"{_interval(entry, 'icat'):>24} {entry['n']:>6} {entry.get('noisy', 0):>6}")
    crows = result.get("crows")
    if crows:
        lines += ["", "CrowS-Pairs (% sent_more scored above sent_less; ideal 50; ties in n)",
                  f"{'bias type':<20} {'metric':>24} {'ties':>6} {'n':>6}"]
        for bias_type, entry in crows.items():
            lines.append(f"{bias_type:<20} {_interval(entry, 'metric'):>24} {entry['ties']:>6} {entry['n']:>6}")
    if result.get("perplexity") is not None:
        lines += ["", f"perplexity (neutral text): {result['perplexity']:.2f}"]
    return "\n".join(lines)

"""``evaluate_model``: StereoSet SS / LMS / ICAT, CrowS-Pairs and perplexity in one dict.

The dict is exactly what ``biasedit evaluate --json`` writes::

    {"stereoset": {"gender": {"ss", "lms", "icat", "n", "n_targets", "noisy", "ss_ci", ...}, ...,
                   "overall": {...}},
     "crows": {"gender": {"metric", "n", "ties", "ties_pct", "metric_ci"}, ..., "overall": {...}},
     "gender_swapped": {"gender": {...}, "overall": {...}},
     "perplexity": float, "model": str, "adapter": str | None, "mode": str, "split": str}

``gender_swapped`` is StereoSet's gender items with every gendered word reversed (``data/swap.py``), roles
kept: a model that only learnt to prefer the other gender's stereotype drifts away from 50 on it. It is
scored when gender is among the bias types.

Works on any causal LM, a ``PeftModel`` included. Definitions: docs/metrics.md.

Resumable: with ``store=`` (a :class:`~biasedit_peft.progress_store.ScoreStore` or its folder) every
section's sentences are scored piece by piece (:data:`PIECE_SENTENCES` each, rounded up to a multiple of
``batch_size``) and each finished piece is written to the store at once; a rerun with the same store
scores only the pieces that are missing and gives bitwise the same result as an uninterrupted run
(pieces follow the batches of one unchunked ``score_sentences`` call, see :func:`score_in_pieces`).
A store made for other inputs is refused (``ResumeMismatch``). The caller removes the store when done.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from . import metrics
from .data import STEREOSET_BIAS_TYPES, gender_swapped, load_crows, load_neutral_text, load_stereoset
from .data.crows import CROWS_BIAS_TYPES, CrowsPair, crows_bias_type
from .data.splits import check_limit, take_per_type  # noqa: F401 - re-exported: evaluation.take_per_type
from .data.stereoset import StereoSetItem, load_stereoset_file
from .progress_store import ScoreStore, sentences_digest, tensors_digest
from .scoring import (
    SentenceLogProbs,
    concat_scores,
    encode_sentences,
    inverse_permutation,
    model_device,
    score_sentences,
)

BENCHMARKS = ("stereoset", "crows", "gender_swapped")
PIECE_SENTENCES = 512
"""Sentences per stored piece (rounded up to a multiple of the batch size)."""


def model_name_of(model) -> str:
    """The base model's ``name_or_path`` (looks through a PeftModel)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(name) if name else type(base).__name__


def stereoset_metrics(items: Sequence[StereoSetItem], scores: dict[str, SentenceLogProbs], mode: str,
                      **kwargs) -> dict:
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


def piece_size_for(batch_size: int, piece_size: int | None = None) -> int:
    """Sentences per stored piece: ``piece_size`` (default :data:`PIECE_SENTENCES`, read at call time)
    rounded up to a multiple of ``batch_size``, so that pieces are made of whole batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    wanted = PIECE_SENTENCES if piece_size is None else piece_size
    if wanted < 1:
        raise ValueError(f"piece_size must be positive, got {wanted}")
    return batch_size * math.ceil(wanted / batch_size)


def length_order(tokenizer, sentences: Sequence[str]) -> torch.Tensor:
    """``order`` [N] long: sentence positions by token length, longest first, ties in input order (the order
    in which :func:`~biasedit_peft.scoring.score_sentences` batches them)."""
    lengths = encode_sentences(tokenizer, sentences).attention_mask.sum(-1)
    return torch.argsort(lengths, descending=True, stable=True)


def score_in_pieces(
    model, tokenizer, sentences: Sequence[str], section: str, store: ScoreStore | None = None,
    batch_size: int = 32, progress: bool = True, piece_size: int | None = None,
) -> SentenceLogProbs:
    """``score_sentences(model, tokenizer, sentences, batch_size)`` [N], through ``store`` when given.

    The sentences, in :func:`length_order`, are cut into pieces of :func:`piece_size_for` sentences; each
    piece is loaded from ``store`` (section ``section``) when finished there, else scored with one
    ``score_sentences`` call and saved at once. A piece is already sorted, so ``score_sentences`` keeps its
    order and forms the very batches (same sentences, same padded width) of the unchunked call: the result
    is bitwise the unchunked one. ``store`` None: one ``score_sentences`` call, nothing written.
    """
    sentences = list(sentences)
    if store is None or not sentences:
        return score_sentences(model, tokenizer, sentences, batch_size=batch_size, progress=progress)
    store.require({f"{section} sentences": sentences_digest(sentences)})
    order = length_order(tokenizer, sentences)
    pieces = []
    with _sentence_bar(progress, len(sentences), section) as bar:
        for number, index in enumerate(torch.split(order, piece_size_for(batch_size, piece_size))):
            piece = store.load_scores(section, number, index)
            if piece is None:
                piece = score_sentences(model, tokenizer, [sentences[i] for i in index.tolist()],
                                        batch_size=batch_size)
                store.save_scores(section, number, index, piece)
            pieces.append(piece)
            bar.update(len(index))
    return concat_scores(pieces)[inverse_permutation(order)]


def _sentence_bar(enabled: bool, total: int, section: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"Scoring {section} ({total} sentences)", unit="sentence", disable=not enabled)


def scoring_fingerprint(model, model_name: str, adapter: str | None, batch_size: int,
                        piece_size: int | None = None) -> dict:
    """What decides a store's scores besides the sentences (``progress_store`` module docstring)."""
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {"model": model_name, "adapter": adapter, "weights": adapter_digest(model), "dtype": str(floating),
            "device": model_device(model).type, "batch_size": batch_size,
            "piece_size": piece_size_for(batch_size, piece_size)}


def adapter_digest(model) -> str | None:
    """sha256 of the active PEFT adapter's tensors (``get_peft_model_state_dict``); None for a plain model."""
    if not hasattr(model, "peft_config"):
        return None
    from peft import get_peft_model_state_dict

    return tensors_digest(get_peft_model_state_dict(model))


def score_stereoset_items(
    model, tokenizer, items: Sequence[StereoSetItem], batch_size: int = 32, progress: bool = True,
    store: ScoreStore | None = None, piece_size: int | None = None, section: str = "stereoset",
) -> dict[str, SentenceLogProbs]:
    """Scores of every item's three sentences: role -> :class:`SentenceLogProbs` of ``[N]``, in item order.

    ``store``: score piece by piece through it (under ``section``, :func:`score_in_pieces`).
    """
    sentences = [item.sentence(role) for role in STEREOSET_ROLES for item in items]
    scored = score_in_pieces(model, tokenizer, sentences, section, store, batch_size, progress, piece_size)
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
    store: ScoreStore | None = None, piece_size: int | None = None, section: str = "stereoset",
) -> dict:
    """Per bias type and ``overall`` StereoSet metrics of ``items`` under ``model`` (``section``: the name of its
    pieces in ``store``)."""
    by_role = score_stereoset_items(model, tokenizer, items, batch_size, progress, store, piece_size, section)
    return stereoset_results(items, by_role, mode, n_resamples, seed)


def evaluate_crows(
    model, tokenizer, pairs: Sequence[CrowsPair], batch_size: int = 32, progress: bool = True,
    n_resamples: int = metrics.N_RESAMPLES, seed: int = 0, store: ScoreStore | None = None,
    piece_size: int | None = None,
) -> dict:
    """Per bias type and ``overall`` CrowS-Pairs metric; sentence score = mean token log-prob.

    ``store``: score piece by piece through it (section ``crows``, :func:`score_in_pieces`).
    """
    sentences = [p.sent_more for p in pairs] + [p.sent_less for p in pairs]
    scored = score_in_pieces(model, tokenizer, sentences, "crows", store, batch_size, progress, piece_size)
    n = len(pairs)
    more, less = scored.mean[:n], scored.mean[n:]
    types = [t for t in CROWS_BIAS_TYPES if any(p.bias_type == t for p in pairs)]
    types += [t for t in dict.fromkeys(p.bias_type for p in pairs) if t not in types]
    result = {}
    for bias_type in types + ["overall"]:
        index = torch.tensor([i for i, p in enumerate(pairs) if bias_type in ("overall", p.bias_type)])
        result[bias_type] = metrics.crows_pairs(more[index], less[index], n_resamples=n_resamples, seed=seed)
    return result


def perplexity_paragraphs(text: str | Path | Sequence[str] | None = None) -> list[str]:
    """The paragraphs perplexity is measured on: the bundled neutral text (None), a text file's, or ``text``'s.

    Raises:
        ValueError: A file that is missing, a folder or not UTF-8 (``_io.InputFileError``, naming it).
    """
    return load_neutral_text(text) if text is None or isinstance(text, (str, Path)) else list(text)


def evaluate_perplexity(model, tokenizer, text: str | Path | Sequence[str] | None = None,
                        batch_size: int = 32, progress: bool = False, store: ScoreStore | None = None,
                        piece_size: int | None = None) -> float:
    """Perplexity on the bundled neutral text, a text file, or a list of paragraphs.

    ``store``: score piece by piece through it (section ``perplexity``, :func:`score_in_pieces`).
    """
    paragraphs = perplexity_paragraphs(text)
    scored = score_in_pieces(model, tokenizer, paragraphs, "perplexity", store, batch_size, progress, piece_size)
    return metrics.perplexity(scored.sum, scored.n_tokens)


def crows_types_of(bias_types: Sequence[str], crows_only: bool = False) -> list[str]:
    """The CrowS-Pairs names of ``bias_types`` (``race`` -> ``race-color``), leaving out StereoSet's ``profession``,
    which CrowS-Pairs lacks.

    Args:
        bias_types: StereoSet or CrowS-Pairs names.
        crows_only: CrowS-Pairs is the only bias benchmark that runs, so an empty answer is refused.

    Raises:
        ValueError: A name that is neither a CrowS-Pairs nor a StereoSet type (naming the available ones), or,
            with ``crows_only``, no requested type that CrowS-Pairs has.
    """
    unknown = [b for b in bias_types if crows_bias_type(b) not in CROWS_BIAS_TYPES and b not in STEREOSET_BIAS_TYPES]
    if unknown:
        raise ValueError(f"--bias-types: unknown bias type(s) {unknown}; CrowS-Pairs has "
                         f"{', '.join(CROWS_BIAS_TYPES)} (StereoSet's race is its race-color), StereoSet "
                         f"{', '.join(STEREOSET_BIAS_TYPES)}")
    types = [crows_bias_type(b) for b in bias_types if crows_bias_type(b) in CROWS_BIAS_TYPES]
    if crows_only and not types:
        raise ValueError(f"--bias-types {','.join(bias_types)}: CrowS-Pairs has none of them (it has no profession); "
                         f"it has {', '.join(CROWS_BIAS_TYPES)}")
    return types


def evaluate_model(
    model, tokenizer, benchmarks: Sequence[str] = BENCHMARKS, bias_types: Sequence[str] | None = None,
    split: str = "test", mode: str = "reference", batch_size: int = 32, progress: bool = True,
    perplexity_text: str | Path | Sequence[str] | None = None, *, limit: int | None = None,
    model_name: str | None = None, adapter: str | None = None,
    n_resamples: int = metrics.N_RESAMPLES, seed: int = 0,
    store: ScoreStore | str | Path | None = None, piece_size: int | None = None,
    stereoset_file: str | Path | None = None, crows_file: str | Path | None = None,
) -> dict:
    """Bias benchmarks and perplexity of ``model`` (see module docstring for the dict).

    ``stereoset_file`` / ``crows_file``: a user's own StereoSet-schema JSON / CrowS-Pairs CSV scored instead of the
    bundled one (``split`` then does not apply to it).

    ``bias_types``: StereoSet names (``gender``, ``race``, ``religion``, ``profession``); ``None`` =
    every type of the split and all 9 CrowS-Pairs types. CrowS-Pairs uses ``race-color`` for
    ``race`` and has no ``profession`` (:func:`crows_types_of`: a name that is neither is refused, and a
    ``profession``-only request when CrowS-Pairs runs without StereoSet). ``limit`` keeps the first N items of
    each bias type.

    ``store``: a :class:`~biasedit_peft.progress_store.ScoreStore` (or its folder) that receives every
    finished piece of scores and resumes from the pieces it already holds; it must have been made for the
    same model, adapter, dtype, device, batch size, piece size and sentences, else ``ResumeMismatch``.
    ``piece_size``: sentences per piece (default :data:`PIECE_SENTENCES`).
    """
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    if mode not in metrics.MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {metrics.MODES}")
    check_limit(limit)  # bad input is refused before anything is scored: the limit, CrowS types, the text
    crows_types = None
    if "crows" in benchmarks and bias_types is not None:
        crows_types = crows_types_of(bias_types, crows_only="stereoset" not in benchmarks)
    paragraphs = perplexity_paragraphs(perplexity_text)
    model_name = model_name or model_name_of(model)
    if store is not None and not isinstance(store, ScoreStore):
        store = ScoreStore(store)
    if store is not None:
        store.require(scoring_fingerprint(model, model_name, adapter, batch_size, piece_size))
    result: dict = {}
    pieces = dict(store=store, piece_size=piece_size)
    common = dict(batch_size=batch_size, progress=progress, n_resamples=n_resamples, seed=seed, **pieces)
    if "stereoset" in benchmarks:
        items = (load_stereoset_file(stereoset_file, bias_types) if stereoset_file
                 else load_stereoset(split, bias_types))
        result["stereoset"] = evaluate_stereoset(model, tokenizer, take_per_type(items, limit), mode=mode, **common)
    if "gender_swapped" in benchmarks and (bias_types is None or "gender" in bias_types):
        swapped = gender_swapped(take_per_type(load_stereoset(split, ["gender"]), limit))
        result["gender_swapped"] = evaluate_stereoset(model, tokenizer, swapped, mode=mode, section="gender_swapped",
                                                      **common)
    if "crows" in benchmarks:
        if crows_types is None or crows_types:
            pairs = take_per_type(load_crows(crows_types, path=crows_file), limit)
            result["crows"] = evaluate_crows(model, tokenizer, pairs, **common)
        else:
            result["crows"] = {}
    result["perplexity"] = evaluate_perplexity(model, tokenizer, paragraphs, batch_size=batch_size, **pieces)
    result.update(model=model_name, adapter=adapter, mode=mode, split=split)
    if stereoset_file or crows_file:
        result["data"] = str(stereoset_file or crows_file)
    return result


def _interval(entry: dict, name: str) -> str:
    ci = entry.get(f"{name}_ci")
    return f"{entry[name]:6.2f} [{ci[0]:6.2f}, {ci[1]:6.2f}]" if ci else f"{entry[name]:6.2f}"


def format_table(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_model` result."""
    lines = [f"model: {result.get('model')}" + (f"   adapter: {result['adapter']}" if result.get("adapter") else "")]
    for key, title in (("stereoset", "StereoSet"), ("gender_swapped", "StereoSet gender items, genders swapped")):
        if not result.get(key):
            continue
        lines += ["", f"{title} ({result.get('split', 'test')} split, {result.get('mode')} mode; SS ideal 50, "
                      "LMS and ICAT ideal 100; 95% CI)",
                  f"{'bias type':<12} {'SS':>24} {'LMS':>24} {'ICAT':>24} {'n':>6} {'noisy':>6}"]
        for bias_type, entry in result[key].items():
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

"""``biasedit bench``: quality, speed, memory and size figures that anyone can rerun with one command.

Sections (each a function returning a JSON-ready dict):

- ``quality``: the demo's metrics (``demo.run_demo``) for the default editor (``token`` loss) and its
  ablations — the ``paper`` loss variant, no retention loss (``loc_coef = 0``, the paper's ablation), and
  editing the first vs the last blocks (the paper's block sweep), and the held-out meta-loss
  (``held_out_coef = 1``, trainer.py); each under the paper's per-batch protocol and
  the deployment protocol (``deployment.py``: the adapter from ``train``, scored on ``test``) side by side;
- ``speed``: the speed goals, each in every LM dtype of ``dtypes`` (fp32 and bf16 by default; the editor stays
  float32), measured interleaved so that drift in the machine's speed hits every dtype alike, and each set
  against the machine's compute bound (its measured 2048 x 2048 matmul rate over the model's forward FLOPs per
  token, :func:`forward_flops_per_token`):

  * scoring throughput (tokens/s, real and padded) on a sample of the ``biasedit evaluate --benchmark all``
    workload (:func:`evaluate_workload`), and the time of the whole workload *extrapolated* from its exact
    token count (goal: at most 4 min);
  * seconds per meta-training step at ``n_edits`` (goal: at most 6 s at 32 edits) and its LM tokens/s;
  * bf16 over fp32: throughput ratio of scoring and of the meta-step (goal: at least 2.5x), and how often the
    two dtypes take the same stereotype-vs-anti-stereotype decision per StereoSet item (goal: 98 %);
  * on the CPU, one more scoring round and one more meta-step per dtype under the profiler, split by part
    (``profiling.py``): the editor and the vocabulary log-softmax, float32 whatever the LM's dtype, then attention,
    the LM's other matmuls and its other ops; and the bf16 / fp32 ratio those float32 parts allow at most
    (``float32_parts_bound``);
- ``solve``: time to compute one joint delta for 128 / 1024 samples, primal vs dual ridge solve;
- ``forward``: forward-pass time of the base model, the model with an unmerged adapter, and merged;
- ``memory``: peak resident memory of meta-training and of debiasing (each in a fresh process; on Linux
  the peak is reset after loading, so it is the phase's own peak);
- ``size``: adapter bytes, dense vs factored vs LoRA exports at a few ranks.

Timings are medians over ``repeats`` runs after one warm-up, with min and max.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._io import json_ready, run_folder, write_json
from ..data import BIAS_TYPES
from ..models import cpu_identity, cpu_label, default_device
from ..profiling import PARTS, float32_parts_bound, float32_seconds, time_by_part
from .demo import DemoConfig, build_model, editor_preset, environment, load_demo_items

SECTIONS = ("speed", "solve", "forward", "memory", "size", "scaling", "quality")
SPEED_DTYPES = ("fp32", "bf16", "fp16")
"""LM dtypes the speed section can measure (``--dtypes``)."""


@dataclass
class BenchConfig:
    """What to measure and how often."""

    model: str = "testbed"
    out: str = "bench"
    preset: str | None = None
    """Editor preset name (default: ``testbed``'s own for the testbed, else by model type)."""
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 5
    n_edits: int = 32
    """Edit-batch shape of the speed section (samples per meta-step)."""
    batch_size: int | None = None
    """Sentence pairs per LM forward pass (default: the model family's preset)."""
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    """LM dtypes of the speed section (of :data:`SPEED_DTYPES`), measured interleaved; the editor stays float32."""
    throughput_limit: int = 10
    """Scoring sample of the speed section: the first N StereoSet test items (all three roles) and CrowS-Pairs
    pairs per bias type, and the first N neutral-text paragraphs (10: ~300 sentences)."""
    throughput_repeats: int = 2
    """Timed rounds over the scoring sample (after a short warm-up); each round scores it once per dtype."""
    score_batch_size: int = 32
    """Sentences per forward pass when scoring (``biasedit evaluate``'s default)."""
    matmul_size: int = 2048
    """Side of the square matmul that measures the machine's FLOP rate (the compute bound)."""
    forward_repeats: int = 20
    """Round-robin rounds of the forward section."""
    solve_sizes: tuple[int, ...] = (128, 1024)
    max_system: int = 8192
    """Skip timing a ridge system larger than this (the dual of 1024 samples is ~25k x 25k)."""
    lora_ranks: tuple[int, ...] = (1, 4, 16, 64)
    quality_steps: int = 150
    quality_eval_every: int = 25
    limit: int | None = None
    """First N test / train items per bias type in the quality, size and memory sections (quick runs)."""
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.dtypes = tuple(self.dtypes)
        unknown = [d for d in self.dtypes if d not in SPEED_DTYPES]
        if unknown or not self.dtypes or len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError(f"dtypes must be distinct names of {list(SPEED_DTYPES)}, got {list(self.dtypes)}")
        for name in ("throughput_limit", "throughput_repeats", "score_batch_size", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def timing_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``seconds``, and how many there are."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "repeats": len(seconds)}


def timed(function: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median, min and max wall-clock seconds of ``repeats`` calls after one warm-up call."""
    timing = round_robin({"only": lambda _round: function()}, max(1, repeats))["only"]
    return timing.stats()


@dataclass
class Timing:
    """Wall-clock seconds of the timed calls of one :func:`round_robin` entry, and what each call returned."""

    seconds: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        return timing_stats(self.seconds)


def round_robin(calls: Mapping[Hashable, Callable[[int], Any]], rounds: int,
                warmup: bool = True) -> dict[Hashable, Timing]:
    """Time ``calls`` interleaved: every round calls each ``call(round_number)`` once, in ``calls`` order, so
    that drift in the machine's speed hits all of them alike.

    Round 0 is a warm-up (neither timed nor kept) when ``warmup``; the ``rounds`` timed rounds are numbered
    from 1.
    """
    timings = {key: Timing() for key in calls}
    for round_number in range(0 if warmup else 1, rounds + 1):
        for key, call in calls.items():
            start = time.perf_counter()
            result = call(round_number)
            elapsed = time.perf_counter() - start
            if round_number:
                timings[key].seconds.append(elapsed)
                timings[key].results.append(result)
    return timings


def _demo_config(config: BenchConfig, **overrides) -> DemoConfig:
    return DemoConfig(model=config.model, preset=config.preset, device=config.device, seed=config.seed, progress=False,
                      **overrides)


def _fresh_editor(peft_model, config: BenchConfig, output_dir: str = "unused", **training):
    """An untrained editor of the preset and its training arguments (``n_edits`` / LM batch from ``config``)."""
    return editor_preset(config.model, peft_model, config.preset).editor_and_arguments(
        peft_model, output_dir, n_edits=config.n_edits, batch_size=config.batch_size, seed=config.seed,
        progress=False, **training)


def _trainer(config: BenchConfig, out_dir: str, dtype: str | None = None):
    """A meta-trainer of a fresh editor (float32) on the train split, the LM in ``dtype`` (None: as loaded)."""
    from ..editor import BiasEditTrainer

    peft_model, tokenizer, _ = build_model(_demo_config(config, dtype=dtype))
    editor, args = _fresh_editor(peft_model, config, out_dir)
    train = load_demo_items("train", BIAS_TYPES, None)
    return BiasEditTrainer(peft_model, editor, args, train, None, tokenizer=tokenizer)


# ----- speed: goals, token counts, the compute bound -------------------------------------------------------
GOAL_EVALUATE_MINUTES = 4.0
"""``biasedit evaluate --model M --benchmark all`` within this many minutes."""
GOAL_META_STEP_SECONDS = 6.0
GOAL_META_STEP_N_EDITS = 32
"""A meta-step of :data:`GOAL_META_STEP_N_EDITS` edits within :data:`GOAL_META_STEP_SECONDS`."""
GOAL_BF16_SPEEDUP = 2.5
"""bf16 at least this many times faster than fp32 (scoring and meta-step)."""
GOAL_DECISION_AGREEMENT_PCT = 98.0
"""bf16 and fp32 prefer the same sentence (stereotype vs anti-stereotype) on this % of StereoSet items."""
GRAD_FORWARD_FACTOR = 3
"""FLOPs of a forward pass with gradients enabled, in forward passes (forward + backward ~ 3 x forward)."""
FLOPS_COUNTED = ("2 x the weights of every nn.Linear / Conv1D (the LM head once, tied or not) per token; "
                 "embedding lookups, norms, biases, activations and attention score products not counted")
META_STEP_FLOPS_COUNTED = (f"{GRAD_FORWARD_FACTOR} x forward FLOPs per padded token of each LM forward with "
                           "gradients enabled (forward + backward), 1 x for forwards without; an upper estimate "
                           "of the LM work (the backward stops at the first edited block and computes no weight "
                           "gradients); the editor's own work (hyper-network, ridge solve, meta-backward, Adam) "
                           "is not counted")


def forward_flops_per_token(model: torch.nn.Module) -> dict[str, Any]:
    """Forward FLOPs per token of ``model`` (a ``PeftModel`` is looked through): 2 x its matmul weights.

    Counted: the weight of every ``nn.Linear`` and transformers ``Conv1D``, once per token; the LM head is an
    ``nn.Linear`` and counts once whether or not it is tied to the input embedding. Not counted: embedding
    lookups (token and position tables: no multiply), norms, biases, activations, and the attention score /
    weighted-sum products (~4 x layers x context x hidden per token: under 1 % for sentence-length inputs).
    """
    from transformers.pytorch_utils import Conv1D

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    matmul = sum(m.weight.numel() for m in base.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    embeddings = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Embedding))
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    tied = head is not None and head.weight is base.get_input_embeddings().weight
    return {"flops_per_token": 2 * matmul, "matmul_parameters": matmul,
            "lm_head_parameters": None if head is None else head.weight.numel(), "lm_head_tied": tied,
            "embedding_parameters_not_counted": embeddings,
            "all_parameters": sum(p.numel() for p in base.parameters()), "counted": FLOPS_COUNTED}


def compute_bound(tokens: float, seconds: float, flops_per_token: float, gflops: float) -> dict[str, float]:
    """``tokens`` in ``seconds`` against the bound ``gflops`` (the matmul rate) / ``flops_per_token``."""
    tokens_per_s = tokens / seconds
    bound = gflops * 1e9 / flops_per_token
    return {"tokens_per_s": tokens_per_s, "bound_tokens_per_s": bound, "fraction_of_bound": tokens_per_s / bound}


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_call(size: int, dtype: str, device: torch.device | str, seed: int = 0) -> Callable[[int], None]:
    """A call that multiplies two fixed random ``size x size`` matrices of ``dtype`` (for :func:`round_robin`)."""
    from ..models import parse_dtype

    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=parse_dtype(dtype)) for _ in "ab")

    def call(_round: int) -> None:
        torch.matmul(a, b)
        _synchronize(device)

    return call


def matmul_rate(timing: Timing, size: int) -> dict[str, Any]:
    """GFLOP/s of a ``size``-square matmul (``2 size^3`` FLOPs) at the median of ``timing``."""
    stats = timing.stats()
    return {"size": size, "seconds": stats, "gflops": 2 * size ** 3 / stats["median_s"] / 1e9}


@dataclass
class TokenCount:
    """Tokens through an LM's forward passes: ``real`` (attention mask 1: BOS and sentence tokens) and
    ``padded`` (the whole ``[B, T]`` input), in all and in the passes with gradients enabled."""

    forwards: int = 0
    real: int = 0
    padded: int = 0
    real_with_grad: int = 0
    padded_with_grad: int = 0

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, with_grad: bool) -> None:
        real = input_ids.numel() if attention_mask is None else int(attention_mask.sum())
        self.forwards += 1
        self.real += real
        self.padded += input_ids.numel()
        if with_grad:
            self.real_with_grad += real
            self.padded_with_grad += input_ids.numel()

    @property
    def forward_equivalent(self) -> int:
        """Padded tokens weighted by their FLOPs in forward passes (:data:`GRAD_FORWARD_FACTOR` with grad)."""
        return self.padded + (GRAD_FORWARD_FACTOR - 1) * self.padded_with_grad

    @classmethod
    def total(cls, counts: Iterable[TokenCount]) -> TokenCount:
        names = [f.name for f in fields(cls)]
        counts = list(counts)
        return cls(**{name: sum(getattr(c, name) for c in counts) for name in names})


@contextmanager
def counting_tokens(model: torch.nn.Module) -> Iterator[TokenCount]:
    """Counts the tokens of every forward call of ``model`` (of the LM inside a ``PeftModel``) in the block."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    count = TokenCount()

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            count.add(input_ids, kwargs.get("attention_mask"), torch.is_grad_enabled())

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


@dataclass
class ScoringWorkload:
    """What ``biasedit evaluate --benchmark all`` scores, section by section, in the order it scores it."""

    stereoset_items: list
    crows_pairs: list
    sections: dict[str, list[str]]

    @property
    def n_sentences(self) -> int:
        return sum(len(sentences) for sentences in self.sections.values())


def evaluate_workload(limit: int | None = None) -> ScoringWorkload:
    """The sentences of ``evaluate_model(benchmarks=("stereoset", "crows"), split="test")``, every bias type:
    section ``stereoset`` (each item's three roles, role-major, as ``score_stereoset_items``), ``crows``
    (``sent_more`` then ``sent_less``, as ``evaluate_crows``) and ``perplexity`` (the neutral-text paragraphs).

    ``limit``: the first N StereoSet items and CrowS-Pairs pairs per bias type and the first N paragraphs (the
    sample the speed section times); None: the whole workload.
    """
    from ..data import load_crows, load_neutral_text, load_stereoset
    from ..evaluation import STEREOSET_ROLES, take_per_type

    items = take_per_type(load_stereoset("test", None), limit)
    pairs = take_per_type(load_crows(None), limit)
    paragraphs = load_neutral_text()
    sections = {"stereoset": [item.sentence(role) for role in STEREOSET_ROLES for item in items],
                "crows": [pair.sent_more for pair in pairs] + [pair.sent_less for pair in pairs],
                "perplexity": paragraphs if limit is None else paragraphs[:limit]}
    return ScoringWorkload(items, pairs, sections)


def batched_token_counts(tokenizer, sentences: Sequence[str], batch_size: int) -> dict[str, int]:
    """Exact ``real`` and ``padded`` tokens that ``score_sentences(..., batch_size)`` feeds the LM for
    ``sentences``: it sorts them by length (longest first) and pads each batch to its longest sentence."""
    from ..scoring import encode_sentences

    if not sentences:
        return {"sentences": 0, "real_tokens": 0, "padded_tokens": 0}
    lengths = encode_sentences(tokenizer, sentences).attention_mask.sum(-1)
    ordered = torch.sort(lengths, descending=True, stable=True).values
    padded = sum(int(chunk[0]) * len(chunk) for chunk in torch.split(ordered, batch_size))
    return {"sentences": len(sentences), "real_tokens": int(lengths.sum()), "padded_tokens": padded}


def workload_token_counts(tokenizer, workload: ScoringWorkload, batch_size: int) -> dict[str, dict[str, int]]:
    """:func:`batched_token_counts` of each section of ``workload`` (each is one ``score_sentences`` call), and
    their ``total``."""
    counts = {name: batched_token_counts(tokenizer, sentences, batch_size)
              for name, sentences in workload.sections.items()}
    keys = ("sentences", "real_tokens", "padded_tokens")
    counts["total"] = {key: sum(c[key] for c in counts.values()) for key in keys}
    return counts


def role_scores(stereoset_scores, n_items: int, role: str):
    """The ``[n_items]`` scores of ``role`` of a StereoSet section scored role-major (:func:`evaluate_workload`)."""
    from ..evaluation import STEREOSET_ROLES

    index = STEREOSET_ROLES.index(role)
    return stereoset_scores[index * n_items:(index + 1) * n_items]


def first_half_preferred(scores) -> torch.Tensor:
    """``[N]`` bool: sentence ``i`` of the first half has a higher mean token log-prob than sentence ``i`` of the
    second (CrowS-Pairs: ``sent_more`` over ``sent_less``)."""
    half = len(scores.mean) // 2
    return scores.mean[:half] > scores.mean[half:]


def stereotype_preferred(stereoset_scores, n_items: int) -> torch.Tensor:
    """``[n_items]`` bool: mean token log-prob of the stereotype > that of the anti-stereotype, per item."""
    stereo = role_scores(stereoset_scores, n_items, "stereotype").mean
    anti = role_scores(stereoset_scores, n_items, "anti-stereotype").mean
    return stereo > anti


def agreement_pct(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """% of positions where two ``[N]`` bool decisions agree (None for N = 0)."""
    if first.shape != second.shape:
        raise ValueError(f"decisions of different shapes {tuple(first.shape)} and {tuple(second.shape)}")
    return None if first.numel() == 0 else 100.0 * float((first == second).float().mean())


def decision_agreement(reference: dict[str, Any], other: dict[str, Any], workload: ScoringWorkload) -> dict[str, Any]:
    """How often two dtypes' scores (section -> scores) of ``workload`` take the same decision: StereoSet
    stereotype vs anti-stereotype per item, and CrowS-Pairs ``sent_more`` vs ``sent_less`` per pair."""
    n_items = len(workload.stereoset_items)
    stereo = [stereotype_preferred(scores["stereoset"], n_items) for scores in (reference, other)]
    crows = [first_half_preferred(scores["crows"]) for scores in (reference, other)]
    return {"stereoset_pct": agreement_pct(*stereo), "stereoset_items": n_items,
            "stereoset_disagreements": int((stereo[0] != stereo[1]).sum()),
            "crows_pct": agreement_pct(*crows), "crows_pairs": len(workload.crows_pairs)}


def goal(key: str, name: str, measured: float | None, target: float, unit: str, at_most: bool) -> dict[str, Any]:
    """One goal: ``measured`` against ``target`` (``<=`` when ``at_most``, else ``>=``); ``met`` None when
    unmeasured."""
    met = None if measured is None else (measured <= target if at_most else measured >= target)
    return {"key": key, "name": name, "measured": measured, "goal": target, "unit": unit,
            "comparison": "<=" if at_most else ">=", "met": met}


def _progress(config: BenchConfig, message: str) -> None:
    if config.progress:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _score_call(model, tokenizer, sentences: Sequence[str], batch_size: int) -> Callable[[int], tuple]:
    """A :func:`round_robin` call: ``score_sentences`` of ``sentences``; returns ``(scores, TokenCount)``."""
    from ..scoring import score_sentences

    def call(_round: int) -> tuple:
        with counting_tokens(model) as count:
            scores = score_sentences(model, tokenizer, sentences, batch_size=batch_size)
        return scores, count

    return call


def bench_scoring(config: BenchConfig, workload: ScoringWorkload) -> dict[str, Any]:
    """Scoring throughput of ``workload`` in each of ``config.dtypes``, against the compute bound.

    One copy of the model per dtype; every round scores each section once per dtype (section by section,
    dtype after dtype) and runs the matmul of the bound once per dtype, so drift hits all alike.
    """
    from ..models import load_model_and_tokenizer
    from ..scoring import score_sentences

    device = default_device(config.device)
    loaded = {dtype: load_model_and_tokenizer(config.model, dtype=dtype, device=device) for dtype in config.dtypes}
    tokenizer = loaded[config.dtypes[0]][1]
    models = {dtype: model for dtype, (model, _) in loaded.items()}
    flops = forward_flops_per_token(models[config.dtypes[0]])
    sections = {name: sentences for name, sentences in workload.sections.items() if sentences}
    batch_size = config.score_batch_size
    for model in models.values():  # warm-up: one batch of each section
        for sentences in sections.values():
            score_sentences(model, tokenizer, sentences[:batch_size], batch_size=batch_size)
    calls: dict[Hashable, Callable[[int], Any]] = {}
    for name, sentences in sections.items():
        calls.update({(name, dtype): _score_call(models[dtype], tokenizer, sentences, batch_size)
                      for dtype in config.dtypes})
    calls.update({("matmul", dtype): matmul_call(config.matmul_size, dtype, device, config.seed)
                  for dtype in config.dtypes})
    for dtype in config.dtypes:
        calls[("matmul", dtype)](0)  # warm-up
    timings = round_robin(calls, config.throughput_repeats, warmup=False)
    rates = {dtype: matmul_rate(timings[("matmul", dtype)], config.matmul_size) for dtype in config.dtypes}
    by_dtype = {dtype: _scoring_entry({name: timings[(name, dtype)] for name in sections}, flops["flops_per_token"],
                                      rates[dtype]["gflops"]) for dtype in config.dtypes}
    if torch.device(device).type == "cpu":
        for dtype in config.dtypes:
            by_dtype[dtype]["by_part"] = profiled_parts(
                lambda round_number, dtype=dtype: [calls[(name, dtype)](round_number) for name in sections], 0)
    scores = {dtype: {name: timings[(name, dtype)].results[-1][0] for name in sections} for dtype in config.dtypes}
    agreement = {f"{dtype}_vs_fp32": decision_agreement(scores["fp32"], scores[dtype], workload)
                 for dtype in config.dtypes if dtype != "fp32" and "fp32" in config.dtypes}
    full = workload_token_counts(tokenizer, evaluate_workload(None), batch_size)
    return {"flops": flops, "matmul": rates, "batch_size": batch_size, "rounds": config.throughput_repeats,
            "sample": {"limit_per_bias_type": config.throughput_limit,
                       "sentences": {name: len(s) for name, s in workload.sections.items()},
                       "stereoset_items": len(workload.stereoset_items), "crows_pairs": len(workload.crows_pairs)},
            "by_dtype": by_dtype, "decision_agreement": agreement,
            "evaluate_extrapolation": extrapolate_evaluate(full, by_dtype),
            "float32_parts_bound": float32_bound(by_dtype, rates, lambda entry: entry["seconds"]["median_s"])}


def _scoring_entry(by_section: dict[str, Timing], flops_per_token: float, gflops: float) -> dict[str, Any]:
    """Throughput of one dtype from its per-section :func:`_score_call` timings: seconds per round (all sections),
    tokens (of the last round; every round scores the same), real and padded tokens/s against the bound."""
    rounds = [sum(values) for values in zip(*(timing.seconds for timing in by_section.values()))]
    count = TokenCount.total(timing.results[-1][1] for timing in by_section.values())
    seconds = timing_stats(rounds)
    return {"seconds": seconds, "sentences": sum(len(t.results[-1][0].mean) for t in by_section.values()),
            "forwards": count.forwards, "real_tokens": count.real, "padded_tokens": count.padded,
            "real": compute_bound(count.real, seconds["median_s"], flops_per_token, gflops),
            "padded": compute_bound(count.padded, seconds["median_s"], flops_per_token, gflops),
            "section_median_s": {name: timing.stats()["median_s"] for name, timing in by_section.items()}}


def extrapolate_evaluate(full: dict[str, dict[str, int]], by_dtype: dict[str, dict]) -> dict[str, Any]:
    """Seconds of scoring the whole ``evaluate --benchmark all`` workload (``full``: its exact token counts) at
    each dtype's measured padded-token rate (and, as a check, at its real-token rate). An extrapolation: it
    leaves out loading the model and the bootstrap confidence intervals."""
    estimates = {}
    for dtype, measured in by_dtype.items():
        seconds = full["total"]["padded_tokens"] / measured["padded"]["tokens_per_s"]
        estimates[dtype] = {"seconds": seconds, "minutes": seconds / 60,
                            "seconds_from_real_tokens":
                                full["total"]["real_tokens"] / measured["real"]["tokens_per_s"]}
    return {"extrapolated": True, "what": "scoring of StereoSet test (all bias types, 3 roles), CrowS-Pairs (all) "
            "and the perplexity text at the sample's padded tokens/s; model loading and bootstrap CIs left out",
            "full_workload": full, "by_dtype": estimates}


def _meta_step_call(trainer, batches: list) -> Callable[[int], TokenCount]:
    """A :func:`round_robin` call: one training meta-step on batch ``round % len(batches)``; returns its tokens."""

    def call(round_number: int) -> TokenCount:
        with counting_tokens(trainer.model) as count:
            trainer.edit_step(batches[round_number % len(batches)], train=True)
        return count

    return call


def bench_meta_step(config: BenchConfig, flops_per_token: float | None) -> dict[str, Any]:
    """Seconds per meta-training step at ``n_edits`` in each of ``config.dtypes`` (one trainer each, steps
    interleaved, the same batch in every dtype per round; one warm-up round), with the LM tokens it processed.

    ``flops_per_token``: forward FLOPs per token for the compute bound (None: tokens/s only).
    """
    device = default_device(config.device)
    with tempfile.TemporaryDirectory() as folder:
        trainers = {dtype: _trainer(config, str(Path(folder) / dtype), dtype) for dtype in config.dtypes}
        calls: dict[Hashable, Callable[[int], Any]] = {
            ("step", dtype): _meta_step_call(trainer, trainer._batches(trainer.train_data, 0))
            for dtype, trainer in trainers.items()}
        calls.update({("matmul", dtype): matmul_call(config.matmul_size, dtype, device, config.seed)
                      for dtype in config.dtypes})
        timings = round_robin(calls, config.repeats)
        parts = {dtype: profiled_parts(calls[("step", dtype)], config.repeats + 1)
                 for dtype in config.dtypes} if torch.device(device).type == "cpu" else {}
        batch_size = trainers[config.dtypes[0]].args.batch_size
        del trainers, calls
        gc.collect()
    rates = {dtype: matmul_rate(timings[("matmul", dtype)], config.matmul_size) for dtype in config.dtypes}
    by_dtype = {}
    for dtype in config.dtypes:
        timing = timings[("step", dtype)]
        count, seconds = TokenCount.total(timing.results), sum(timing.seconds)
        entry = {"seconds_per_step": timing.stats(), "samples_per_second": config.n_edits / timing.stats()["median_s"],
                 "tokens": asdict(count), "real_tokens_per_s": count.real / seconds,
                 "padded_tokens_per_s": count.padded / seconds}
        if flops_per_token is not None:
            entry["forward_equivalent"] = compute_bound(count.forward_equivalent, seconds, flops_per_token,
                                                        rates[dtype]["gflops"])
        if dtype in parts:
            entry["by_part"] = parts[dtype]
        by_dtype[dtype] = entry
    return {"n_edits": config.n_edits, "batch_size": batch_size, "rounds": config.repeats, "matmul": rates,
            "flops_counted": META_STEP_FLOPS_COUNTED, "by_dtype": by_dtype,
            "float32_parts_bound": float32_bound(by_dtype, rates, lambda entry: entry["seconds_per_step"]["median_s"])}


def profiled_parts(call: Callable[[int], Any], round_number: int) -> dict[str, Any]:
    """One more ``call(round_number)`` under the CPU profiler: its wall seconds, :func:`profiling.time_by_part`
    and each part's share of the wall time. The profiler adds a little time per op; the shares are what to read."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        call(round_number)
        wall = time.perf_counter() - start
    seconds = time_by_part(profiler.events(), wall)
    return {"wall_s": wall, "seconds": seconds, "shares": {part: value / wall for part, value in seconds.items()}}


def float32_bound(by_dtype: Mapping[str, dict], rates: Mapping[str, dict],
                  seconds: Callable[[dict], float]) -> float | None:
    """:func:`profiling.float32_parts_bound` of the median fp32 and bf16 runs (``seconds`` of a dtype's entry: a
    meta-step, a scoring round), their float32 shares taken from the profiled ones (None unless both dtypes were
    profiled)."""
    if not all(dtype in by_dtype and "by_part" in by_dtype[dtype] for dtype in ("fp32", "bf16")):
        return None

    def step_and_float32(dtype: str) -> tuple[float, float]:
        median = seconds(by_dtype[dtype])
        return median, median * float32_seconds(by_dtype[dtype]["by_part"]["shares"])

    fp32_step, fp32_float32 = step_and_float32("fp32")
    _, bf16_float32 = step_and_float32("bf16")
    return float32_parts_bound(fp32_step, fp32_float32, bf16_float32, matmul_rate_ratio(rates))


def matmul_rate_ratio(rates: dict[str, dict]) -> float | None:
    """bf16 / fp32 matmul GFLOP/s: the speed-up the compute bound allows (None unless both were measured)."""
    if "fp32" not in rates or "bf16" not in rates:
        return None
    return rates["bf16"]["gflops"] / rates["fp32"]["gflops"]


def _speedup(by_dtype: dict[str, dict], seconds: Callable[[dict], float]) -> float | None:
    """fp32 seconds / bf16 seconds (None unless both were measured)."""
    if "fp32" not in by_dtype or "bf16" not in by_dtype:
        return None
    return seconds(by_dtype["fp32"]) / seconds(by_dtype["bf16"])


def speed_goals(scoring: dict[str, Any], meta_step: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed goals (module docstring), measured: one row per dtype where they are per dtype."""
    rows = [goal(f"evaluate_minutes.{dtype}", f"evaluate --benchmark all, {dtype} (extrapolated)",
                 estimate["minutes"], GOAL_EVALUATE_MINUTES, "min", at_most=True)
            for dtype, estimate in scoring["evaluate_extrapolation"]["by_dtype"].items()]
    n_edits = meta_step["n_edits"]
    note = "" if n_edits == GOAL_META_STEP_N_EDITS else f" (the goal is set at {GOAL_META_STEP_N_EDITS})"
    rows += [goal(f"meta_step_seconds.{dtype}", f"meta-step at n_edits {n_edits}, {dtype}{note}",
                  entry["seconds_per_step"]["median_s"], GOAL_META_STEP_SECONDS, "s", at_most=True)
             for dtype, entry in meta_step["by_dtype"].items()]
    rows.append(goal("bf16_scoring_speedup", "bf16/fp32 scoring speed",
                     _speedup(scoring["by_dtype"], lambda e: e["seconds"]["median_s"]), GOAL_BF16_SPEEDUP, "x",
                     at_most=False))
    rows.append(goal("bf16_meta_step_speedup", "bf16/fp32 meta-step speed",
                     _speedup(meta_step["by_dtype"], lambda e: e["seconds_per_step"]["median_s"]),
                     GOAL_BF16_SPEEDUP, "x", at_most=False))
    agreement = scoring["decision_agreement"].get("bf16_vs_fp32", {}).get("stereoset_pct")
    rows.append(goal("bf16_decision_agreement", "StereoSet decisions bf16 = fp32", agreement,
                     GOAL_DECISION_AGREEMENT_PCT, "%", at_most=False))
    return rows


def bench_speed(config: BenchConfig) -> dict:
    """The speed goals in every dtype of ``config.dtypes`` (module docstring): scoring throughput on a sample of
    the evaluate workload and its extrapolation, seconds per meta-step, bf16 vs fp32, the compute bound.

    The top-level ``seconds_per_step`` / ``samples_per_second`` / ``dtype`` are those of the first dtype.
    """
    start_load = os.getloadavg()
    workload = evaluate_workload(config.throughput_limit)
    _progress(config, f"speed: scoring {workload.n_sentences} sentences x {len(config.dtypes)} dtypes "
                      f"x {config.throughput_repeats} rounds ...")
    scoring = bench_scoring(config, workload)
    gc.collect()  # the scoring models
    _progress(config, f"speed: meta-steps ({config.n_edits} edits) x {len(config.dtypes)} dtypes "
                      f"x {config.repeats + 1} rounds ...")
    meta_step = bench_meta_step(config, scoring["flops"]["flops_per_token"])
    first = meta_step["by_dtype"][config.dtypes[0]]
    return {"n_edits": config.n_edits, "batch_size": meta_step["batch_size"], "dtype": config.dtypes[0],
            "seconds_per_step": first["seconds_per_step"], "samples_per_second": first["samples_per_second"],
            "dtypes": list(config.dtypes), "device": str(default_device(config.device)),
            "torch_threads": torch.get_num_threads(), "cpu": cpu_identity(),
            "load_average": {"start": list(start_load), "end": list(os.getloadavg())},
            "scoring": scoring, "meta_step": meta_step, "goals": speed_goals(scoring, meta_step)}


def _cached(peft_model, tokenizer, editor, n_samples: int):
    items = load_demo_items("train", BIAS_TYPES, None)
    items = (items * math.ceil(n_samples / len(items)))[:n_samples]
    cache, _, _ = editor.cache_samples(peft_model, tokenizer, items, 32, update_normalizers=True)
    return cache


def bench_solve(config: BenchConfig) -> dict:
    """One joint delta for each of ``solve_sizes`` samples: caching time, and the solve in both forms."""
    from ..editor.editor import _chunks
    from ..editor.solve import solve_ridge

    peft_model, tokenizer, _ = build_model(_demo_config(config))
    editor, _ = _fresh_editor(peft_model, config)
    results = []
    for n_samples in config.solve_sizes:
        start = time.perf_counter()
        cache = _cached(peft_model, tokenizer, editor, n_samples)
        cache_seconds = time.perf_counter() - start
        name = next(iter(editor.config.targets))
        net, index = editor.net_for(name)
        keys, grads = cache.layer(name)
        with torch.no_grad():
            changes = torch.cat([net.value_changes(keys[c], grads[c], index) for c in _chunks(len(keys), 4096)])
        ridge = net.ridge(index).detach()
        sizes = {"primal": keys.shape[1], "dual": keys.shape[0]}
        forms: dict[str, Any] = {}
        for form, size in sizes.items():
            if size > config.max_system:
                forms[form] = {"skipped": f"{size} x {size} system (over --max-system {config.max_system})"}
            else:
                forms[form] = timed(lambda form=form: solve_ridge(keys, changes, ridge, form=form), config.repeats)
        agreement = None
        if all("median_s" in result for result in forms.values()):
            dense = {form: solve_ridge(keys, changes, ridge, form=form).delta.dense() for form in forms}
            agreement = float((dense["primal"] - dense["dual"]).abs().max() / dense["primal"].abs().max())
        predict = timed(lambda: editor.predict(cache), config.repeats)
        results.append({"n_samples": n_samples, "n_tokens": cache.n_tokens, "key_size": keys.shape[1],
                        "auto_form": "dual" if cache.n_tokens < keys.shape[1] else "primal",
                        "cache_seconds": cache_seconds, "solve_one_layer": forms,
                        "predict_all_layers": predict, "primal_vs_dual_relative_difference": agreement})
    return {"layer": name, "sizes": results}


def bench_forward(config: BenchConfig) -> dict:
    """Forward time on a fixed batch: base, unmerged adapter with a non-zero delta, merged.

    The three models are separate copies, timed round-robin (one call of each per round) so that drift in
    the machine's speed affects them alike; ``forward_repeats`` rounds after one warm-up round.
    """
    import copy

    from peft import get_peft_model

    from ..models import load_model_and_tokenizer
    from ..scoring import encode_sentences
    from ..tuner import BiasEditConfig, edit_targets, set_deltas

    device = default_device(config.device)
    base, tokenizer = load_model_and_tokenizer(config.model, device=device)
    items = load_demo_items("test", BIAS_TYPES, None)[:64]
    batch = encode_sentences(tokenizer, [item.stereotype for item in items]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    peft_model = get_peft_model(copy.deepcopy(base), BiasEditConfig())
    deltas = {name: 1e-3 * torch.randn(layer.weight_shape, generator=generator)
              for name, layer in edit_targets(peft_model).items()}
    set_deltas(peft_model, deltas)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    models = {"base": base, "unmerged_adapter": peft_model, "merged": merged}

    @torch.no_grad()
    def forward(model):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    timings = round_robin({name: lambda _round, model=model: forward(model) for name, model in models.items()},
                          config.forward_repeats)
    results: dict[str, Any] = {"batch": list(batch.input_ids.shape)}
    results.update({name: timing.stats() for name, timing in timings.items()})
    unmerged_logits = forward(peft_model)
    results["max_abs_logit_difference_merged_vs_unmerged"] = float((forward(merged) - unmerged_logits).abs().max())
    results["max_abs_logit_difference_unmerged_vs_base"] = float((unmerged_logits - forward(base)).abs().max())
    base_median = results["base"]["median_s"]
    results["overhead_unmerged_pct"] = 100 * (results["unmerged_adapter"]["median_s"] / base_median - 1)
    results["overhead_merged_pct"] = 100 * (results["merged"]["median_s"] / base_median - 1)
    return results


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    """Resident set size now, in MiB (``/proc/self/status``; the peak so far where that is missing)."""
    return _proc_status_mib("VmRSS") or peak_rss_mib()


def _proc_status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (else since the start), in MiB."""
    return _proc_status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_phase(phase: str, config: BenchConfig) -> dict:
    """Run one phase in this (fresh) process; report RSS after loading and the peak after the phase."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(config, folder)
        batches = trainer._batches(trainer.train_data, 0)
        items = []
        if phase == "debiasing":
            items = load_demo_items("test", BIAS_TYPES, config.limit)
            _cached(trainer.model, trainer.tokenizer, trainer.editor, 64)  # normaliser statistics
        loaded = current_rss_mib()
        reset = reset_peak_rss()
        if phase == "meta_training":
            for batch in batches[:3]:
                trainer.edit_step(batch, train=True)
        elif phase == "debiasing":
            trainer.editor.debias(trainer.model, items, tokenizer=trainer.tokenizer, progress=False)
        else:
            raise ValueError(f"Unknown memory phase {phase!r}")
        peak = peak_rss_mib()
    return {"phase": phase, "rss_after_load_mib": loaded, "peak_rss_mib": peak,
            "peak_is_of_the_phase_alone": reset, "n_debias_samples": len(items) if phase == "debiasing" else None}


def bench_memory(config: BenchConfig) -> dict:
    """Peak RSS of three meta-training steps and of debiasing the test split, each in a fresh process."""
    results = {}
    for phase in ("meta_training", "debiasing"):
        payload = json.dumps({"phase": phase, "config": asdict(config)})
        completed = subprocess.run(
            [sys.executable, "-c",
             "import json,sys; from biasedit_peft.workflows.bench import _memory_main; _memory_main(sys.argv[1])",
             payload], capture_output=True, text=True, check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"memory phase {phase} failed:\n{completed.stderr[-2000:]}")
        results[phase] = json.loads(completed.stdout.strip().splitlines()[-1])
    results["n_edits"] = config.n_edits
    return results


def config_from_json(fields: Mapping[str, Any]) -> BenchConfig:
    """A :class:`BenchConfig` from its ``asdict`` sent as JSON to a worker process (lists back to tuples)."""
    return BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _memory_main(payload: str) -> None:
    data = json.loads(payload)
    print(json.dumps(_memory_phase(data["phase"], config_from_json(data["config"]))))


def _file_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def bench_size(config: BenchConfig) -> dict:
    """Bytes on disk of one real debias delta (test split) stored dense, factored, and as LoRA exports."""
    from ..sharing import export_lora_from_peft_model
    from ..tuner import get_deltas, set_deltas

    peft_model, tokenizer, _ = build_model(_demo_config(config))
    editor, _ = _fresh_editor(peft_model, config)
    _cached(peft_model, tokenizer, editor, 64)  # normaliser statistics of an untrained editor
    items = load_demo_items("test", BIAS_TYPES, config.limit)
    report = editor.debias(peft_model, items, tokenizer=tokenizer, progress=False)
    results: dict[str, Any] = {"n_samples": report.n_samples, "n_tokens": report.n_tokens}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        peft_model.save_pretrained(root / "as_debiased")
        results["as_written_by_debias"] = _file_bytes(root / "as_debiased")
        config_ = peft_model.peft_config["default"]
        dense = get_deltas(peft_model)
        for storage in ("dense", "factored"):
            config_.delta_storage = storage
            set_deltas(peft_model, dense)
            peft_model.save_pretrained(root / storage)
            results[storage] = _file_bytes(root / storage)
        exports = {}
        for rank in config.lora_ranks:
            export = export_lora_from_peft_model(peft_model, root / f"lora{rank}", rank=rank)
            exports[str(rank)] = {"bytes": _file_bytes(root / f"lora{rank}"),
                                  "relative_error": export.relative_error}
        results["lora"] = exports
    return results


QUALITY_VARIANTS: dict[str, dict] = {
    "default": {},
    "paper_loss": {"loss": "paper"},
    "no_retention": {"loc_coef": 0.0},
    "first_2_blocks": {"layers_to_transform": (0, 1)},
    "last_2_blocks": {"layers_to_transform": None, "num_edit_layers": 2},
    "held_out_loss": {"held_out_coef": 1.0},
}


def bench_quality(config: BenchConfig, variants: Sequence[str] = tuple(QUALITY_VARIANTS),
                  on_variant: Callable[[dict], None] | None = None, folder: str | Path | None = None,
                  resume: bool = False) -> dict:
    """``run_demo`` per variant (no merge) into ``FOLDER/quality/NAME``; keeps the headline numbers of each.

    Args:
        on_variant: Called with the results so far after every variant (``run_bench`` saves them then).
        folder: Where the variants' demos go (default ``config.out``).
        resume: Resume each variant's demo that an earlier run started or finished (``run_demo(resume=True)``).
    """
    from .demo import run_demo

    results = {}
    for name in variants:
        demo = quality_demo_config(config, name, folder)
        started = resume and quality_demo_started(demo)
        if config.progress:
            print(f"[bench] quality variant {name} ...", file=sys.stderr, flush=True)
        run = run_demo(demo, resume=True) if started else run_demo(demo)
        results[name] = {
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in QUALITY_VARIANTS[name].items()},
            "edited_layers": run["edit"]["layers"],
            "before": summary(run["before"]), "after_deployment": summary(run["after"]),
            "deployment": {**run["protocols"]["deployment"], "targets": run["targets"]["deployment"]},
            "per_batch": {"before": _ss_lms(run["protocols"]["per_batch"]["before"]),
                          "after": _ss_lms(run["protocols"]["per_batch"]["after"])},
            "held_out": {"before": _ss_lms(run["protocols"]["held_out"]["before"]),
                         "after": _ss_lms(run["protocols"]["held_out"]["after"])},
            "joint_on_test": {"before": _ss_lms(run["protocols"]["joint_on_test"]["before"]),
                              "after": _ss_lms(run["protocols"]["joint_on_test"]["after"])},
            "training_steps": run["training"]["steps"], "seconds": run["seconds"]["total"],
        }
        if on_variant is not None:
            on_variant(results)
    return results


def quality_demo_config(config: BenchConfig, name: str, folder: str | Path | None = None) -> DemoConfig:
    """The demo of quality variant ``name``, in ``FOLDER/quality/NAME`` (``folder`` default: ``config.out``)."""
    demo_out = Path(config.out if folder is None else folder) / "quality" / name
    return _demo_config(config, out=str(demo_out), max_steps=config.quality_steps,
                        eval_every=config.quality_eval_every, limit=config.limit, merge=False, crows=True,
                        n_resamples=0, **QUALITY_VARIANTS[name])


def quality_demo_started(demo: DemoConfig) -> bool:
    """Did an earlier bench start (or finish) this quality variant's demo?"""
    return run_folder(demo.out).is_dir() or Path(demo.out).is_dir()


def check_quality_resumable(config: BenchConfig, folder: str | Path | None = None,
                            variants: Sequence[str] = tuple(QUALITY_VARIANTS)) -> None:
    """Before a resumed bench measures anything: every quality variant an earlier run started must resume under
    this run's settings, above all its device (a bench may change device for its timing sections, not for the
    demos of an unfinished quality section).

    Raises:
        ResumeMismatch, PreviousRunError: A started variant's demo was made with other settings or cannot be
            resumed (the variant named, then the fields).
    """
    from ..progress_store import PreviousRunError, ResumeMismatch
    from .demo import check_out

    for name in variants:
        demo = quality_demo_config(config, name, folder)
        if not quality_demo_started(demo):
            continue
        try:
            check_out(demo, resume=True)
        except (ResumeMismatch, PreviousRunError) as error:
            raise type(error)(f"quality variant {name!r} of this bench: {error} (or resume the bench where the "
                              "variant ran, or without the quality section: --sections)") from None


def _ss_lms(stereoset: dict) -> dict:
    return {t: {"ss": e["ss"], "lms": e["lms"], "icat": e["icat"], "n": e["n"]} for t, e in stereoset.items()}


def summary(evaluation: dict) -> dict:
    """SS / LMS / ICAT per bias type, CrowS-Pairs per type, the gender-swapped SS and perplexity of an evaluate
    result."""
    return {"stereoset": _ss_lms(evaluation["stereoset"]),
            "crows": {t: e["metric"] for t, e in evaluation.get("crows", {}).items()},
            "crows_overall": evaluation.get("crows", {}).get("overall", {}).get("metric"),
            "gender_swapped": _ss_lms(evaluation.get("gender_swapped", {})),
            "perplexity": evaluation["perplexity"]}


def bench_scaling(config: BenchConfig) -> dict:
    """Meta-training and a joint debias at 1 and 2 processes (:mod:`.scaling`)."""
    from .scaling import bench_scaling as scaling

    return scaling(config)


SECTION_FUNCTIONS: dict[str, Callable[[BenchConfig], dict]] = {
    "speed": bench_speed, "solve": bench_solve, "forward": bench_forward, "memory": bench_memory,
    "size": bench_size, "scaling": bench_scaling, "quality": bench_quality,
}


def run_bench(config: BenchConfig, folder: str | Path | None = None, resume: bool = False) -> dict:
    """Every section of ``config.sections``; writes ``FOLDER/bench.json`` after each (nothing lost on interruption).

    Args:
        config: What to measure and how often (:class:`BenchConfig`).
        folder: Where to write (default ``config.out``; ``biasedit bench`` passes its run folder).
        resume: Keep the sections that ``FOLDER/bench.json`` holds complete (its settings must be these, else
            ``ResumeMismatch`` naming the fields) and resume the quality variants' demos.

    Returns:
        The bench document (what ``bench.json`` holds), one key per section.

    Raises:
        ValueError: An unknown section.
    """
    unknown = [s for s in config.sections if s not in SECTION_FUNCTIONS]
    if unknown:
        raise ValueError(f"Unknown bench section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(config.out if folder is None else folder)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(config), "environment": environment(), "sections": {}}
    finished = finished_sections(out / "bench.json", config) if resume else {}
    if resume and "quality" in config.sections and "quality" not in finished:
        check_quality_resumable(config, out)

    def save() -> None:
        write_json(out / "bench.json", results)

    def save_partial(section: str, partial: dict) -> None:
        results["sections"][section] = {**partial, "partial": True}
        save()

    for section in config.sections:
        if section in finished:
            results["sections"][section] = finished[section]
            continue
        if config.progress:
            print(f"[bench] {section} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if section == "quality":  # long: save after every variant
            outcome = bench_quality(config, on_variant=lambda partial: save_partial("quality", partial),
                                    folder=out, resume=resume)
        else:
            outcome = SECTION_FUNCTIONS[section](config)
        results["sections"][section] = outcome
        outcome["section_seconds"] = round(time.perf_counter() - start, 2)
        save()
    return results


RESUMABLE_BENCH_CHANGES = ("sections", "progress", "device")
"""Settings a resumed bench may change: which sections run, progress bars, and the device (sections that ran on
another device keep their figures, which record it; the demos of an unfinished quality section may not change it,
:func:`check_quality_resumable`)."""


def finished_sections(path: Path, config: BenchConfig) -> dict[str, dict]:
    """The complete sections of an earlier ``bench.json`` (none if there is none).

    Raises:
        ResumeMismatch: Its settings differ from ``config`` in a field outside :data:`RESUMABLE_BENCH_CHANGES`.
    """
    from ..progress_store import check_fields, read_json

    if not path.is_file():
        return {}
    stored = read_json(path)
    current = {k: v for k, v in json_ready(asdict(config)).items() if k not in RESUMABLE_BENCH_CHANGES}
    check_fields(str(path), {k: v for k, v in stored.get("config", {}).items() if k not in RESUMABLE_BENCH_CHANGES},
                 current, every=True)
    return {name: section for name, section in stored.get("sections", {}).items() if not section.get("partial")}


_DIGITS = {"x": 2, "%": 1, "min": 1, "s": 2}


def _amount(value: float, unit: str, goal_: bool = False) -> str:
    """``2.13x``, ``98.4 %``, ``3.6 min``; a goal without trailing zeros (``2.5x``, ``98 %``, ``4 min``)."""
    number = f"{value:g}" if goal_ else f"{value:.{_DIGITS.get(unit, 2)}f}"
    return f"{number}{unit}" if unit == "x" else f"{number} {unit}"


def goal_verdict(row: dict[str, Any]) -> str:
    """``goal 2.5x: not met`` of a :func:`goal` row."""
    verdict = {True: "met", False: "not met", None: "not measured"}[row["met"]]
    return f"goal {_amount(row['goal'], row['unit'], goal_=True)}: {verdict}"


def _measured(row: dict[str, Any]) -> str:
    """``2.13x (goal 2.5x: not met)`` of a measured :func:`goal` row."""
    return f"{_amount(row['measured'], row['unit'])} ({goal_verdict(row)})"


def _per_second(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


PART_LABELS = {"editor_float32": "editor + solve (float32)", "vocabulary_float32": "vocabulary log-softmax (float32)",
               "attention": "attention", "lm_matmul": "LM matmuls", "lm_other": "LM other ops",
               "untracked": "outside ops"}
"""How :func:`speed_lines` names each part of :data:`~biasedit_peft.profiling.PARTS`."""


def part_shares_text(shares: Mapping[str, float]) -> str:
    """``editor + solve (float32) 21 %, ...``: every part of :data:`~biasedit_peft.profiling.PARTS` in order."""
    return ", ".join(f"{PART_LABELS[part]} {100 * shares[part]:.0f} %" for part in PARTS)


def by_part_lines(section: Mapping[str, Any], what: str) -> list[str]:
    """The profiled split of each dtype's ``what`` (``step``, ``round``) in a scoring or meta-step section, and the
    bf16 / fp32 bound its float32 parts leave; no lines where nothing was profiled (not on the CPU)."""
    lines = [f"  by part ({dtype}, one profiled {what} of {entry['by_part']['wall_s']:.3f} s): "
             + part_shares_text(entry["by_part"]["shares"])
             for dtype, entry in section["by_dtype"].items() if "by_part" in entry]
    bound = section.get("float32_parts_bound")
    if bound is not None:
        lines.append(f"  with its float32 parts as measured, bf16/fp32 is at most {bound:.2f}x even if all the rest "
                     f"ran at the matmul ratio ({matmul_rate_ratio(section['matmul']):.2f}x)")
    return lines


def cpu_text(cpu: dict[str, Any] | None) -> str:
    """`` of CPU (features)`` for a :func:`~biasedit_peft.models.cpu_identity` record; empty for a result without
    one (bench.json files written before it was recorded)."""
    return f" of {cpu_label(cpu)}" if cpu else ""


def speed_lines(speed: dict[str, Any]) -> list[str]:
    """The readable summary of a :func:`bench_speed` result: compute bound, scoring, meta-steps, goals."""
    scoring, meta, goals = speed["scoring"], speed["meta_step"], {row["key"]: row for row in speed["goals"]}
    flops, load = scoring["flops"], speed["load_average"]
    rates = ", ".join(f"{dtype} {rate['gflops']:.0f} GFLOP/s" for dtype, rate in scoring["matmul"].items())
    lines = [(f"compute bound: {scoring['matmul'][speed['dtype']]['size']}^2 matmul {rates}; forward "
              f"{flops['flops_per_token'] / 1e6:.2f} MFLOP/token = 2 x {flops['matmul_parameters'] / 1e6:.2f}M "
              f"matmul weights (LM head once{', tied' if flops['lm_head_tied'] else ''}; embedding lookups not "
              f"counted); {speed['torch_threads']} threads{cpu_text(speed.get('cpu'))}, load average "
              f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}")]
    cells = []
    for index, (dtype, entry) in enumerate(scoring["by_dtype"].items()):
        real, padded = entry["real"], entry["padded"]
        bound = f"of the {_per_second(real['bound_tokens_per_s'])} tok/s bound" if index == 0 else \
            f"of {_per_second(real['bound_tokens_per_s'])}"
        cells.append(f"{dtype} {_per_second(real['tokens_per_s'])} tok/s ({real['fraction_of_bound']:.2f} {bound}; "
                     f"padded {_per_second(padded['tokens_per_s'])})")
    parts = [", ".join(cells)]
    if goals["bf16_scoring_speedup"]["measured"] is not None:
        parts.append(f"bf16/fp32 {_measured(goals['bf16_scoring_speedup'])}, "
                     f"bound {matmul_rate_ratio(scoring['matmul']):.2f}x")
    agreement = goals["bf16_decision_agreement"]
    if agreement["measured"] is not None:
        items = scoring["decision_agreement"]["bf16_vs_fp32"]["stereoset_items"]
        parts.append(f"decisions agree on {_amount(agreement['measured'], '%')} of {items} items "
                     f"({goal_verdict(agreement)})")
    parts.append("evaluate --benchmark all extrapolated " + ", ".join(
        f"{dtype} {_measured(goals[f'evaluate_minutes.{dtype}'])}" for dtype in scoring["by_dtype"]))
    sample = scoring["sample"]
    lines.append(f"scoring ({sum(sample['sentences'].values())} sentences, {scoring['rounds']} rounds): "
                 + "; ".join(parts))
    lines += by_part_lines(scoring, "round")
    for dtype, entry in meta["by_dtype"].items():
        step, row = entry["seconds_per_step"], goals[f"meta_step_seconds.{dtype}"]
        text = (f"meta-training step ({meta['n_edits']} edits, LM batch {meta['batch_size']}, {dtype}): median "
                f"{step['median_s']:.3f} s [{step['min_s']:.3f}, {step['max_s']:.3f}] ({goal_verdict(row)}), "
                f"{entry['samples_per_second']:.1f} samples/s, {_per_second(entry['padded_tokens_per_s'])} LM tok/s")
        if "forward_equivalent" in entry:
            text += (f" ({entry['forward_equivalent']['fraction_of_bound']:.2f} of the bound, forward+backward "
                     "counted as 3x forward)")
        lines.append(text)
    if goals["bf16_meta_step_speedup"]["measured"] is not None:
        lines.append(f"meta-step bf16/fp32 {_measured(goals['bf16_meta_step_speedup'])}, "
                     f"bound {matmul_rate_ratio(meta['matmul']):.2f}x")
    lines += by_part_lines(meta, "step")
    measured = [row for row in speed["goals"] if row["met"] is not None]
    missed = [row["name"] for row in measured if not row["met"]]
    lines.append(f"speed goals met: {len(measured) - len(missed)} of {len(measured)}"
                 + (f" (not met: {'; '.join(missed)})" if missed else ""))
    return lines


def partial_lines(sections: dict) -> list[str]:
    """One line per section a stopped bench left unfinished (``"partial": True``): its rows are not the whole
    section, so no table may pass them off as one."""
    return [f"{name} section PARTIAL: the bench stopped before it finished; only the finished rows are shown "
            "(biasedit bench --resume completes it)" for name, section in sections.items()
            if isinstance(section, dict) and section.get("partial")]


def format_bench(results: dict) -> str:
    """A short plain-text table of a :func:`run_bench` result."""
    sections, lines = results["sections"], []
    if "speed" in sections:
        lines += speed_lines(sections["speed"])
    for row in sections.get("solve", {}).get("sizes", []):
        solved = {form: (f"{1e3 * r['median_s']:.1f} ms" if "median_s" in r else "skipped")
                  for form, r in row["solve_one_layer"].items()}
        lines.append(f"joint delta, {row['n_samples']} samples ({row['n_tokens']} tokens): "
                     f"cache {row['cache_seconds']:.2f} s, "
                     f"solve primal {solved['primal']} / dual {solved['dual']} (auto: {row['auto_form']}), "
                     f"predict all layers {1e3 * row['predict_all_layers']['median_s']:.1f} ms")
    if "forward" in sections:
        f = sections["forward"]
        lines.append(f"forward {f['batch']}: base {1e3 * f['base']['median_s']:.1f} ms, unmerged adapter "
                     f"{1e3 * f['unmerged_adapter']['median_s']:.1f} ms ({f['overhead_unmerged_pct']:+.1f}%), merged "
                     f"{1e3 * f['merged']['median_s']:.1f} ms ({f['overhead_merged_pct']:+.1f}%)")
    if "memory" in sections:
        m = sections["memory"]
        lines.append(f"peak RSS: meta-training {m['meta_training']['peak_rss_mib']:.0f} MiB, debiasing "
                     f"{m['debiasing']['peak_rss_mib']:.0f} MiB "
                     f"(after load {m['meta_training']['rss_after_load_mib']:.0f} MiB)")
    if "size" in sections:
        z = sections["size"]
        lora = ", ".join(f"r{r} {v['bytes'] / 1024:.0f} KiB (err {v['relative_error']:.2f})"
                         for r, v in z["lora"].items())
        lines.append(f"adapter bytes: dense {z['dense'] / 1024:.0f} KiB, factored {z['factored'] / 1024:.0f} KiB "
                     f"({z['n_tokens']} tokens); LoRA {lora}")
    if "scaling" in sections:
        c = sections["scaling"]
        runs = ", ".join(f"{n} process(es) {r['seconds_per_meta_step']:.2f} s/meta-step, debias "
                         f"{r['debias_samples_per_second']:.0f} samples/s" for n, r in c["runs"].items())
        lines.append(f"scaling ({c['cores']} cores shared): {runs}; throughput ratio meta-step "
                     f"{c['meta_step_throughput_ratio']:.2f}x, debias {c['debias_throughput_ratio']:.2f}x; deltas "
                     f"within {max(c['debias_delta_relative_difference'].values()):.1e} of one process")
    for name, q in sections.get("quality", {}).items():
        if name in ("section_seconds", "partial"):
            continue
        cells = []
        for bias_type, entry in q["per_batch"]["after"].items():
            before = q["per_batch"]["before"][bias_type]
            held = q["held_out"]["after"][bias_type]
            deployed = q["after_deployment"]["stereoset"][bias_type]
            cells.append(f"{bias_type} SS {before['ss']:.1f}->{entry['ss']:.1f} "
                         f"LMS {before['lms']:.1f}->{entry['lms']:.1f} "
                         f"(held-out SS {held['ss']:.1f} LMS {held['lms']:.1f}; deployment SS "
                         f"{q['before']['stereoset'][bias_type]['ss']:.1f}->{deployed['ss']:.1f} "
                         f"LMS {q['before']['stereoset'][bias_type]['lms']:.1f}->{deployed['lms']:.1f})")
        lines.append(f"quality {name}: " + "; ".join(cells))
    return "\n".join(lines + partial_lines(sections))

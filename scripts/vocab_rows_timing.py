"""Seconds per meta-step with the previous autograd of the vocabulary-wide losses against the row-chunked one
(interleaved, in each LM dtype).

    python scripts/vocab_rows_timing.py --model smollm2-135m --dtypes bf16,fp32

The debias loss's token log-probs and the retention loss's per-position KL each touch ``[N, V]`` logit rows
(V = 49,152 for SmolLM2). They used to be left to autograd: the log-probs in ~1 MB row chunks (hundreds of small
ops and backward nodes a step), the KL as two log-softmaxes of the whole ``[B, T, V]`` tensor in float32, padding
included, and every backward through a boolean index filled a ``[B, T, V]`` zero tensor first. Now both are
``torch.autograd.Function``s over cache-sized float32 chunks of the scoring rows alone, whose backward recomputes
each chunk's softmax and writes the gradient rows directly (``scoring._TargetLogProbs``, ``losses._RowKL``).
Each variant meta-trains its own editor from the same seed; each round runs one meta-step of both on the same batch
(A, B, A, B, ...) in every dtype. The first round is a warm-up; the medians of the others are printed with the
losses of both (the same up to float rounding) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from biasedit_peft import scoring
from biasedit_peft.editor import BiasEditTrainer, losses
from biasedit_peft.workflows.demo import DemoConfig, build_model, editor_preset, load_demo_items

VARIANTS = ("previous", "chunked")


def previous_token_log_probs(logits: torch.Tensor, batch: scoring.TokenBatch) -> torch.Tensor:
    """The previous implementation: boolean-indexed rows, autograd through ~1 MB chunks of log-sum-exp."""
    scored = batch.target_mask[:, 1:]
    rows = logits[:, :-1][scored]
    targets = batch.input_ids[:, 1:][scored]
    chunk = max(1, scoring._LOGSUMEXP_CHUNK_BYTES // (4 * rows.shape[-1])) if rows.device.type == "cpu" else len(rows)
    picked = torch.cat([_previous_target_log_probs(part.float(), part_targets)
                        for part, part_targets in zip(rows.split(chunk), targets.split(chunk))])
    scores = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device).masked_scatter(scored, picked)
    return torch.nn.functional.pad(scores, (1, 0))


def _previous_target_log_probs(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return rows.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)


def previous_token_retention_loss(pre_logits: torch.Tensor, post_logits: torch.Tensor,
                                  batch: scoring.TokenBatch) -> torch.Tensor:
    """The previous implementation: two float32 log-softmaxes of the whole ``[B, T, V]``, then a mask."""
    positions = torch.zeros_like(batch.target_mask)
    positions[:, :-1] = batch.target_mask[:, 1:]
    pre_log = torch.log_softmax(pre_logits.detach().float(), -1)
    post_log = torch.log_softmax(post_logits.float(), -1)
    per_position = (pre_log.exp() * (pre_log - post_log)).sum(-1)
    return (per_position * positions).sum(-1) / positions.sum(-1).clamp(min=1)


def previous_token_retention_terms(pre_logits: torch.Tensor, post_logits: torch.Tensor,
                                   batch: scoring.TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous retention loss, and the unrelated sentences' token log-probs before and after scored as they
    were then: by two more passes (:func:`previous_token_log_probs`)."""
    return (previous_token_retention_loss(pre_logits, post_logits, batch),
            previous_token_log_probs(pre_logits, batch), previous_token_log_probs(post_logits.detach(), batch))


@contextmanager
def previous_losses() -> Iterator[None]:
    """The previous implementations in place of the current ones, within the block (both arms score the pairs
    once per batch, as ``trainer.edit_step`` now does)."""
    saved = (losses.token_log_probs, losses.token_retention_terms)
    losses.token_log_probs, losses.token_retention_terms = previous_token_log_probs, previous_token_retention_terms
    try:
        yield
    finally:
        losses.token_log_probs, losses.token_retention_terms = saved


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--n-edits", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up (default 4)")
    args = parser.parse_args(argv)
    print("load average", os.getloadavg(), flush=True)
    train = load_demo_items("train", ("gender", "race", "religion"), None)
    trainers = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes.split(","):
            config = DemoConfig(model=args.model, out="unused", progress=False, dtype=dtype)
            for variant in VARIANTS:
                peft_model, tokenizer, _ = build_model(config)
                editor, training = editor_preset(config.model, peft_model, None).editor_and_arguments(
                    peft_model, f"{folder}/{dtype}-{variant}", progress=False, n_edits=args.n_edits)
                trainers[(dtype, variant)] = BiasEditTrainer(peft_model, editor, training, train, None,
                                                             tokenizer=tokenizer)
        times: dict = {key: [] for key in trainers}
        for round_number in range(args.rounds):
            for (dtype, variant), trainer in trainers.items():
                batch = trainer._batches(trainer.train_data, 0)[round_number]
                with previous_losses() if variant == "previous" else _nothing():
                    start = time.perf_counter()
                    metrics = trainer.edit_step(batch, train=True)
                    times[(dtype, variant)].append(time.perf_counter() - start)
                print(f"round {round_number} {dtype} {variant}: {times[(dtype, variant)][-1]:.2f} s, "
                      f"loss {metrics['loss']:.6f}", flush=True)
    medians = {key: statistics.median(values[1:]) for key, values in times.items()}
    for dtype in dict.fromkeys(dtype for dtype, _ in trainers):
        previous, chunked = medians[(dtype, "previous")], medians[(dtype, "chunked")]
        print(f"{dtype}: previous {previous:.2f} s, chunked {chunked:.2f} s per meta-step: {previous / chunked:.2f}x")
    print("load average", os.getloadavg())
    return {f"{dtype}-{variant}": seconds for (dtype, variant), seconds in medians.items()}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()

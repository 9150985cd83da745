"""Scoring throughput with the whole-batch float32 log-softmax against the cache-sized chunks (interleaved).

    python scripts/logsumexp_timing.py --model smollm2-135m --dtypes bf16,fp32

``scoring.token_log_probs`` used to copy the logits of every position, padding included, to float32 and take one
log-sum-exp over ``[B, T, V]``; it now takes the target positions only, in chunks of about 1 MB of float32 rows.
Each round scores the same StereoSet ``test`` sentences with both (A, B, A, B, ...); the first round is a warm-up and
the median of the others is printed as tokens per second, with the largest difference between their scores and the
load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from biasedit_peft import scoring
from biasedit_peft.data import load_stereoset
from biasedit_peft.models import load_model_and_tokenizer


def whole_batch_token_log_probs(logits: torch.Tensor, batch: scoring.TokenBatch) -> torch.Tensor:
    """The previous implementation: ``[B, T]`` float32 from one float32 copy of ``logits [B, T, V]``."""
    previous = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    picked = previous.gather(-1, targets).squeeze(-1) - torch.logsumexp(previous, dim=-1)
    return torch.nn.functional.pad(picked, (1, 0)).masked_fill(~batch.target_mask, 0.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--sentences", type=int, default=480, help="StereoSet test sentences scored per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up (default 4)")
    args = parser.parse_args(argv)
    print("load average", os.getloadavg(), flush=True)
    items = load_stereoset("test")
    sentences = [sentence for item in items for sentence in (item.stereotype, item.anti_stereotype)][: args.sentences]
    chunked = scoring.token_log_probs
    results = {}
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device="cpu")
        tokens = int(scoring.encode_sentences(tokenizer, sentences).target_mask.sum())
        times: dict[str, list[float]] = {"whole batch": [], "chunked": []}
        scores = {}
        for _ in range(args.rounds):
            for name, implementation in (("whole batch", whole_batch_token_log_probs), ("chunked", chunked)):
                scoring.token_log_probs = implementation
                try:
                    start = time.perf_counter()
                    scores[name] = scoring.score_sentences(model, tokenizer, sentences, batch_size=args.batch_size)
                    times[name].append(time.perf_counter() - start)
                finally:
                    scoring.token_log_probs = chunked
        rates = {name: tokens / statistics.median(seconds[1:]) for name, seconds in times.items()}
        difference = (scores["whole batch"].sum - scores["chunked"].sum).abs().max().item()
        results[dtype] = {"tokens_per_s": rates, "ratio": rates["chunked"] / rates["whole batch"],
                          "max_abs_score_difference": difference}
        print(f"{dtype}: whole batch {rates['whole batch']:.0f} tok/s, chunked {rates['chunked']:.0f} tok/s "
              f"({results[dtype]['ratio']:.2f}x); max |sentence log-prob difference| {difference:.2e}", flush=True)
    if len(results) == 2 and "bf16" in results and "fp32" in results:
        for name in ("whole batch", "chunked"):
            ratio = results["bf16"]["tokens_per_s"][name] / results["fp32"]["tokens_per_s"][name]
            print(f"bf16 / fp32, {name}: {ratio:.2f}x")
    print("load average", os.getloadavg(), flush=True)
    return results


if __name__ == "__main__":
    main()

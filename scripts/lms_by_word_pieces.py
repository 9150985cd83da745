"""Where a model loses LMS: how often each meaningful sentence beats the unrelated one, by BPE pieces.

    python scripts/lms_by_word_pieces.py --model testbed [--bias-types gender,race,religion] [--split test]

For every StereoSet item, the stereotype and the anti-stereotype sentence are each compared with the
unrelated sentence (mean token log-prob, as LMS in reference mode does; docs/metrics.md). The share of
comparisons won is printed per number of BPE pieces of the attribute word (the word with a leading
space, as it appears mid-sentence; 3 means 3 or more). These are pooled over items, not the per-target
macro average of LMS.
"""

from __future__ import annotations

import argparse

import torch

from biasedit_peft.data import load_stereoset
from biasedit_peft.evaluation import score_stereoset_items
from biasedit_peft.models import load_model_and_tokenizer


def piece_counts(tokenizer, words: list[str], cap: int = 3) -> torch.Tensor:
    """[N] number of BPE pieces of ``" " + word``, capped at ``cap``."""
    ids = tokenizer([" " + word for word in words], add_special_tokens=False)["input_ids"]
    return torch.tensor([len(row) for row in ids]).clamp(max=cap)


def win_rates(wins: torch.Tensor, pieces: torch.Tensor) -> dict[int, tuple[int, float]]:
    """``{pieces: (items, share won)}`` from ``wins`` [N] bool and ``pieces`` [N] long."""
    return {int(k): (int((pieces == k).sum()), float(wins[pieces == k].double().mean())) for k in pieces.unique()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--bias-types", default="gender,race,religion")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(args.model)
    items = load_stereoset(args.split, bias_types=args.bias_types.split(","))
    with torch.no_grad():
        scores = score_stereoset_items(model.eval(), tokenizer, items, progress=False)
    unrelated = scores["unrelated"].mean
    for role, word_of in (("stereotype", "stereotype_word"), ("anti-stereotype", "anti_stereotype_word")):
        wins = scores[role].mean > unrelated
        pieces = piece_counts(tokenizer, [getattr(item, word_of) for item in items])
        rates = ", ".join(f"{k} piece(s): {share:.1%} of {n}" for k, (n, share) in win_rates(wins, pieces).items())
        print(f"{role} > unrelated: {wins.double().mean():.1%} of {len(items)} items; by word pieces: {rates}")


if __name__ == "__main__":
    main()

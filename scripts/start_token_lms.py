"""Which start token to score sentences after: StereoSet SS / LMS of one model under each candidate.

    python scripts/start_token_lms.py --model smollm2-135m --tokens "<|endoftext|>,<|im_start|>" [--dtype bf16]

Every sentence is scored as ``log p(sentence | start token)`` (docs/metrics.md). The start token is the
tokenizer's BOS; for a chat-tuned model that BOS can be a chat-turn marker (SmolLM2-Instruct's is
``<|im_start|>``) while its pretraining separated documents with another token (``<|endoftext|>``). This
scores the StereoSet split once per candidate token (reference mode, 95 % bootstrap CIs) and prints one
row each, so the choice is measured, not guessed.
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

from biasedit_peft.data import BIAS_TYPES, load_stereoset
from biasedit_peft.evaluation import evaluate_stereoset
from biasedit_peft.models import load_model_and_tokenizer


def scores_with_start_token(model, tokenizer, token: str, items: list, n_resamples: int) -> dict:
    """StereoSet results (``evaluate_stereoset``) with ``token`` as the start token of every sentence (the
    package's chat-turn rule, ``scoring.CHAT_TURN_MARKERS``, is switched off so that every candidate is scored
    as given)."""
    if token not in tokenizer.get_vocab():
        raise ValueError(f"{token!r} is not a token of this tokenizer")
    tokenizer.bos_token = token
    with mock.patch("biasedit_peft.scoring.CHAT_TURN_MARKERS", ()):
        return evaluate_stereoset(model, tokenizer, items, progress=False, n_resamples=n_resamples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True, help="comma-separated candidate start tokens")
    parser.add_argument("--bias-types", default=",".join(BIAS_TYPES))
    parser.add_argument("--split", default="test")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    items = load_stereoset(args.split, bias_types=args.bias_types.split(","))
    results = {}
    for token in args.tokens.split(","):
        results[token] = scores_with_start_token(model, tokenizer, token, items, args.n_resamples)
        cells = "   ".join(f"{t} SS {e['ss']:.2f} LMS {e['lms']:.2f} [{e['lms_ci'][0]:.1f}, {e['lms_ci'][1]:.1f}]"
                           if e.get("lms_ci") else f"{t} SS {e['ss']:.2f} LMS {e['lms']:.2f}"
                           for t, e in results[token].items())
        print(f"{token:>16}: {cells}", flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()

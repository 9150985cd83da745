"""Debias the bundled testbed model with the Python API, offline: train an editor, debias, evaluate, reload.

Run: python examples/debias_testbed.py [--steps 60]     (a few minutes on 2 CPU cores at the default)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel, get_peft_model

from biasedit_peft import BiasEditConfig, BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.data import load_stereoset
from biasedit_peft.evaluation import evaluate_model
from biasedit_peft.models import load_model_and_tokenizer


def ss_by_type(model, tokenizer, limit: int | None) -> dict[str, float]:
    result = evaluate_model(model, tokenizer, benchmarks=("stereoset",), bias_types=["gender", "race", "religion"],
                            limit=limit, progress=False, n_resamples=0)
    return {bias_type: round(entry["ss"], 2) for bias_type, entry in result["stereoset"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="meta-training steps")
    parser.add_argument("--limit", type=int, default=None, help="first N items per bias type (quick runs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model_and_tokenizer("testbed")
    model = get_peft_model(base, BiasEditConfig()).eval()  # mlp.c_proj of the last 3 blocks
    print("SS before:", ss_by_type(model, tokenizer, args.limit))

    def split(name):
        items = load_stereoset(name, bias_types=["gender", "race", "religion"])
        return items if args.limit is None else items[: 3 * args.limit]

    with tempfile.TemporaryDirectory() as workdir:
        editor = BiasEditor.for_model(model, rank=256, lr=1e-3, loss="token", block_init="fan_in")
        training = BiasEditTrainingArguments(f"{workdir}/editor", n_edits=32, batch_size=32, meta_lr=1e-3,
                                             loc_coef=1.0, max_steps=args.steps, eval_every=max(1, args.steps // 3),
                                             progress=False)
        state = BiasEditTrainer(model, editor, training, split("train"), split("dev"), tokenizer=tokenizer).train()
        print(f"meta-trained {state.global_step} steps, best dev loss {state.best_loss:.4f}")
        editor = BiasEditor.from_pretrained(f"{workdir}/editor")
        report = editor.debias(model, split("test"), tokenizer=tokenizer, progress=False)
        print(f"one joint delta from {report.n_samples} test items ({report.n_tokens} tokens) on {report.layers}")
        print("SS after: ", ss_by_type(model, tokenizer, args.limit))
        model.save_pretrained(f"{workdir}/adapter")
        fresh, _ = load_model_and_tokenizer("testbed")
        reloaded = PeftModel.from_pretrained(fresh, f"{workdir}/adapter").eval()
        print("SS reloaded:", ss_by_type(reloaded, tokenizer, args.limit))


if __name__ == "__main__":
    main()

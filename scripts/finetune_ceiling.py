"""What the edited weights can do on unseen items: fine-tune the adapter's deltas directly on ``train``.

The editor writes deltas for the MLP output projections of a few blocks; a deployment pools them over the
``train`` pairs and is scored on ``test``, whose target terms ``train`` never has. This script drops the editor
and optimises the very same deltas (the zero BiasEdit adapter of the demo, float32) with Adam on the same
meta-objective the editor is trained with: the debias loss on the ``train`` pairs plus ``--loc-coef`` x the
retention loss (KL to the unedited model) on their unrelated sentences. Every ``--eval-every`` steps StereoSet
``dev`` and ``test`` and the perplexity of the neutral text are scored. The checkpoint kept is chosen on ``dev``
only (the lowest mean |SS - 50| among those whose mean dev LMS drop is at most ``--max-lms-drop``; the unedited
model if none) and scored on ``test`` with CrowS-Pairs. The ``test`` rows of the other checkpoints are recorded
to show the trade-off, not used to choose.

If direct optimisation of these weights on every ``train`` pair does not move ``test`` SS, the editor's pooled
delta (one ridge solve, an approximation of such an update) cannot be expected to.

    python scripts/finetune_ceiling.py --model smollm2-135m --lr 3e-3 --steps 150 --eval-every 50 \
        --out runs/finetune-ceiling.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _study_args import add_editor_study_arguments, parse_study_arguments, study_record

from biasedit_peft._io import write_json
from biasedit_peft.cli._common import add_edit_layers_arguments, parse_block_indices
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.editor.editor import encode_pairs, forward_logits
from biasedit_peft.editor.losses import debias_loss, retention_loss
from biasedit_peft.evaluation import BENCHMARKS, evaluate_model, evaluate_perplexity, evaluate_stereoset
from biasedit_peft.scoring import encode_sentences
from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items


def adapter_deltas(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The dense float32 deltas of the active adapter, by parameter name, made trainable."""
    deltas = {name: parameter for name, parameter in peft_model.named_parameters() if ".biasedit_delta." in name}
    if not deltas:
        raise ValueError("The model has no dense BiasEdit deltas to fine-tune")
    for parameter in deltas.values():
        parameter.requires_grad_(True)
    return deltas


def training_step(peft_model, tokenizer, items, loc_coef: float, optimizer: torch.optim.Optimizer) -> dict:
    """One Adam step on ``mean debias loss + loc_coef x mean retention loss`` of ``items`` (token losses)."""
    pairs = encode_pairs(tokenizer, items)
    logits = forward_logits(peft_model, pairs)
    debias = debias_loss("token", logits, pairs.to(logits.device)).mean()
    unrelated = encode_sentences(tokenizer, [item.unrelated for item in items])
    with torch.no_grad(), peft_model.disable_adapter():
        pre_logits = forward_logits(peft_model, unrelated)
    post_logits = forward_logits(peft_model, unrelated)
    retention = retention_loss("token", pre_logits, post_logits, unrelated.to(post_logits.device)).mean()
    optimizer.zero_grad(set_to_none=True)
    (debias + loc_coef * retention).backward()
    optimizer.step()
    return {"debias": debias.item(), "retention": retention.item()}


def ss_lms(section: dict) -> dict[str, dict[str, float]]:
    """``{bias type: {"ss", "lms"}}`` of a StereoSet section (``evaluate_stereoset``)."""
    return {t: {"ss": section[t]["ss"], "lms": section[t]["lms"]} for t in BIAS_TYPES}


def dev_choice_score(dev: dict, dev_before: dict, max_lms_drop: float) -> float:
    """Mean |SS - 50| over the bias types, ``inf`` if the mean LMS drop exceeds ``max_lms_drop``."""
    drop = sum(dev_before[t]["lms"] - dev[t]["lms"] for t in BIAS_TYPES) / len(BIAS_TYPES)
    if drop > max_lms_drop:
        return float("inf")
    return sum(abs(dev[t]["ss"] - 50.0) for t in BIAS_TYPES) / len(BIAS_TYPES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser, editor=False)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pairs-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Adam's step on the deltas (3e-3: SmolLM2's perplexity held within 2 %%)")
    parser.add_argument("--loc-coef", type=float, default=4.0, help="the retention loss's weight (cpu preset's)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-lms-drop", type=float, default=3.0, help="dev bound of the checkpoint choice")
    add_edit_layers_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_study_arguments(parser, argv)

    torch.manual_seed(args.seed)
    peft_model, tokenizer, _ = build_model(DemoConfig(model=args.model, dtype=args.dtype, progress=False,
                                                           num_edit_layers=args.num_edit_layers,
                                                           layers_to_transform=parse_block_indices(args.layers)))
    peft_model.eval()  # no dropout: the retention loss compares the edited model with the unedited one exactly
    deltas = adapter_deltas(peft_model)
    optimizer = torch.optim.Adam(deltas.values(), lr=args.lr)
    train = load_demo_items("train", BIAS_TYPES, args.limit)
    scores = dict(bias_types=list(BIAS_TYPES), limit=args.limit, batch_size=args.batch_size, progress=False,
                  n_resamples=1000)
    started = time.perf_counter()

    splits = {split: load_demo_items(split, BIAS_TYPES, args.limit) for split in ("dev", "test")}

    def stereoset(split: str) -> dict:
        """The StereoSet section of ``split`` under the current deltas (scored once per checkpoint)."""
        return evaluate_stereoset(peft_model, tokenizer, splits[split], batch_size=args.batch_size, progress=False,
                                  n_resamples=scores["n_resamples"])

    report = {**study_record(args), "arguments": {k: v for k, v in vars(args).items() if k != "overwrite"},
              "n_train": len(train), "deltas": list(deltas), "before": evaluate_model(peft_model, tokenizer,
                                                                                      **scores)}
    dev_before = ss_lms(stereoset("dev"))
    report["checkpoints"] = [{"step": 0, "dev": dev_before, "test": ss_lms(report["before"]["stereoset"]),
                              "perplexity": report["before"]["perplexity"]}]
    best = (dev_choice_score(dev_before, dev_before, args.max_lms_drop), 0,
            {name: p.detach().clone() for name, p in deltas.items()},
            report["before"]["stereoset"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    position, losses = 0, []
    for step in range(1, args.steps + 1):
        if position + args.pairs_per_step > len(order):
            order, position = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + step)), 0
        items = [train[i] for i in order[position:position + args.pairs_per_step].tolist()]
        position += args.pairs_per_step
        losses.append(training_step(peft_model, tokenizer, items, args.loc_coef, optimizer))
        if step % args.eval_every and step != args.steps:
            continue
        with torch.no_grad():
            test = stereoset("test")
            row = {"step": step, "losses": losses[-args.eval_every:], "dev": ss_lms(stereoset("dev")),
                   "test": ss_lms(test),
                   "perplexity": evaluate_perplexity(peft_model, tokenizer, batch_size=args.batch_size,
                                                     progress=False),
                   "delta_norms": {name: p.norm().item() for name, p in deltas.items()}}
        report["checkpoints"].append(row)
        score = dev_choice_score(row["dev"], dev_before, args.max_lms_drop)
        if score < best[0]:
            best = (score, step, {name: p.detach().clone() for name, p in deltas.items()},
                    test)
        write_json(Path(args.out), report)
        print(f"step {step}: dev SS " + " / ".join(f"{row['dev'][t]['ss']:.2f}" for t in BIAS_TYPES)
              + ", test SS " + " / ".join(f"{row['test'][t]['ss']:.2f}" for t in BIAS_TYPES)
              + f", perplexity {row['perplexity']:.2f} [{time.perf_counter() - started:.0f} s]", flush=True)

    with torch.no_grad():
        for name, parameter in deltas.items():
            parameter.copy_(best[2][name])
    report["kept_step"] = best[1]
    others = [b for b in BENCHMARKS if b != "stereoset"]  # its test StereoSet section is the kept row's
    report["after"] = {**evaluate_model(peft_model, tokenizer, benchmarks=others, **scores),
                       "stereoset": best[3]}
    report["seconds"] = time.perf_counter() - started
    write_json(Path(args.out), report)
    before, after = report["before"], report["after"]
    print(f"kept step {best[1]} (chosen on dev): test SS "
          + " / ".join(f"{before['stereoset'][t]['ss']:.2f} -> {after['stereoset'][t]['ss']:.2f}" for t in BIAS_TYPES)
          + ", LMS drop " + " / ".join(f"{before['stereoset'][t]['lms'] - after['stereoset'][t]['lms']:.2f}"
                                       for t in BIAS_TYPES)
          + f", perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

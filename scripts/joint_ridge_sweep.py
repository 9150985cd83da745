"""The joint solve's ridge as a deployment lever: one trained editor, one pooled system, several ``lambda``.

A deployed adapter is one ridge solve over every token of the edit data (``BiasEditor.joint_solutions``). With
~10^5 tokens the editor's learned ``lambda`` (fit to ~10^3-token edits) is negligible next to ``U^T U``, so the
joint delta is the least-squares fit of the value changes, which whitens the keys and so leans on rare key
directions. A larger ``lambda`` moves it toward ``U^T D / lambda`` (the summed, gradient-like update), which leans on
the common ones. This script measures which transfers to unseen target terms:

for each relative ridge ``rho`` (``lambda = rho x tr(U^T U) / d_in``; ``learned`` = the editor's own ``lambda``)
the delta is rescaled to the learned solution's fitted size ``||U S||_F``, its scale is calibrated on ``dev``
exactly as the demo does (``deployment.calibration_score``), and the result is scored on ``test`` (StereoSet,
reference SS, and perplexity). The choice among the rows is made on ``dev`` only; ``test`` is printed for the
record.

    python scripts/joint_ridge_sweep.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --out runs/ridge-sweep-smollm2.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from biasedit_peft._io import write_json
from biasedit_peft.editor import BiasEditor
from biasedit_peft.editor.cache import as_edit_sample, key_grams
from biasedit_peft.editor.calibration import calibrate_joint_scale, scaled_solutions
from biasedit_peft.editor.editor import _chunks
from biasedit_peft.editor.solve import RidgeDelta, RidgeSystem
from biasedit_peft.evaluation import evaluate_model
from biasedit_peft.scoring import eval_mode, length_sorted_batches
from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items
from biasedit_peft.workflows.deployment import calibration_score

BIAS_TYPES = ("gender", "race", "religion")


@dataclass(frozen=True)
class Joint:
    """A joint delta (what ``BiasEditor.edited`` / ``write_solutions`` read of a solution)."""

    delta: RidgeDelta


def edit_rows(editor: BiasEditor, peft_model, tokenizer, samples, batch_size: int) -> dict:
    """``{layer: (keys [N, d_in], value changes [N, d_out])}`` of the pooled edit data."""
    edit_samples = [as_edit_sample(sample, index) for index, sample in enumerate(samples)]
    cache, _, _ = editor.cache_samples(peft_model, tokenizer, edit_samples, batch_size)
    rows = {}
    with torch.no_grad():
        for name in editor.config.targets:
            net, index = editor.net_for(name)
            keys, grads = cache.layer(name)
            rows[name] = keys, torch.cat([net.value_changes(keys[c], grads[c], index)
                                          for c in _chunks(len(keys), editor.config.chunk_size)])
    return rows


def preserved_grams(editor: BiasEditor, peft_model, tokenizer, sentences, batch_size: int) -> tuple[dict, int]:
    """``({layer: U_r^T U_r}, N_r)`` of the edited layers' inputs on ``sentences``."""
    _, batches = length_sorted_batches(tokenizer, sentences, batch_size)
    with eval_mode(peft_model):
        return key_grams(peft_model, editor.check_compatible(peft_model), batches)


def solutions_for(systems: dict, learned: dict, rho: float | None) -> dict:
    """Joint deltas at relative ridge ``rho`` (None: learned), each rescaled to the learned one's ``||U S||_F``."""
    out = {}
    for name, system in systems.items():
        reference = system.fitted_norm(learned[name])
        ridge = learned[name] if rho is None else system.ridge_for(rho)
        factor = reference / max(system.fitted_norm(ridge), 1e-300)
        delta = system.solve(ridge)
        out[name] = Joint(RidgeDelta(delta.left, delta.right * factor))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--editor", required=True, help="a trained editor folder (e.g. a demo's OUT/editor)")
    parser.add_argument("--grid", default="0:learned,0:1e-2,0:1,1:learned,10:learned",
                        help="comma-separated PRESERVE:RHO rows. RHO: the relative ridge (lambda = RHO x the Gram's "
                             "mean eigenvalue) or 'learned' (the editor's own lambda); PRESERVE: the weight w of "
                             "the preserved keys (the train items' unrelated sentences), C = w (N / N_r) U_r^T U_r "
                             "added to U^T U")
    parser.add_argument("--crows", action="store_true", help="also score CrowS-Pairs for every row")
    parser.add_argument("--limit", type=int, default=None, help="first N items per bias type of every split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args(argv)

    config = DemoConfig(model=args.model, dtype=args.dtype, progress=False)
    peft_model, tokenizer, device = build_model(config)
    editor = BiasEditor.from_pretrained(args.editor, device=device)
    train = load_demo_items("train", BIAS_TYPES, args.limit)
    dev = load_demo_items("dev", BIAS_TYPES, args.limit)
    started = time.perf_counter()
    rows = edit_rows(editor, peft_model, tokenizer, train, args.batch_size)
    n_tokens = len(next(iter(rows.values()))[0])
    grams, n_preserved = preserved_grams(editor, peft_model, tokenizer, [item.unrelated for item in train],
                                         args.batch_size)
    learned = {name: float(editor.net_for(name)[0].ridge(editor.net_for(name)[1])) for name in rows}
    grid = [(float(row.split(":")[0]), row.split(":")[1]) for row in args.grid.split(",")]
    weights = sorted({w for w, _ in grid})
    systems = {w: {name: RidgeSystem.from_rows(keys, changes, preserved_gram=(w * n_tokens / n_preserved) * grams[name]
                                               if w else None)
                   for name, (keys, changes) in rows.items()} for w in weights}
    print(f"pooled {len(train)} train pairs, {n_tokens} tokens ({n_preserved} preserved tokens); learned lambda "
          + ", ".join(f"{v:.3g} (= {v / s.mean_eigenvalue:.2e} x mean eigenvalue)"
                      for v, s in zip(learned.values(), systems[weights[0]].values())), flush=True)
    benchmarks = ("stereoset", "crows") if args.crows else ("stereoset",)
    test_kwargs = dict(benchmarks=benchmarks, bias_types=list(BIAS_TYPES), limit=args.limit,
                       progress=False, n_resamples=1000)
    report = {"model": args.model, "editor": args.editor, "n_train": len(train), "n_tokens": n_tokens,
              "n_preserved": n_preserved, "learned_lambda": learned, "rows": []}
    report["before"] = evaluate_model(peft_model, tokenizer, **test_kwargs)
    for w, text in grid:
        rho = None if text == "learned" else float(text)
        solutions = solutions_for(systems[w], learned, rho)
        calibration = calibrate_joint_scale(editor, peft_model, tokenizer, solutions, dev, calibration_score,
                                            batch_size=args.batch_size)
        with editor.edited(peft_model, scaled_solutions(solutions, calibration["scale"])):
            after = evaluate_model(peft_model, tokenizer, **test_kwargs)
        chosen = next(r for r in calibration["rows"] if r["scale"] == calibration["scale"])
        row = {"rho": text, "preserve": w, "scale": calibration["scale"], "dev": chosen,
               "dev_rows": calibration["rows"], "test": after}
        report["rows"].append(row)
        ss = " / ".join(f"{after['stereoset'][t]['ss']:.2f}" for t in BIAS_TYPES)
        lms = " / ".join(f"{report['before']['stereoset'][t]['lms'] - after['stereoset'][t]['lms']:.2f}"
                         for t in BIAS_TYPES)
        crows = " / ".join(f"{v['metric']:.2f}" for v in after.get("crows", {}).values() if isinstance(v, dict))
        ppl = after["perplexity"] / report["before"]["perplexity"] - 1
        print(f"preserve {w:g} rho {text:>8}: dev SS {chosen['ss_pre']:.2f} -> {chosen['ss_post']:.2f} "
              f"at x{calibration['scale']:.3g}"
              f" (selection {chosen['selection']:.2f}) | test SS {ss}, LMS drop {lms}, CrowS {crows}, "
              f"ppl {100 * ppl:+.2f} %  [{time.perf_counter() - started:.0f} s]", flush=True)
        write_json(Path(args.out), report)
    b = report["before"]
    print("before: test SS " + " / ".join(f"{b['stereoset'][t]['ss']:.2f}" for t in BIAS_TYPES)
          + ", CrowS " + " / ".join(f"{v['metric']:.2f}" for v in b.get("crows", {}).values() if isinstance(v, dict))
          + f", ppl {b['perplexity']:.2f}")
    best = min(report["rows"], key=lambda r: (r["dev"]["selection"], r["rho"] != "learned", r["preserve"]))
    print(f"chosen on dev: preserve {best['preserve']:g}, rho {best['rho']} (x{best['scale']:.3g})")
    return 0 if all(math.isfinite(r["dev"]["selection"]) for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

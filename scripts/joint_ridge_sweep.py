"""The joint solve's ridge as a deployment lever: one trained editor, one pooled system, several ``lambda``.

A deployed adapter is one ridge solve over every token of the edit data (``BiasEditor.joint_solutions``). With
~10^5 tokens the editor's learned ``lambda`` (fit to ~10^3-token edits) is negligible next to ``U^T U``, so the
joint delta is the least-squares fit of the value changes, which whitens the keys and so leans on rare key
directions. A larger ``lambda`` moves it toward ``U^T D / lambda`` (the summed, gradient-like update), which leans on
the common ones. This script measures which transfers to unseen target terms:

for each relative ridge ``rho`` (``lambda = rho x tr(U^T U) / d_in``; ``learned`` = the editor's own ``lambda``)
the delta is rescaled to the learned solution's fitted size ``||U S||_F``, its scale is calibrated on each
``--calibrations`` set (``dev`` by default) exactly as the demo does (``deployment.calibration_score``), and the
result is scored on ``test`` (StereoSet, reference SS, and perplexity). The choice among the rows is made on the
first calibration set only; ``test`` is printed for the record.

``--edit-split train-fit --calibrations dev dev+train-calib`` computes the delta from ``train-fit`` and calibrates
each recipe twice, on ``dev`` alone and on ``dev`` pooled with ``train-calib`` (the target terms ``train-fit``
leaves out), scoring ``test`` once per distinct chosen multiple.

    python scripts/joint_ridge_sweep.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --out runs/ridge-sweep-smollm2.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _study_args import add_editor_study_arguments, parse_study_arguments, study_record

from biasedit_peft._io import write_json
from biasedit_peft.data import (
    BIAS_TYPES,
    SPLITS,
    check_held_out,
    guard_text_label,
    guard_text_option,
    preserve_text_label,
    preserve_text_option,
)
from biasedit_peft.data.neutral import UNRELATED_LABEL
from biasedit_peft.editor import BiasEditor
from biasedit_peft.editor.calibration import calibrate_joint_scale, chosen_row, scaled_solutions
from biasedit_peft.editor.joint import JointRecipe, pooled_statistics, recipe_solutions
from biasedit_peft.evaluation import evaluate_model
from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items
from biasedit_peft.workflows.deployment import calibration_score, keepable_keys, nothing_to_preserve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser)
    parser.add_argument("--grid", default="0:learned,0:1e-2,0:1,1:learned,10:learned",
                        help="comma-separated PRESERVE:RHO rows. RHO: the relative ridge (lambda = RHO x the Gram's "
                             "mean eigenvalue) or 'learned' (the editor's own lambda); PRESERVE: the weight w of "
                             "the keys of --preserve-text, C = w (N / N_r) U_r^T U_r "
                             "added to U^T U")
    parser.add_argument("--crows", action="store_true", help="also score CrowS-Pairs for every row")
    parser.add_argument("--preserve-text", default=None, metavar="FILE",
                        help="for the rows with PRESERVE > 0, as in biasedit debias: the text (paragraphs separated "
                             "by blank lines) whose keys are preserved (default: the bundled preservation text); "
                             "'unrelated': the edit items' unrelated sentences")
    parser.add_argument("--guard-text", default=None, metavar="FILE",
                        help="the text whose perplexity rise bounds each calibrated scale, as in the demo (default: "
                             "the bundled guard text; 'none': no such bound)")
    parser.add_argument("--edit-split", default="train", choices=[s for s in SPLITS if s != "test"],
                        help="the StereoSet split the delta is computed from")
    parser.add_argument("--calibrations", nargs="+", default=["dev"], metavar="SPLIT[+SPLIT]",
                        help="calibration sets, each one split or several joined by '+' (pooled): every recipe is "
                             "calibrated on each")
    args = parse_study_arguments(parser, argv)
    pools = {pool: pool.split("+") for pool in args.calibrations}  # each set: its splits
    if any(split not in SPLITS or split == "test" for splits in pools.values() for split in splits):
        parser.error(f"--calibrations: splits of {[s for s in SPLITS if s != 'test']} joined by '+' "
                     f"(test is what is scored), not {args.calibrations}")

    config = DemoConfig(model=args.model, dtype=args.dtype, progress=False)
    peft_model, tokenizer, device = build_model(config)
    editor = BiasEditor.from_pretrained(args.editor, device=device)
    train = load_demo_items(args.edit_split, BIAS_TYPES, args.limit)
    calibration_sets = {pool: [item for split in splits for item in load_demo_items(split, BIAS_TYPES, args.limit)]
                        for pool, splits in pools.items()}
    for pool, calibration_items in calibration_sets.items():
        check_held_out(train, calibration_items, f"--calibrations {pool} (the delta is from {args.edit_split})")
    guard = guard_text_option(args.guard_text)
    started = time.perf_counter()
    grid = [JointRecipe(float(row.split(":")[0]), None if row.split(":")[1] == "learned" else float(row.split(":")[1]))
            for row in args.grid.split(",")]
    if args.preserve_text and not any(recipe.preserve for recipe in grid):
        parser.error("--preserve-text needs a --grid row with PRESERVE > 0")
    preserved = None
    if any(recipe.preserve for recipe in grid):
        preserved = keepable_keys(train, preserve_text_option(args.preserve_text))
        if preserved is None:  # --preserve-text unrelated, and some pairs lack an unrelated sentence
            raise nothing_to_preserve(train)
    statistics, n_tokens = pooled_statistics(editor, peft_model, tokenizer, train, args.batch_size, preserved)
    learned = {name: layer.learned_ridge for name, layer in statistics.items()}
    n_preserved = next(iter(statistics.values())).n_preserved
    print(f"pooled {len(train)} {args.edit_split} pairs, {n_tokens} tokens ({n_preserved} preserved tokens); "
          "learned lambda "
          + ", ".join(f"{layer.learned_ridge:.3g} (= {layer.learned_ridge / layer.system(0).mean_eigenvalue:.2e} x "
                      "mean eigenvalue)" for layer in statistics.values()), flush=True)
    benchmarks = ("stereoset", "crows") if args.crows else ("stereoset",)
    test_kwargs = dict(benchmarks=benchmarks, bias_types=list(BIAS_TYPES), limit=args.limit,
                       progress=False, n_resamples=1000)
    report = {**study_record(args), "editor": args.editor, "edit_split": args.edit_split, "n_train": len(train),
              "preserved": None if preserved is None else preserve_text_label(args.preserve_text) or UNRELATED_LABEL,
              "guard_text": guard_text_label(args.guard_text),
              "n_tokens": n_tokens,
              "n_preserved": n_preserved, "learned_lambda": learned, "rows": []}
    report["before"] = evaluate_model(peft_model, tokenizer, **test_kwargs)
    tested: dict[tuple[str, float], dict] = {}  # (recipe, scale) -> test metrics: one evaluation each
    for recipe in grid:
        solutions = recipe_solutions(statistics, recipe)
        for pool, calibration_items in calibration_sets.items():
            calibration = calibrate_joint_scale(editor, peft_model, tokenizer, solutions, calibration_items,
                                                calibration_score, batch_size=args.batch_size, guard_text=guard)
            key = (recipe.label, calibration["scale"])
            if key not in tested:
                with editor.edited(peft_model, scaled_solutions(solutions, calibration["scale"])):
                    tested[key] = evaluate_model(peft_model, tokenizer, **test_kwargs)
            after = tested[key]
            chosen = chosen_row(calibration)
            row = {"rho": "learned" if recipe.ridge is None else recipe.ridge, "preserve": recipe.preserve,
                   "calibrated_on": pool, "n_calibration": len(calibration_items), "scale": calibration["scale"],
                   "chosen": chosen, "calibration_rows": calibration["rows"], "test": after}
            report["rows"].append(row)
            ss = " / ".join(f"{after['stereoset'][t]['ss']:.2f}" for t in BIAS_TYPES)
            lms = " / ".join(f"{report['before']['stereoset'][t]['lms'] - after['stereoset'][t]['lms']:.2f}"
                             for t in BIAS_TYPES)
            crows = " / ".join(f"{v['metric']:.2f}" for v in after.get("crows", {}).values() if isinstance(v, dict))
            ppl = after["perplexity"] / report["before"]["perplexity"] - 1
            print(f"{recipe.label}, calibrated on {pool}: SS {chosen['ss_pre']:.2f} -> {chosen['ss_post']:.2f} "
                  f"at x{calibration['scale']:.3g}"
                  f" (selection {chosen['selection']:.2f}) | test SS {ss}, LMS drop {lms}, CrowS {crows}, "
                  f"ppl {100 * ppl:+.2f} %  [{time.perf_counter() - started:.0f} s]", flush=True)
            write_json(Path(args.out), report)
    b = report["before"]
    print("before: test SS " + " / ".join(f"{b['stereoset'][t]['ss']:.2f}" for t in BIAS_TYPES)
          + ", CrowS " + " / ".join(f"{v['metric']:.2f}" for v in b.get("crows", {}).values() if isinstance(v, dict))
          + f", ppl {b['perplexity']:.2f}")
    first = args.calibrations[0]
    best = min((r for r in report["rows"] if r["calibrated_on"] == first),
               key=lambda r: r["chosen"]["selection"])  # ties: the first row
    print(f"chosen on {first}: preserve {best['preserve']:g}, rho {best['rho']} (x{best['scale']:.3g})")
    return 0 if all(math.isfinite(r["chosen"]["selection"]) for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

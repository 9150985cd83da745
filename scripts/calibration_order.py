"""Does the order of the dev pairs decide the edit scale? The dev calibration with file-order and shuffled groups.

The trainer validates and calibrates on ``dev`` in groups of ``n_edits`` pairs taken in file order. StereoSet lists
the pairs of one target term together, and the bundled ``dev`` holds few target terms (3 gender, 13 race,
1 religion), so a file-order group edits 2-8 target terms at once, while a meta-training group (a shuffle of
``train``) edits 14-24 and a per-batch group of ``test`` 3-19. An edit of a few target terms may move SS further
per unit of edit than an edit of many. This script runs the edit-scale calibration
(``calibration.calibrate_edit_scale``, the trainer's selection rule) of one trained editor once per order, on the
same dev pairs in file order, in a seeded shuffle, or per bias type (``by-type``: groups of one bias type, as the
per-batch protocol edits them), and reports each candidate multiple's pooled dev SS, LMS and NLL rise, each bias
type's SS, and the multiple each order chooses. Multiples are relative to the saved editor, whose calibrated scale is
already baked in.

    python scripts/calibration_order.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --out runs/calibration-order-s0.json
    python scripts/calibration_order.py --model gemma3-270m --editor runs/gemma3/seed-0/editor \
        --split dev+train-calib --orders file,by-type --out runs/gemma3-by-type-s0.json   # the demo's pairs
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from _study_args import add_editor_study_arguments, load_study_editor, parse_study_arguments, study_record

from biasedit_peft._io import write_json
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.editor.cache import as_edit_sample
from biasedit_peft.editor.calibration import EDIT_SCALES, MAX_EDGE_STEPS, calibrate_edit_scale
from biasedit_peft.workflows.demo import load_demo_items
from biasedit_peft.workflows.protocols import edit_batches


def dev_groups(samples: list, size: int, order: str, shuffle_seed: int) -> list[list]:
    """``samples`` in groups of ``size``: in file order, after a seeded shuffle (``shuffled``), or per bias type in
    file order (``by-type``: the groups the per-batch protocol edits, ``protocols.edit_batches``)."""
    if order == "by-type":
        return [[samples[i] for i in indices] for indices in edit_batches(samples, size)]
    if order not in ("file", "shuffled"):
        raise ValueError(f"unknown order {order!r}; choose file, shuffled or by-type")
    indices = list(range(len(samples)))
    if order == "shuffled":
        random.Random(shuffle_seed).shuffle(indices)
    return [[samples[i] for i in indices[start:start + size]] for start in range(0, len(indices), size)]


def by_type_summary(row: dict) -> str:
    """``gender 63.1->50.2, race ...``: each bias type's SS before and after one row's multiple."""
    return ", ".join(f"{bias_type} {part['ss_pre']:.1f}->{part['ss_post']:.1f}"
                     for bias_type, part in row.get("by_type", {}).items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser)
    parser.add_argument("--n-edits", type=int, default=32, help="pairs per dev group (the trainer's n_edits)")
    parser.add_argument("--orders", default="file,shuffled", help="comma-separated: file, shuffled, by-type")
    parser.add_argument("--shuffle-seed", type=int, default=0)
    parser.add_argument("--split", default="dev",
                        help="the StereoSet split(s) calibrated on, '+'-joined in order (the demo's default "
                             "calibrates on dev+train-calib)")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in EDIT_SCALES))
    parser.add_argument("--edge-steps", type=int, default=0,
                        help="multiples past the grid's ends (calibration.next_edge_scale; the trainer's default "
                             f"is {MAX_EDGE_STEPS})")
    args = parse_study_arguments(parser, argv)

    peft_model, tokenizer, editor, _ = load_study_editor(args)
    items = [item for split in args.split.split("+") for item in load_demo_items(split, BIAS_TYPES, args.limit)]
    dev = [as_edit_sample(item, i) for i, item in enumerate(items)]
    scales = [float(s) for s in args.scales.split(",")]
    report = {**study_record(args), "editor": args.editor, "split": args.split, "n_dev": len(dev),
              "n_edits": args.n_edits, "orders": {}}
    started = time.perf_counter()
    for order in args.orders.split(","):
        groups = dev_groups(dev, args.n_edits, order, args.shuffle_seed)
        calibration = calibrate_edit_scale(editor, peft_model, tokenizer, groups, batch_size=args.batch_size,
                                           scales=scales, max_edge_steps=args.edge_steps)
        calibration["targets_per_group"] = [len({s.target for s in group}) for group in groups]
        report["orders"][order] = calibration
        write_json(Path(args.out), report)
        targets = calibration["targets_per_group"]
        print(f"{order} order ({sum(targets) / len(targets):.1f} target terms per group): chooses "
              f"x{calibration['scale']:g}; " + ", ".join(
                  f"x{row['scale']:g} SS {row['ss_pre']:.2f}->{row['ss_post']:.2f} LMS {row['lms_pre']:.2f}->"
                  f"{row['lms_post']:.2f} dNLL {row['nll_increase']:+.3f}" for row in calibration["rows"])
              + f" [{time.perf_counter() - started:.0f} s]", flush=True)
        for row in calibration["rows"]:
            print(f"    x{row['scale']:g}: {by_type_summary(row)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

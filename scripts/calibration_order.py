"""Does the order of the dev pairs decide the edit scale? The dev calibration with file-order and shuffled groups.

The trainer validates and calibrates on ``dev`` in groups of ``n_edits`` pairs taken in file order. StereoSet lists
the pairs of one target term together, and the bundled ``dev`` holds few target terms (3 gender, 13 race,
1 religion), so a file-order group edits 2-8 target terms at once, while a meta-training group (a shuffle of
``train``) edits 14-24 and a per-batch group of ``test`` 3-19. An edit of a few target terms may move SS further
per unit of edit than an edit of many. This script runs the edit-scale calibration
(``calibration.calibrate_edit_scale``, the trainer's selection rule) of one trained editor twice, on the same dev
pairs in file order and in a seeded shuffle, and reports each candidate multiple's pooled dev SS, LMS and NLL rise,
and the multiple each order chooses. Multiples are relative to the saved editor, whose calibrated scale is already
baked in.

    python scripts/calibration_order.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --out runs/calibration-order-s0.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from _study_args import add_editor_study_arguments, load_study_editor, parse_study_arguments

from biasedit_peft._io import write_json
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.editor.cache import as_edit_sample
from biasedit_peft.editor.calibration import EDIT_SCALES, calibrate_edit_scale
from biasedit_peft.workflows.demo import load_demo_items


def dev_groups(samples: list, size: int, shuffle_seed: int | None) -> list[list]:
    """``samples`` in groups of ``size``: in file order (``shuffle_seed`` None) or after a seeded shuffle."""
    order = list(range(len(samples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [[samples[i] for i in order[start:start + size]] for start in range(0, len(order), size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser)
    parser.add_argument("--n-edits", type=int, default=32, help="pairs per dev group (the trainer's n_edits)")
    parser.add_argument("--orders", default="file,shuffled", help="comma-separated: file, shuffled")
    parser.add_argument("--shuffle-seed", type=int, default=0)
    parser.add_argument("--split", default="dev", help="the StereoSet split calibrated on (e.g. train-calib)")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in EDIT_SCALES))
    args = parse_study_arguments(parser, argv)

    peft_model, tokenizer, editor, _ = load_study_editor(args)
    dev = [as_edit_sample(item, i) for i, item in enumerate(load_demo_items(args.split, BIAS_TYPES, args.limit))]
    scales = [float(s) for s in args.scales.split(",")]
    report = {"model": args.model, "editor": args.editor, "split": args.split, "n_dev": len(dev),
              "n_edits": args.n_edits, "orders": {}}
    started = time.perf_counter()
    for order in args.orders.split(","):
        groups = dev_groups(dev, args.n_edits, None if order == "file" else args.shuffle_seed)
        calibration = calibrate_edit_scale(editor, peft_model, tokenizer, groups, batch_size=args.batch_size,
                                           scales=scales)
        calibration["targets_per_group"] = [len({s.target for s in group}) for group in groups]
        report["orders"][order] = calibration
        write_json(Path(args.out), report)
        targets = calibration["targets_per_group"]
        print(f"{order} order ({sum(targets) / len(targets):.1f} target terms per group): chooses "
              f"x{calibration['scale']:g}; " + ", ".join(
                  f"x{row['scale']:g} SS {row['ss_pre']:.2f}->{row['ss_post']:.2f} LMS {row['lms_pre']:.2f}->"
                  f"{row['lms_post']:.2f} dNLL {row['nll_increase']:+.3f}" for row in calibration["rows"])
              + f" [{time.perf_counter() - started:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

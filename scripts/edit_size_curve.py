"""How much of an edit survives pooling: the paper's per-batch protocol at growing edit-set sizes, same items.

The per-batch protocol edits 32 items at a time and scores them; a deployed adapter is one solve over thousands.
Here one trained editor edits the ``test`` items in batches of each size in ``--sizes`` (per bias type, as the
per-batch protocol forms them; a size at least a type's item count is one joint solve of that type) and scores
the very items it edited. The items, the editor and the solve (its own ``lambda``, unscaled) are the same in
every row; only how many items share one solve changes. If SS returns toward its unedited value as the size
grows, the joint solve loses the edit by pooling, before any question of unseen items arises. ``--scales`` repeats
every size at multiples of the editor's edit (its step sizes ``lr``; the dev calibration's knob), e.g. to see how far
a scale chosen on ``dev`` is from the one ``test`` would need.

    python scripts/edit_size_curve.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --sizes 32,128,512,4096 --out runs/edit-size-curve.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _study_args import (
    add_editor_study_arguments,
    load_study_editor,
    parse_study_arguments,
    score_study_split,
    set_edit_multiple,
)

from biasedit_peft._io import write_json
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.workflows.protocols import per_batch_protocol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser)
    parser.add_argument("--sizes", default="32,128,512,4096", help="comma-separated items per edit")
    parser.add_argument("--split", default="test")
    parser.add_argument("--scales", default="1", help="comma-separated multiples of the editor's edit (its lr)")
    args = parse_study_arguments(parser, argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    scales = [float(scale) for scale in args.scales.split(",")]

    peft_model, tokenizer, editor, trained_lr = load_study_editor(args)
    started = time.perf_counter()
    items, unedited, report = score_study_split(args, peft_model, tokenizer)
    for scale, size in [(scale, size) for scale in scales for size in sizes]:
        set_edit_multiple(editor, trained_lr, scale)
        result = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=size,
                                    batch_size=args.batch_size, progress=False, unedited=unedited)
        report["rows"].append({"scale": scale, "edit_batch_size": size, "n_batches": result["n_batches"],
                               "before": result["before"], "after": result["after"]})
        write_json(Path(args.out), report)
        cells = ", ".join(f"{t} {result['before'][t]['ss']:.2f} -> {result['after'][t]['ss']:.2f} "
                          f"(LMS {result['before'][t]['lms']:.2f} -> {result['after'][t]['lms']:.2f})"
                          for t in BIAS_TYPES)
        print(f"x{scale:g}, {size} items per edit ({result['n_batches']} edits): SS {cells}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Would one edit multiple per bias type serve ``test`` better than one for all? Read from two calibration reports.

The trainer chooses one multiple of the editor's edit for every bias type, ranked on the pooled calibration pairs
(``calibration.calibrate_edit_scale``). On Gemma 3 270M that multiple overshot gender and left race and religion
short of 50. This script reads two reports of ``scripts/calibration_order.py`` made with the same multiples:

- ``--calibration``: the pairs the trainer calibrates on (``--split dev+train-calib``), in ``--order``;
- ``--test``: ``--split test --orders by-type``, the per-batch protocol's groups (item-level SS, not the reference
  SS's per-term average).

For each bias type it takes the multiple that the calibration pairs *of that type* rank best
(``calibration.target_score`` on the type's row, ties to the multiple nearest 1), and prints that type's test SS at
the pooled choice and at its own. It also prints test SS at the *balanced* choice: one multiple for every type, the
one whose types' target scores have the lowest mean (each type weighs the same, however few pairs it has; the
target is per type). Test only reports here: nothing is chosen on it.

    python scripts/per_type_transfer.py --calibration runs/gemma3-calib-s0.json --test runs/gemma3-test-s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import mean

from biasedit_peft._io import write_json
from biasedit_peft.editor.calibration import target_score


def rows_by_scale(report: dict, order: str) -> dict[float, dict]:
    """``{multiple: row}`` of one order of a ``calibration_order.py`` report."""
    if order not in report["orders"]:
        raise SystemExit(f"the report has no {order!r} order (it has {sorted(report['orders'])})")
    return {row["scale"]: row for row in report["orders"][order]["rows"]}


def best_multiple(rows: dict[float, dict], score: Callable[[dict], float]) -> float:
    """The multiple whose row has the lowest ``score`` (lower is better), ties to the multiple nearest 1, as the
    trainer's calibration breaks them."""
    return min(rows, key=lambda scale: (score(rows[scale]), abs(scale - 1.0)))


def per_type_choice(rows: dict[float, dict], bias_type: str) -> float:
    """The multiple whose ``by_type[bias_type]`` metrics score best (:func:`target_score`), ties nearest 1."""
    return best_multiple(rows, lambda row: target_score(row["by_type"][bias_type]))


def balanced_choice(rows: dict[float, dict]) -> float:
    """The one multiple with the lowest mean :func:`target_score` over its bias types, ties nearest 1."""
    return best_multiple(rows, lambda row: mean(target_score(metrics) for metrics in row["by_type"].values()))


def transfer_table(calibration: dict[float, dict], pooled_choice: float, test: dict[float, dict]) -> list[dict]:
    """One row per bias type: its calibration and test SS before, the multiple its calibration pairs choose, and its
    test SS and LMS at the pooled choice, at that multiple and at the balanced choice."""
    missing = sorted(set(calibration) - set(test))
    if missing:
        raise SystemExit(f"the test report lacks the multiples {missing}: run both with the same --scales")
    balanced = balanced_choice(calibration)
    table = []
    for bias_type in next(iter(test.values()))["by_type"]:
        own = per_type_choice(calibration, bias_type)
        at_pooled, at_own = test[pooled_choice]["by_type"][bias_type], test[own]["by_type"][bias_type]
        at_balanced = test[balanced]["by_type"][bias_type]
        table.append({"bias_type": bias_type, "n_test": at_own["n"],
                      "calibration_ss_pre": calibration[own]["by_type"][bias_type]["ss_pre"],
                      "calibration_n": calibration[own]["by_type"][bias_type]["n"],
                      "pooled_scale": pooled_choice, "own_scale": own, "test_ss_pre": at_own["ss_pre"],
                      "test_ss_pooled": at_pooled["ss_post"], "test_ss_own": at_own["ss_post"],
                      "test_lms_drop_pooled": at_pooled["lms_pre"] - at_pooled["lms_post"],
                      "test_lms_drop_own": at_own["lms_pre"] - at_own["lms_post"],
                      "balanced_scale": balanced, "test_ss_balanced": at_balanced["ss_post"],
                      "test_lms_drop_balanced": at_balanced["lms_pre"] - at_balanced["lms_post"]})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", required=True, help="calibration_order.py report on the calibration pairs")
    parser.add_argument("--order", default="file", help="its order to read (file: the trainer's groups)")
    parser.add_argument("--test", required=True, help="calibration_order.py report on --split test --orders by-type")
    parser.add_argument("--out", default=None, help="also write the table as JSON (never over an existing file)")
    args = parser.parse_args(argv)
    calibration_report = json.loads(Path(args.calibration).read_text())
    calibration = rows_by_scale(calibration_report, args.order)
    pooled_choice = calibration_report["orders"][args.order]["scale"]
    table = transfer_table(calibration, pooled_choice, rows_by_scale(json.loads(Path(args.test).read_text()),
                                                                     "by-type"))
    for row in table:
        print(f"{row['bias_type']}: its {row['calibration_n']} calibration pairs choose x{row['own_scale']:g} "
              f"(pooled x{row['pooled_scale']:g}); test SS {row['test_ss_pre']:.2f} -> {row['test_ss_pooled']:.2f} "
              f"pooled (LMS drop {row['test_lms_drop_pooled']:+.2f}), {row['test_ss_own']:.2f} own "
              f"(LMS drop {row['test_lms_drop_own']:+.2f}), {row['test_ss_balanced']:.2f} at the balanced "
              f"x{row['balanced_scale']:g} (LMS drop {row['test_lms_drop_balanced']:+.2f})")
    for key in ("pooled", "own", "balanced"):
        gaps = [abs(row[f"test_ss_{key}"] - 50.0) for row in table]
        print(f"mean |test SS - 50|, {key} multiple: {sum(gaps) / len(gaps):.2f}")
    if args.out:
        if Path(args.out).exists():
            raise SystemExit(f"--out {args.out} exists; not overwritten")
        write_json(Path(args.out), {"calibration": args.calibration, "order": args.order, "test": args.test,
                                    "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is the dev-chosen edit scale the one `test` needs? A scale chosen on half of `test`, scored on the other half.

The trainer calibrates an editor's edit scale on ``dev`` (``calibration.calibrate_edit_scale``: the multiple whose
pooled SS is closest to 50 within the LMS and NLL bounds). If ``test`` per-batch SS then stays far from 50, either
the choice is optimistic because ``dev`` chose it (selection), or ``test``'s pairs need another scale than ``dev``'s
(a shift between the two StereoSet files and their target terms). This script runs the paper's per-batch protocol
on ``--split`` at each multiple in ``--scales`` (relative to the saved editor, whose calibrated scale is baked in)
and keeps every item's scores. Then, for ``--halvings`` seeded splits of the target terms of each bias type
(``protocols.split_targets``), it chooses the multiple on one half by the calibration's own rule and reports the
other half's per-type SS and LMS at that multiple and at x1 (dev's choice). Target terms never cross halves, so
the reported half is held out from the choice, as ``test`` is from ``dev``; if the held-out half lands near 50, the
scale ``dev`` chose, not selection, is what kept ``test`` away.

    python scripts/scale_transfer.py --model smollm2-135m --editor runs/smollm2/seed-0/editor \
        --scales 0.71,1,1.41,2,2.83 --out runs/scale-transfer-s0.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _study_args import (
    add_editor_study_arguments,
    load_study_editor,
    parse_study_arguments,
    score_study_split,
    set_edit_multiple,
)

from biasedit_peft._io import write_json
from biasedit_peft.data import BIAS_TYPES
from biasedit_peft.editor.calibration import rank_scales, target_score
from biasedit_peft.editor.losses import abs_debias_loss, pair_gap, token_debias_loss
from biasedit_peft.evaluation import STEREOSET_ROLES, stereoset_results
from biasedit_peft.scoring import SentenceLogProbs
from biasedit_peft.workflows.protocols import per_batch_protocol, split_targets

Scores = dict[str, SentenceLogProbs]


def role_means(scores: Scores, rows: torch.Tensor) -> torch.Tensor:
    """Mean token log-probs ``[3, K]`` (stereotype, anti-stereotype, unrelated) of the items at ``rows`` ``[K]``."""
    return torch.stack([scores[role].mean[rows] for role in STEREOSET_ROLES])


def subset(scores: Scores, rows: torch.Tensor) -> Scores:
    """The role scores of the items at ``rows``."""
    return {role: s[rows] for role, s in scores.items()}


def gap_summary(scores: Scores) -> dict[str, float]:
    """How the pairs' gaps ``delta = mean_logp(s) - mean_logp(a)`` ``[N]`` sit: their mean and median, the share
    with ``delta > 0`` (reference SS before the per-term average), and the mean ``token`` and ``abs`` debias losses
    (``losses.py``). An edit that shrinks each gap in proportion lowers the losses and leaves the share."""
    stereo, anti = scores["stereotype"], scores["anti-stereotype"]
    gap = pair_gap(stereo, anti)
    return {"mean": gap.mean().item(), "median": gap.median().item(),
            "share_positive": (gap > 0).double().mean().item(),
            "token_loss": token_debias_loss(stereo, anti).mean().item(),
            "abs_loss": abs_debias_loss(stereo, anti).mean().item()}


def format_gaps(summary: dict[str, float]) -> str:
    return (f"gap mean {summary['mean']:+.4f}, median {summary['median']:+.4f}, share > 0 "
            f"{summary['share_positive']:.3f}, token loss {summary['token_loss']:.4f}, "
            f"abs loss {summary['abs_loss']:.4f}")


def halves(items: list, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``([K1], [K2])`` of the items whose target is in the edit / scored half of ``split_targets``."""
    choose, report = split_targets(items, seed).sides(items)
    return torch.tensor(choose), torch.tensor(report)


def transfer(items: list, before: Scores, after: dict[float, Scores], seed: int) -> dict:
    """Choose the multiple on one half by the calibration's ranking (``rank_scales`` with ``target_score``) and
    score the other half per bias type at it and at x1."""
    choose, report = halves(items, seed)
    chosen = rank_scales(role_means(before, choose), {scale: role_means(scores, choose)
                                                      for scale, scores in after.items()}, target_score)["scale"]
    reported = [items[i] for i in report.tolist()]

    def per_type(scores: Scores) -> dict[str, dict[str, float]]:
        result = stereoset_results(reported, subset(scores, report), "reference", n_resamples=0)
        return {t: {"ss": result[t]["ss"], "lms": result[t]["lms"]} for t in BIAS_TYPES}

    return {"seed": seed, "chosen": chosen, "before": per_type(before), "chosen_after": per_type(after[chosen]),
            "x1_after": per_type(after[1.0]) if 1.0 in after else None}


def summary(halvings: list[dict], key: str) -> dict[str, dict[str, float]]:
    """Mean, min and max over halvings of the reported half's SS and LMS drop per bias type under ``key``, and in
    how many halvings it met issue 13's per-batch target (|SS - 50| <= 3 with an LMS drop of at most 3)."""
    result = {}
    for t in BIAS_TYPES:
        ss = [h[key][t]["ss"] for h in halvings]
        drop = [h["before"][t]["lms"] - h[key][t]["lms"] for h in halvings]
        result[t] = {"ss_mean": statistics.fmean(ss), "ss_min": min(ss), "ss_max": max(ss),
                     "lms_drop_mean": statistics.fmean(drop), "lms_drop_max": max(drop),
                     "target_met": sum(abs(v - 50.0) <= 3.0 and d <= 3.0 for v, d in zip(ss, drop))}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_editor_study_arguments(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--scales", default="0.71,1,1.41,2,2.83", help="multiples of the saved editor's edit")
    parser.add_argument("--edit-batch-size", type=int, default=32)
    parser.add_argument("--halvings", type=int, default=50)
    args = parse_study_arguments(parser, argv)
    scales = [float(scale) for scale in args.scales.split(",")]

    peft_model, tokenizer, editor, trained_lr = load_study_editor(args)
    started = time.perf_counter()
    items, before, report = score_study_split(args, peft_model, tokenizer)
    after: dict[float, Scores] = {}
    report["gaps_before"] = gap_summary(before)
    print(f"before: {format_gaps(report['gaps_before'])}", flush=True)
    for scale in scales:
        set_edit_multiple(editor, trained_lr, scale)
        result = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=args.edit_batch_size,
                                    batch_size=args.batch_size, progress=False, unedited=before, keep_scores=True)
        after[scale] = result["scores"]["after"]
        report["rows"].append({"scale": scale, "before": result["before"], "after": result["after"],
                               "gaps": gap_summary(after[scale])})
        write_json(Path(args.out), report)
        cells = ", ".join(f"{t} {result['before'][t]['ss']:.2f} -> {result['after'][t]['ss']:.2f} (LMS drop "
                          f"{result['before'][t]['lms'] - result['after'][t]['lms']:.2f})" for t in BIAS_TYPES)
        print(f"x{scale:g}: SS {cells} [{time.perf_counter() - started:.0f} s]", flush=True)
        print(f"    {format_gaps(report['rows'][-1]['gaps'])}", flush=True)
    if not args.halvings:
        return 0
    halvings = [transfer(items, before, after, seed) for seed in range(args.halvings)]
    report["halvings"] = halvings
    report["chosen_counts"] = {f"{s:g}": sum(h["chosen"] == s for h in halvings) for s in scales}
    report["held_out_half"] = {"chosen": summary(halvings, "chosen_after")}
    if 1.0 in after:
        report["held_out_half"]["x1"] = summary(halvings, "x1_after")
    write_json(Path(args.out), report)
    print(f"{args.halvings} halvings: chosen multiples {report['chosen_counts']}")
    for key, table in report["held_out_half"].items():
        print(f"held-out half at {key}: " + ", ".join(
            f"{t} SS {v['ss_mean']:.2f} ({v['ss_min']:.2f}-{v['ss_max']:.2f}), LMS drop {v['lms_drop_mean']:.2f} "
            f"(max {v['lms_drop_max']:.2f}), target met in {v['target_met']}" for t, v in table.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

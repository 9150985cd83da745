"""One markdown row per demo run: the paper's per-batch protocol beside the deployment protocol (issue 15's levers).

    python scripts/lever_table.py default=runs/tb/default-s0 held-out-loss=runs/tb/heldout-s0 ...

Each ``LABEL=FOLDER`` is a ``biasedit demo`` output folder (its ``results.json``). Every number is read from those
files: per-batch SS after, deployment-adapter SS after (with whether it left the before-CI), its LMS drop,
CrowS-Pairs after, the perplexity change, and the joint scale the dev calibration chose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from biasedit_peft.data import BIAS_TYPES


def row(label: str, results: dict) -> str:
    """The markdown row of one demo's ``results.json``."""
    before, after = results["before"], results["after"]
    per_batch = results["protocols"]["per_batch"]["after"]

    def deployed(bias_type: str) -> str:
        check = results["targets"]["deployment"][bias_type]
        return f"{check['ss_after']:.1f}{'' if check['ss_outside_ci'] else '*'}"

    crows = " / ".join(f"{after['crows'][t]['metric']:.1f}" for t in ("gender", "race-color", "religion")
                       if t in after.get("crows", {}))
    drops = " / ".join(f"{before['stereoset'][t]['lms'] - after['stereoset'][t]['lms']:.1f}" for t in BIAS_TYPES)
    ppl = 100 * (after["perplexity"] / before["perplexity"] - 1)
    edited = " / ".join(f"{per_batch[t]['ss']:.1f}" for t in BIAS_TYPES)
    return (f"| {label} | {edited} | "
            f"{' / '.join(deployed(t) for t in BIAS_TYPES)} | {drops} | {crows} | {ppl:+.1f} % | "
            f"{results['protocols']['deployment']['scale']:.3g} | {results['training']['best_step']} |")


HEADER = ("| run | per-batch SS after (g / r / rel) | deployment SS after (g / r / rel; * inside the before-CI) | "
          "deployment LMS drop | deployment CrowS after (g / race-color / rel) | perplexity | joint scale | "
          "kept step |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    lines = [HEADER]
    for spec in argv:
        label, _, folder = spec.partition("=")
        lines.append(row(label, json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

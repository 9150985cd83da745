"""Seconds per meta-step of the working tree against a git revision, in alternating processes (A, B, A, B, ...).

    python scripts/revision_timing.py --base f1d5513 --model smollm2-135m --pairs 2

The base revision is checked out in a temporary git worktree; each process imports the package from one tree
(``PYTHONPATH``), meta-trains a fresh editor of the model's preset on ``train`` in every dtype, and times
``--rounds`` meta-steps after a warm-up, the dtypes interleaved. Both trees see the same batches and the same seed,
so their losses are printed side by side: a change meant to leave the numbers alone shows equal losses. The
medians, the head / base speed-up per pair and the load average before and after are printed; ``--out`` writes
them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from biasedit_peft._io import write_json

ROOT = Path(__file__).resolve().parent.parent

MEASURE = """
import json, statistics, sys, tempfile, time
from biasedit_peft.workflows.bench import BenchConfig, _trainer
model, rounds, dtypes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
trainers = {dtype: _trainer(BenchConfig(model=model), tempfile.mkdtemp(), dtype) for dtype in dtypes}
batches = trainers[dtypes[0]]._batches(trainers[dtypes[0]].train_data, 0)
seconds, losses = {dtype: [] for dtype in dtypes}, {dtype: [] for dtype in dtypes}
for number in range(rounds + 1):
    for dtype, trainer in trainers.items():
        start = time.perf_counter()
        metrics = trainer.edit_step(batches[number % len(batches)], train=True)
        if number:
            seconds[dtype].append(time.perf_counter() - start)
            losses[dtype].append(metrics["loss"])
print(json.dumps({"median_s": {d: statistics.median(s) for d, s in seconds.items()}, "losses": losses}))
"""


def measure(tree: Path, model: str, rounds: int, dtypes: str) -> dict:
    """One process importing ``biasedit_peft`` from ``tree``: ``{"median_s": {dtype: s}, "losses": {...}}``."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", MEASURE, model, str(rounds), dtypes], cwd=tree, env=environment,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"timing in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--pairs", type=int, default=2, help="base / head process pairs (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="timed meta-steps per process after a warm-up")
    parser.add_argument("--out", help="write the result as JSON here (refused if it exists)")
    args = parser.parse_args(argv)
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} exists; choose another path")
    result: dict = {"base": args.base, "model": args.model, "load_average": {"start": os.getloadavg()}, "pairs": []}
    with tempfile.TemporaryDirectory() as folder:
        base_tree = Path(folder) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base_tree), args.base],
                       check=True)
        try:
            for number in range(args.pairs):
                pair = {"base": measure(base_tree, args.model, args.rounds, args.dtypes),
                        "head": measure(ROOT, args.model, args.rounds, args.dtypes)}
                pair["speedup"] = {dtype: pair["base"]["median_s"][dtype] / pair["head"]["median_s"][dtype]
                                   for dtype in pair["head"]["median_s"]}
                result["pairs"].append(pair)
                print(f"pair {number}: " + "; ".join(
                    f"{dtype} base {pair['base']['median_s'][dtype]:.2f} s, head {pair['head']['median_s'][dtype]:.2f}"
                    f" s ({pair['speedup'][dtype]:.2f}x), losses equal: "
                    f"{pair['base']['losses'][dtype] == pair['head']['losses'][dtype]}" for dtype in pair["speedup"]),
                    flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    result["load_average"]["end"] = os.getloadavg()
    result["median_speedup"] = {dtype: statistics.median(pair["speedup"][dtype] for pair in result["pairs"])
                                for dtype in result["pairs"][0]["speedup"]}
    print("head / base speed-up, median over pairs: "
          + ", ".join(f"{dtype} {value:.2f}x" for dtype, value in result["median_speedup"].items())
          + f"; load average {result['load_average']['start'][0]:.1f} -> {result['load_average']['end'][0]:.1f}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""The demo over several seeds, reported as mean and range (seeds repeat on one machine, not across CPUs).

    python scripts/seed_spread.py --out runs/testbed --seeds 0,1,2                       # the bundled testbed
    python scripts/seed_spread.py --out runs/smollm2 --seeds 0,1,2 -- --model smollm2-135m
    python scripts/seed_spread.py --out runs/smollm2 --seeds 0,1,2 --no-run --json spread.json
    python scripts/seed_spread.py --out runs/smollm2 --seeds 1 --no-run --run other=runs/other-demo
    python scripts/seed_spread.py --out runs/smollm2 --seeds 0,1 --per-batch-stages      # runs stopped after per-batch

Each seed runs ``biasedit demo --seed N --out OUT/seed-N`` (arguments after ``--`` are passed on; a seed whose
``results.json`` exists is not run again, a killed one is resumed), then one markdown table gives, per metric,
the mean, the range and every seed's value. Nothing here computes a metric: every number is read from the
seeds' ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

from biasedit_peft._io import resume_source, run_folder, write_json
from biasedit_peft.models import cpu_label
from biasedit_peft.workflows.demo import NOT_FINGERPRINTED

RESULTS = "results.json"


def run_seed(out: Path, seed: int, demo_args: list[str]) -> Path:
    """``biasedit demo`` for ``seed`` into ``out/seed-N`` unless its results exist; returns that folder."""
    folder = out / f"seed-{seed}"
    if not (folder / RESULTS).is_file():
        resume = ["--resume"] if run_folder(folder).is_dir() else []  # a killed demo waits there
        command = [sys.executable, "-m", "biasedit_peft", "demo", "--seed", str(seed), "--out", str(folder),
                   "--quiet", *resume, *demo_args]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return folder


def protocol_rows(label: str, protocol: dict) -> dict[str, float]:
    """SS before / after, ``|SS - 50|`` after and the LMS drop per bias type of a protocol's ``before`` / ``after``."""
    rows: dict[str, float] = {}
    for bias_type, entry in protocol["after"].items():
        before = protocol["before"][bias_type]
        rows[f"{label} {bias_type} SS before"] = before["ss"]
        rows[f"{label} {bias_type} SS after"] = entry["ss"]
        rows[f"{label} {bias_type} |SS - 50| after"] = abs(entry["ss"] - 50.0)  # its mean: over- and undershoot
        rows[f"{label} {bias_type} LMS drop"] = before["lms"] - entry["lms"]
    return rows


def per_batch_units(per_batch: dict) -> list[tuple[str, dict]]:
    """The per-batch protocol in reference units, and in the paper code's where the run recorded them."""
    units = [("per-batch", per_batch)]
    if "other_units" in per_batch:
        units.append(("per-batch, paper-code SS", per_batch["other_units"]))
    return units


def kept_editor_rows(training: dict) -> dict[str, float]:
    """The kept editor's meta-step and calibrated edit scale (``results.json`` -> ``training``)."""
    rows: dict[str, float] = {}
    if training.get("best_step") is not None:
        rows["kept editor: meta-step"] = training["best_step"]
    if training.get("calibration"):
        rows["kept editor: edit scale"] = training["calibration"]["scale"]
    return rows


def metric_rows(results: dict) -> dict[str, float]:
    """``label -> value`` of the figures the README quotes, from one demo's ``results.json``."""
    protocols = results["protocols"]
    units = per_batch_units(protocols["per_batch"])
    units.append(("held-out targets", protocols["held_out"]))
    if "joint_on_test" in protocols:
        units.append(("joint delta from test", protocols["joint_on_test"]))
    shipped = "deployment adapter" if "deployment" in protocols else "joint adapter"  # demos before the deployment
    units.append((shipped, {"before": results["before"]["stereoset"], "after": results["after"]["stereoset"]}))
    for key in ("gender_swapped",):
        if key in results["after"] and key in results["before"]:
            units.append((f"{shipped}, gender-swapped", {"before": results["before"][key],
                                                          "after": results["after"][key]}))
    rows: dict[str, float] = {}
    for label, protocol in units:
        rows.update(protocol_rows(label, protocol))
    for bias_type, entry in results["after"].get("crows", {}).items():
        rows[f"CrowS-Pairs {bias_type} before"] = results["before"]["crows"][bias_type]["metric"]
        rows[f"CrowS-Pairs {bias_type} after"] = entry["metric"]
    rows["perplexity before"] = results["before"]["perplexity"]
    rows["perplexity after"] = results["after"]["perplexity"]
    rows["perplexity change %"] = 100 * (results["after"]["perplexity"] / results["before"]["perplexity"] - 1)
    rows.update(kept_editor_rows(results["training"]))
    if "deployment" in protocols:
        rows["deployment adapter: joint scale"] = protocols["deployment"]["scale"]
    rows["seconds, total"] = results["seconds"]["total"]
    return rows


def stage_record(folder: Path, name: str) -> dict:
    """A demo's stage record ``stages/NAME.json``: in its run folder (``.seed-N.run``) while stopped, else its own."""
    return json.loads((resume_source(folder) / "stages" / f"{name}.json").read_text(encoding="utf-8"))


def stage_rows(folder: Path) -> dict[str, float]:
    """The per-batch rows and the kept editor of a demo stopped once its per-batch protocol was written: read from
    its stages (:func:`stage_record`), with the seconds those stages took."""
    per_batch, training = (stage_record(folder, name) for name in ("per_batch_protocol", "train_editor"))
    rows: dict[str, float] = {}
    for label, protocol in per_batch_units(per_batch["result"]):
        rows.update(protocol_rows(label, protocol))
    rows.update(kept_editor_rows(training["result"]))
    rows["seconds, train_editor stage (its last session)"] = training["seconds"]
    return rows


def config_differences(configs: list[dict]) -> dict[str, list]:
    """``{field: [value per run]}`` of the demo settings (``DemoConfig``: ``stages/config.json`` or ``results.json``'s
    ``config``) that differ between runs, ``seed`` aside: runs made with other flags, or in another dtype, are not
    one recipe's spread."""
    names = sorted({name for config in configs for name in config} - {"seed", *NOT_FINGERPRINTED})
    return {name: [config.get(name) for config in configs] for name in names
            if any(config.get(name) != configs[0].get(name) for config in configs)}


def refuse_other_recipes(parser: argparse.ArgumentParser, configs: list[dict], runs: str, where: str) -> None:
    """Exit through ``parser.error`` naming the fields when ``configs`` differ (:func:`config_differences`)."""
    differing = config_differences(configs)
    if differing:
        parser.error(f"{runs} differ in {differing} ({where}): not one recipe")


def spread(per_seed: dict[int | str, dict[str, float]]) -> dict[str, dict]:
    """``label -> {"mean", "min", "max", "seeds": {run: value}}`` over the labels every run has (a run is a seed, or
    the label of a ``--run``)."""
    labels = [label for label in next(iter(per_seed.values())) if all(label in rows for rows in per_seed.values())]
    table = {}
    for label in labels:
        values = {seed: rows[label] for seed, rows in per_seed.items()}
        table[label] = {"mean": mean(values.values()), "min": min(values.values()), "max": max(values.values()),
                        "seeds": values}
    return table


def cpu_line(cpus: dict[int | str, dict | None]) -> str:
    """Which CPU made each run (``results.json`` -> ``environment.cpu``): seeds repeat on one CPU, not across CPUs,
    so a table that mixes CPUs says so."""
    names: dict[str, list[str]] = {}
    for run, cpu in cpus.items():
        name = cpu_label(cpu) if cpu else "not recorded"
        names.setdefault(name, []).append(f"seed {run}" if isinstance(run, int) else str(run))
    text = "; ".join(f"{name}: {', '.join(runs)}" for name, runs in names.items())
    return f"CPU {text}" if len(names) == 1 else f"CPUs differ (seeds do not repeat across CPUs): {text}"


def markdown(table: dict[str, dict]) -> str:
    seeds = list(next(iter(table.values()))["seeds"])
    lines = ["| metric | mean | range | " + " | ".join(f"seed {s}" if isinstance(s, int) else s for s in seeds) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for label, row in table.items():
        cells = " | ".join(f"{row['seeds'][s]:.2f}" for s in seeds)
        lines.append(f"| {label} | {row['mean']:.2f} | {row['min']:.2f} - {row['max']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the seeds' demo folders (seed-N)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-run", action="store_true", help="only read the seeds' results.json")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=FOLDER",
                        help="also read the finished demo in FOLDER as a run named LABEL (repeatable; never run)")
    parser.add_argument("--per-batch-stages", action="store_true",
                        help="read seeds stopped once their per-batch protocol was written (OUT/.seed-N.run/stages); "
                        "never run")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the table here")
    args = parser.parse_args(own)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.per_batch_stages:
        if args.run or demo_args:
            parser.error("--per-batch-stages reads the seeds' stages only: no --run, no demo arguments")
        stopped = {seed: out / f"seed-{seed}" for seed in seeds}
        refuse_other_recipes(parser, [stage_record(folder, "config")["config"] for folder in stopped.values()],
                             "the seeds' runs", "stages/config.json")
        table = spread({seed: stage_rows(folder) for seed, folder in stopped.items()})
        print("CPU not recorded in the stages; the per-batch protocol and the kept editor only")
        print(markdown(table))
        if args.json_path:
            write_json(args.json_path, table, indent=1)
        return
    folders: dict[int | str, Path] = {}
    for seed in seeds:
        folders[seed] = out / f"seed-{seed}" if args.no_run else run_seed(out, seed, demo_args)
    for text in args.run:
        label, _, folder = text.partition("=")
        if not label or not folder:
            parser.error(f"--run takes LABEL=FOLDER, got {text!r}")
        folders[label] = Path(folder)
    results = {run: json.loads((folder / RESULTS).read_text(encoding="utf-8")) for run, folder in folders.items()}
    refuse_other_recipes(parser, [result["config"] for result in results.values() if "config" in result], "the runs",
                         "results.json config")
    table = spread({run: metric_rows(result) for run, result in results.items()})
    print(cpu_line({run: result.get("environment", {}).get("cpu") for run, result in results.items()}))
    print(markdown(table))
    if args.json_path:
        write_json(args.json_path, table, indent=1)  # atomic: a kill leaves the old file or the new one


if __name__ == "__main__":
    main()

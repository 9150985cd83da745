"""Markdown tables for docs/results.md from the JSON that ``biasedit demo`` and ``biasedit bench`` wrote.

    python scripts/results_tables.py --demo demo/results.json --bench bench/bench.json > tables.md

Nothing here computes a metric: every number is read from those files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biasedit_peft.workflows.bench import partial_lines


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def demo_tables(results: dict) -> list[str]:
    before, after = results["before"], results["after"]
    lines = ["| bias type | SS before | SS after | LMS before | LMS after | ICAT before | ICAT after | n |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for bias_type, entry in after["stereoset"].items():
        b = before["stereoset"][bias_type]
        lines.append(f"| {bias_type} | {_f(b['ss'])} | {_f(entry['ss'])} | {_f(b['lms'])} | {_f(entry['lms'])} | "
                     f"{_f(b['icat'])} | {_f(entry['icat'])} | {entry['n']} |")
    lines += ["", "| CrowS-Pairs | before | after | n |", "| --- | --- | --- | --- |"]
    for bias_type, entry in after.get("crows", {}).items():
        lines.append(f"| {bias_type} | {_f(before['crows'][bias_type]['metric'])} | {_f(entry['metric'])} | "
                     f"{entry['n']} |")
    lines += ["", f"Perplexity (bundled neutral text): {_f(before['perplexity'])} before, "
                  f"{_f(after['perplexity'])} after.", ""]
    for name, label in (("per_batch", "Per-batch protocol (the paper's)"), ("held_out", "Held-out target terms")):
        protocol = results["protocols"][name]
        lines += [f"**{label}**" + (f" (edit batches of {protocol['edit_batch_size']})" if name == "per_batch" else
                                    f" ({protocol['n_edit_items']} edit items, {protocol['n_items']} scored items)"),
                  "", "| bias type | SS before | SS after | LMS before | LMS after | n |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for bias_type, entry in protocol["after"].items():
            b = protocol["before"][bias_type]
            lines.append(f"| {bias_type} | {_f(b['ss'])} | {_f(entry['ss'])} | {_f(b['lms'])} | {_f(entry['lms'])} | "
                         f"{entry['n']} |")
        lines.append("")
    bias_types = results["config"]["bias_types"]
    lines += ["| target: \\|SS-50\\| <= 3 and LMS drop <= 3 | " + " | ".join(bias_types) + " |",
              "| --- |" + " --- |" * len(bias_types)]
    for name, check in results["targets"].items():
        cells = []
        for bias_type in results["config"]["bias_types"]:
            row = check[bias_type]
            verdict = "met" if row["ss_ok"] and row["lms_ok"] else "not met"
            cells.append(f"{verdict} (SS {row['ss']:.1f}, LMS drop {row['lms_drop']:+.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    merged = results.get("merged")
    if merged:
        lines += ["", f"Merged checkpoint reloaded with transformers alone: max |metric difference| "
                      f"{merged['max_abs_metric_difference']:.2e} against base + adapter; max |weight change| "
                      f"{merged['max_abs_weight_change']:.3e}."]
    seconds = results["seconds"]
    lines += ["", "Wall-clock seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    return lines


def triple(section: dict, metric: str) -> str:
    """``metric`` of gender / race / religion as ``a / b / c``."""
    return " / ".join(f"{section[t][metric]:.1f}" for t in ("gender", "race", "religion") if t in section)


def bench_tables(results: dict) -> list[str]:
    sections, lines = results["sections"], []
    if "speed" in sections:
        s = sections["speed"]
        t = s["seconds_per_step"]
        lines += ["| meta-training step | median s | min s | max s | samples / s |", "| --- | --- | --- | --- | --- |",
                  f"| {s['n_edits']} edits, LM batch {s['batch_size']} | {t['median_s']:.3f} | {t['min_s']:.3f} | "
                  f"{t['max_s']:.3f} | {s['samples_per_second']:.1f} |", ""]
    if "solve" in sections:
        lines += ["| joint delta | tokens | caching s | primal solve ms | dual solve ms | auto "
                  "| hyper-network + solve, all layers ms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in sections["solve"]["sizes"]:
            forms = {form: (f"{1e3 * r['median_s']:.1f}" if "median_s" in r else r["skipped"])
                     for form, r in row["solve_one_layer"].items()}
            lines.append(f"| {row['n_samples']} samples | {row['n_tokens']} | {row['cache_seconds']:.2f} | "
                         f"{forms['primal']} | {forms['dual']} | {row['auto_form']} | "
                         f"{1e3 * row['predict_all_layers']['median_s']:.1f} |")
        lines.append("")
    if "forward" in sections:
        f = sections["forward"]
        lines += [f"| forward pass, batch {f['batch']} | median ms | vs base |", "| --- | --- | --- |",
                  f"| base | {1e3 * f['base']['median_s']:.1f} | |",
                  f"| unmerged adapter | {1e3 * f['unmerged_adapter']['median_s']:.1f} | "
                  f"{f['overhead_unmerged_pct']:+.1f} % |",
                  f"| merged | {1e3 * f['merged']['median_s']:.1f} | {f['overhead_merged_pct']:+.1f} % |", ""]
    if "memory" in sections:
        m = sections["memory"]
        lines += ["| phase (fresh process) | RSS after loading MiB | peak RSS during the phase MiB |",
                  "| --- | --- | --- |"]
        for phase in ("meta_training", "debiasing"):
            lines.append(f"| {phase} | {m[phase]['rss_after_load_mib']:.0f} | {m[phase]['peak_rss_mib']:.0f} |")
        lines.append("")
    if "size" in sections:
        z = sections["size"]
        lines += [f"| adapter storage ({z['n_samples']} samples, {z['n_tokens']} tokens) | KiB | relative error |",
                  "| --- | --- | --- |", f"| as written by debias | {z['as_written_by_debias'] / 1024:.0f} | 0 |",
                  f"| dense | {z['dense'] / 1024:.0f} | 0 |", f"| factored | {z['factored'] / 1024:.0f} | 0 |"]
        for rank, row in z["lora"].items():
            lines.append(f"| LoRA rank {rank} | {row['bytes'] / 1024:.0f} | {row['relative_error']:.3f} |")
        lines.append("")
    quality = {k: v for k, v in sections.get("quality", {}).items() if k not in ("section_seconds", "partial")}
    if quality:
        lines += ["| variant | edited layers | per-batch SS (g / r / rel) | per-batch LMS (g / r / rel) | "
                  "held-out SS | held-out LMS | deployment SS | deployment LMS |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, q in quality.items():
            layers = ", ".join(layer.split(".")[-3] for layer in q["edited_layers"])
            shipped = q.get("after_deployment", q.get("after_joint"))  # benches before the deployment protocol
            lines.append(f"| {name} | blocks {layers} | {triple(q['per_batch']['after'], 'ss')} | "
                         f"{triple(q['per_batch']['after'], 'lms')} | {triple(q['held_out']['after'], 'ss')} | "
                         f"{triple(q['held_out']['after'], 'lms')} | {triple(shipped['stereoset'], 'ss')} | "
                         f"{triple(shipped['stereoset'], 'lms')} |")
        first = next(iter(quality.values()))
        lines += ["", "Before any edit: per-batch SS " + triple(first["per_batch"]["before"], "ss") + ", LMS "
                  + triple(first["per_batch"]["before"], "lms") + "; held-out SS "
                  + triple(first["held_out"]["before"], "ss") + ", LMS "
                  + triple(first["held_out"]["before"], "lms") + "."]
    return lines + [f"**{line}**" for line in partial_lines(sections)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", type=Path, default=None)
    parser.add_argument("--bench", type=Path, default=None)
    args = parser.parse_args()
    if args.demo:
        print("\n".join(demo_tables(json.loads(args.demo.read_text()))))
        print()
    if args.bench:
        print("\n".join(bench_tables(json.loads(args.bench.read_text()))))


if __name__ == "__main__":
    main()

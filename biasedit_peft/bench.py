"""``biasedit bench``: quality, speed, memory and size figures that anyone can rerun with one command.

Sections (each a function returning a JSON-ready dict):

- ``quality``: the demo's metrics (``demo.run_demo``) for the default editor (``token`` loss) and its
  ablations — the ``paper`` loss variant, no retention loss (``loc_coef = 0``, the paper's ablation), and
  editing the first vs the last blocks (the paper's block sweep);
- ``speed``: seconds per meta-training step and samples per second at a given edit-batch shape;
- ``solve``: time to compute one joint delta for 128 / 1024 samples, primal vs dual ridge solve;
- ``forward``: forward-pass time of the base model, the model with an unmerged adapter, and merged;
- ``memory``: peak resident memory of meta-training and of debiasing (each in a fresh process; on Linux
  the peak is reset after loading, so it is the phase's own peak);
- ``size``: adapter bytes, dense vs factored vs LoRA exports at a few ranks.

Timings are medians over ``repeats`` runs after one warm-up, with min and max.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .demo import DemoConfig, build_model, editor_preset, environment, load_demo_items
from .editor.editor import atomic_write_text
from .models import default_device

SECTIONS = ("speed", "solve", "forward", "memory", "size", "quality")


@dataclass
class BenchConfig:
    """What to measure and how often."""

    model: str = "testbed"
    out: str = "bench"
    preset: str | None = None
    """Editor preset name (default: ``testbed``'s own for the testbed, else by model type)."""
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 5
    n_edits: int = 32
    """Edit-batch shape of the speed section (samples per meta-step)."""
    batch_size: int | None = None
    """Sentence pairs per LM forward pass (default: the model family's preset)."""
    forward_repeats: int = 20
    """Round-robin rounds of the forward section."""
    solve_sizes: tuple[int, ...] = (128, 1024)
    max_system: int = 8192
    """Skip timing a ridge system larger than this (the dual of 1024 samples is ~25k x 25k)."""
    lora_ranks: tuple[int, ...] = (1, 4, 16, 64)
    quality_steps: int = 150
    quality_eval_every: int = 25
    limit: int | None = None
    """First N test / train items per bias type in the quality, size and memory sections (quick runs)."""
    seed: int = 0
    device: str | None = None
    progress: bool = True


def timed(function: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median, min and max wall-clock seconds of ``repeats`` calls after one warm-up call."""
    function()
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "repeats": len(seconds)}


def _demo_config(config: BenchConfig, **overrides) -> DemoConfig:
    return DemoConfig(model=config.model, preset=config.preset, device=config.device, seed=config.seed, progress=False,
                      **overrides)


def _fresh_editor(peft_model, config: BenchConfig, output_dir: str = "unused", **training):
    """An untrained editor of the preset and its training arguments (``n_edits`` / LM batch from ``config``)."""
    return editor_preset(config.model, peft_model, config.preset).editor_and_arguments(
        peft_model, output_dir, n_edits=config.n_edits, batch_size=config.batch_size, seed=config.seed,
        progress=False, **training)


def _trainer(config: BenchConfig, out_dir: str):
    from .editor import BiasEditTrainer

    peft_model, tokenizer, _ = build_model(_demo_config(config))
    editor, args = _fresh_editor(peft_model, config, out_dir)
    train = load_demo_items("train", ("gender", "race", "religion"), None)
    return BiasEditTrainer(peft_model, editor, args, train, None, tokenizer=tokenizer)


def bench_speed(config: BenchConfig) -> dict:
    """Seconds per meta-training step (cache, predict, post-edit losses, meta-backward, Adam) at ``n_edits``."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(config, folder)
        batches = trainer._batches(trainer.train_data, 0)
        cursor = iter(range(len(batches)))
        step = timed(lambda: trainer.edit_step(batches[next(cursor) % len(batches)], train=True), config.repeats)
    return {"n_edits": config.n_edits, "batch_size": trainer.args.batch_size, "seconds_per_step": step,
            "samples_per_second": config.n_edits / step["median_s"]}


def _cached(peft_model, tokenizer, editor, n_samples: int):
    items = load_demo_items("train", ("gender", "race", "religion"), None)
    items = (items * math.ceil(n_samples / len(items)))[:n_samples]
    cache, _, _ = editor.cache_samples(peft_model, tokenizer, items, 32, update_normalizers=True)
    return cache


def bench_solve(config: BenchConfig) -> dict:
    """One joint delta for each of ``solve_sizes`` samples: caching time, and the solve in both forms."""
    from .editor.editor import _chunks
    from .editor.solve import solve_ridge

    peft_model, tokenizer, _ = build_model(_demo_config(config))
    editor, _ = _fresh_editor(peft_model, config)
    results = []
    for n_samples in config.solve_sizes:
        start = time.perf_counter()
        cache = _cached(peft_model, tokenizer, editor, n_samples)
        cache_seconds = time.perf_counter() - start
        name = next(iter(editor.config.targets))
        net, index = editor.net_for(name)
        keys, grads = cache.layer(name)
        with torch.no_grad():
            changes = torch.cat([net.value_changes(keys[c], grads[c], index) for c in _chunks(len(keys), 4096)])
        ridge = net.ridge(index).detach()
        sizes = {"primal": keys.shape[1], "dual": keys.shape[0]}
        forms: dict[str, Any] = {}
        for form, size in sizes.items():
            if size > config.max_system:
                forms[form] = {"skipped": f"{size} x {size} system (over --max-system {config.max_system})"}
            else:
                forms[form] = timed(lambda form=form: solve_ridge(keys, changes, ridge, form=form), config.repeats)
        agreement = None
        if all("median_s" in result for result in forms.values()):
            dense = {form: solve_ridge(keys, changes, ridge, form=form).delta.dense() for form in forms}
            agreement = float((dense["primal"] - dense["dual"]).abs().max() / dense["primal"].abs().max())
        predict = timed(lambda: editor.predict(cache), config.repeats)
        results.append({"n_samples": n_samples, "n_tokens": cache.n_tokens, "key_size": keys.shape[1],
                        "auto_form": "dual" if cache.n_tokens < keys.shape[1] else "primal",
                        "cache_seconds": cache_seconds, "solve_one_layer": forms,
                        "predict_all_layers": predict, "primal_vs_dual_relative_difference": agreement})
    return {"layer": name, "sizes": results}


def bench_forward(config: BenchConfig) -> dict:
    """Forward time on a fixed batch: base, unmerged adapter with a non-zero delta, merged.

    The three models are separate copies, timed round-robin (one call of each per round) so that drift in
    the machine's speed affects them alike; ``forward_repeats`` rounds after one warm-up round.
    """
    import copy

    from peft import get_peft_model

    from .models import load_model_and_tokenizer
    from .scoring import encode_sentences
    from .tuner import BiasEditConfig, edit_targets, set_deltas

    device = default_device(config.device)
    base, tokenizer = load_model_and_tokenizer(config.model, device=device)
    items = load_demo_items("test", ("gender", "race", "religion"), None)[:64]
    batch = encode_sentences(tokenizer, [item.stereotype for item in items]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    peft_model = get_peft_model(copy.deepcopy(base), BiasEditConfig())
    deltas = {name: 1e-3 * torch.randn(layer.weight_shape, generator=generator)
              for name, layer in edit_targets(peft_model).items()}
    set_deltas(peft_model, deltas)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    models = {"base": base, "unmerged_adapter": peft_model, "merged": merged}

    @torch.no_grad()
    def forward(model):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(config.forward_repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            forward(model)
            if round_:  # round 0 warms up
                seconds[name].append(time.perf_counter() - start)
    results: dict[str, Any] = {"batch": list(batch.input_ids.shape)}
    for name, values in seconds.items():
        results[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                         "repeats": len(values)}
    results["max_abs_logit_difference_merged_vs_unmerged"] = float((forward(merged) - forward(peft_model)).abs().max())
    base_median = results["base"]["median_s"]
    results["overhead_unmerged_pct"] = 100 * (results["unmerged_adapter"]["median_s"] / base_median - 1)
    results["overhead_merged_pct"] = 100 * (results["merged"]["median_s"] / base_median - 1)
    return results


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    """Resident set size now, in MiB (``/proc/self/status``; the peak so far where that is missing)."""
    return _proc_status_mib("VmRSS") or peak_rss_mib()


def _proc_status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (else since the start), in MiB."""
    return _proc_status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_phase(phase: str, config: BenchConfig) -> dict:
    """Run one phase in this (fresh) process; report RSS after loading and the peak after the phase."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(config, folder)
        batches = trainer._batches(trainer.train_data, 0)
        items = []
        if phase == "debiasing":
            items = load_demo_items("test", ("gender", "race", "religion"), config.limit)
            _cached(trainer.model, trainer.tokenizer, trainer.editor, 64)  # normaliser statistics
        loaded = current_rss_mib()
        reset = reset_peak_rss()
        if phase == "meta_training":
            for batch in batches[:3]:
                trainer.edit_step(batch, train=True)
        elif phase == "debiasing":
            trainer.editor.debias(trainer.model, items, tokenizer=trainer.tokenizer, progress=False)
        else:
            raise ValueError(f"Unknown memory phase {phase!r}")
        peak = peak_rss_mib()
    return {"phase": phase, "rss_after_load_mib": loaded, "peak_rss_mib": peak,
            "peak_is_of_the_phase_alone": reset, "n_debias_samples": len(items) if phase == "debiasing" else None}


def bench_memory(config: BenchConfig) -> dict:
    """Peak RSS of three meta-training steps and of debiasing the test split, each in a fresh process."""
    results = {}
    for phase in ("meta_training", "debiasing"):
        payload = json.dumps({"phase": phase, "config": asdict(config)})
        completed = subprocess.run(
            [sys.executable, "-c", "import json,sys; from biasedit_peft.bench import _memory_main; _memory_main(sys.argv[1])",
             payload], capture_output=True, text=True, check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"memory phase {phase} failed:\n{completed.stderr[-2000:]}")
        results[phase] = json.loads(completed.stdout.strip().splitlines()[-1])
    results["n_edits"] = config.n_edits
    return results


def _memory_main(payload: str) -> None:
    data = json.loads(payload)
    fields = data["config"]
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    print(json.dumps(_memory_phase(data["phase"], config)))


def _file_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def bench_size(config: BenchConfig) -> dict:
    """Bytes on disk of one real debias delta (test split) stored dense, factored, and as LoRA exports."""
    from .sharing import export_lora_from_peft_model
    from .tuner import get_deltas, set_deltas

    peft_model, tokenizer, _ = build_model(_demo_config(config))
    editor, _ = _fresh_editor(peft_model, config)
    _cached(peft_model, tokenizer, editor, 64)  # normaliser statistics of an untrained editor
    items = load_demo_items("test", ("gender", "race", "religion"), config.limit)
    report = editor.debias(peft_model, items, tokenizer=tokenizer, progress=False)
    results: dict[str, Any] = {"n_samples": report.n_samples, "n_tokens": report.n_tokens}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        peft_model.save_pretrained(root / "as_debiased")
        results["as_written_by_debias"] = _file_bytes(root / "as_debiased")
        config_ = peft_model.peft_config["default"]
        dense = get_deltas(peft_model)
        for storage in ("dense", "factored"):
            config_.delta_storage = storage
            set_deltas(peft_model, dense)
            peft_model.save_pretrained(root / storage)
            results[storage] = _file_bytes(root / storage)
        exports = {}
        for rank in config.lora_ranks:
            export = export_lora_from_peft_model(peft_model, root / f"lora{rank}", rank=rank)
            exports[str(rank)] = {"bytes": _file_bytes(root / f"lora{rank}"),
                                  "relative_error": export.relative_error}
        results["lora"] = exports
    return results


QUALITY_VARIANTS: dict[str, dict] = {
    "default": {},
    "paper_loss": {"loss": "paper"},
    "no_retention": {"loc_coef": 0.0},
    "first_2_blocks": {"layers_to_transform": (0, 1)},
    "last_2_blocks": {"layers_to_transform": None, "num_edit_layers": 2},
}


def bench_quality(config: BenchConfig, variants: Sequence[str] = tuple(QUALITY_VARIANTS),
                  on_variant: Callable[[dict], None] | None = None) -> dict:
    """``run_demo`` per variant (no merge); keeps the headline numbers of each.

    ``on_variant(results_so_far)`` is called after every variant (``run_bench`` saves them then).
    """
    from .demo import run_demo

    results = {}
    for name in variants:
        demo = _demo_config(config, out=str(Path(config.out) / "quality" / name), max_steps=config.quality_steps,
                            eval_every=config.quality_eval_every,
                            limit=config.limit, merge=False, crows=True, n_resamples=0,
                            **QUALITY_VARIANTS[name])
        if config.progress:
            print(f"[bench] quality variant {name} ...", file=sys.stderr, flush=True)
        run = run_demo(demo)
        results[name] = {
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in QUALITY_VARIANTS[name].items()},
            "edited_layers": run["edit"]["layers"],
            "before": summary(run["before"]), "after_joint": summary(run["after"]),
            "per_batch": {"before": _ss_lms(run["protocols"]["per_batch"]["before"]),
                          "after": _ss_lms(run["protocols"]["per_batch"]["after"])},
            "held_out": {"before": _ss_lms(run["protocols"]["held_out"]["before"]),
                         "after": _ss_lms(run["protocols"]["held_out"]["after"])},
            "training_steps": run["training"]["steps"], "seconds": run["seconds"]["total"],
        }
        if on_variant is not None:
            on_variant(results)
    return results


def _ss_lms(stereoset: dict) -> dict:
    return {t: {"ss": e["ss"], "lms": e["lms"], "icat": e["icat"], "n": e["n"]} for t, e in stereoset.items()}


def summary(evaluation: dict) -> dict:
    """SS / LMS / ICAT per bias type, CrowS-Pairs overall and perplexity of an evaluate result."""
    return {"stereoset": _ss_lms(evaluation["stereoset"]),
            "crows_overall": evaluation.get("crows", {}).get("overall", {}).get("metric"),
            "perplexity": evaluation["perplexity"]}


SECTION_FUNCTIONS: dict[str, Callable[[BenchConfig], dict]] = {
    "speed": bench_speed, "solve": bench_solve, "forward": bench_forward, "memory": bench_memory,
    "size": bench_size, "quality": bench_quality,
}


def run_bench(config: BenchConfig) -> dict:
    """Every section of ``config.sections``; writes ``OUT/bench.json`` after each (nothing lost on interruption)."""
    unknown = [s for s in config.sections if s not in SECTION_FUNCTIONS]
    if unknown:
        raise ValueError(f"Unknown bench section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(config), "environment": environment(), "sections": {}}
    def save() -> None:
        atomic_write_text(out / "bench.json", json.dumps(results, indent=2) + "\n")

    def save_partial(section: str, partial: dict) -> None:
        results["sections"][section] = {**partial, "partial": True}
        save()

    for section in config.sections:
        if config.progress:
            print(f"[bench] {section} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if section == "quality":  # long: save after every variant
            outcome = bench_quality(config, on_variant=lambda partial: save_partial("quality", partial))
        else:
            outcome = SECTION_FUNCTIONS[section](config)
        results["sections"][section] = outcome
        outcome["section_seconds"] = round(time.perf_counter() - start, 2)
        save()
    return results


def format_bench(results: dict) -> str:
    """A short plain-text table of a :func:`run_bench` result."""
    sections, lines = results["sections"], []
    if "speed" in sections:
        s = sections["speed"]
        step = s["seconds_per_step"]
        lines.append(f"meta-training step ({s['n_edits']} edits): median {step['median_s']:.3f} s "
                     f"[{step['min_s']:.3f}, {step['max_s']:.3f}], {s['samples_per_second']:.1f} samples/s")
    for row in sections.get("solve", {}).get("sizes", []):
        solved = {form: (f"{1e3 * r['median_s']:.1f} ms" if "median_s" in r else "skipped")
                  for form, r in row["solve_one_layer"].items()}
        lines.append(f"joint delta, {row['n_samples']} samples ({row['n_tokens']} tokens): cache {row['cache_seconds']:.2f} s, "
                     f"solve primal {solved['primal']} / dual {solved['dual']} (auto: {row['auto_form']}), "
                     f"predict all layers {1e3 * row['predict_all_layers']['median_s']:.1f} ms")
    if "forward" in sections:
        f = sections["forward"]
        lines.append(f"forward {f['batch']}: base {1e3 * f['base']['median_s']:.1f} ms, unmerged adapter "
                     f"{1e3 * f['unmerged_adapter']['median_s']:.1f} ms ({f['overhead_unmerged_pct']:+.1f}%), merged "
                     f"{1e3 * f['merged']['median_s']:.1f} ms ({f['overhead_merged_pct']:+.1f}%)")
    if "memory" in sections:
        m = sections["memory"]
        lines.append(f"peak RSS: meta-training {m['meta_training']['peak_rss_mib']:.0f} MiB, debiasing "
                     f"{m['debiasing']['peak_rss_mib']:.0f} MiB (after load {m['meta_training']['rss_after_load_mib']:.0f} MiB)")
    if "size" in sections:
        z = sections["size"]
        lora = ", ".join(f"r{r} {v['bytes'] / 1024:.0f} KiB (err {v['relative_error']:.2f})" for r, v in z["lora"].items())
        lines.append(f"adapter bytes: dense {z['dense'] / 1024:.0f} KiB, factored {z['factored'] / 1024:.0f} KiB "
                     f"({z['n_tokens']} tokens); LoRA {lora}")
    for name, q in sections.get("quality", {}).items():
        if name in ("section_seconds", "partial"):
            continue
        cells = []
        for bias_type, entry in q["per_batch"]["after"].items():
            before = q["per_batch"]["before"][bias_type]
            held = q["held_out"]["after"][bias_type]
            cells.append(f"{bias_type} SS {before['ss']:.1f}->{entry['ss']:.1f} LMS {before['lms']:.1f}->{entry['lms']:.1f} "
                         f"(held-out SS {held['ss']:.1f} LMS {held['lms']:.1f})")
        lines.append(f"quality {name}: " + "; ".join(cells))
    return "\n".join(lines)

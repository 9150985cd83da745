"""Which editor, per batch? A demo's kept editor against editors it could have kept, scored per batch.

Every variant but ``multiple`` is calibrated exactly as the trainer calibrates the kept editor
(``BiasEditTrainer.calibrate``: the demo's calibration pairs, its grid and edge steps), then scored by the demo's
per-batch protocol on ``test`` (``workflows.protocols.per_batch_protocol``), with the demo's model, dtype, seed and
``--limit``. ``--variants`` (comma-separated):

- ``kept``: the demo's editor (``RUN/editor``) as it is. It reproduces the demo's ``per_batch_protocol`` stage.
- ``later``: the last validation's averaged editor (``RUN/editor/checkpoint``: the iterate's buffers with the
  parameters of ``average.safetensors``), which selection passed over.
- ``untrained``: the demo's initial editor for its seed (the preset's init, seeded as the demo seeds it), its
  normalisers fitted on the first ``--groups`` training groups of epoch 0, the rows meta-training saw first. It
  measures what meta-training adds to a calibrated MEND-style step.
- ``ridge:RHO``: the kept editor with each edited layer's ``lambda`` set to ``RHO`` x the mean squared key norm of
  that layer on the first four calibration groups (the learned ``lambda`` stays ~1 while real keys' squared norms
  are 10^3-10^6).
- ``multiple:M``: the kept editor at ``M`` x its calibrated multiple, not calibrated again.

    python scripts/per_batch_editors.py --run runs/v25/smollm2/seed-0 --variants kept,later,untrained --out pb.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from _study_args import parse_study_arguments

from biasedit_peft._io import write_json
from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.editor.cache import as_edit_sample
from biasedit_peft.editor.calibration import scale_edits
from biasedit_peft.editor.trainer import read_average
from biasedit_peft.workflows.demo import DemoConfig, build_model, editor_preset, load_demo_items, training_splits
from biasedit_peft.workflows.protocols import per_batch_protocol

TYPES = ("gender", "race", "religion", "overall")


@dataclass
class DemoRun:
    """A finished demo's settings and data, with its model loaded (a zero adapter)."""

    folder: Path
    config: DemoConfig
    arguments: dict
    """The trainer's arguments (``stages/train_editor.json``)."""
    peft_model: torch.nn.Module
    tokenizer: object
    device: str

    @classmethod
    def load(cls, folder: Path) -> DemoRun:
        saved = json.loads((folder / "stages" / "config.json").read_text())["config"]
        known = {f.name for f in fields(DemoConfig)}
        config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known},
                            out=str(folder), progress=False)
        arguments = json.loads((folder / "stages" / "train_editor.json").read_text())["result"]["arguments"]
        return cls(folder, config, arguments, *build_model(config))

    def items(self, split: str) -> list:
        return load_demo_items(split, self.config.bias_types, self.config.limit)

    def calibration_items(self) -> list:
        """``dev`` plus the splits the demo pooled with it (``training_splits``): what its editor was calibrated on."""
        return self.items("dev") + [item for split in training_splits(self.config.calibrate_on)[1]
                                    for item in self.items(split)]

    def trainer(self, editor: BiasEditor, output_dir: Path) -> BiasEditTrainer:
        """A trainer with the demo's arguments and data that writes to ``output_dir``."""
        names = {f.name for f in fields(BiasEditTrainingArguments)}
        args = BiasEditTrainingArguments(**{**{k: v for k, v in self.arguments.items() if k in names},
                                            "output_dir": str(output_dir), "resume": False, "progress": False,
                                            "edit_scales": tuple(self.arguments["edit_scales"])})
        return BiasEditTrainer(self.peft_model, editor, args, self.items(training_splits(self.config.calibrate_on)[0]),
                               self.items("dev"), tokenizer=self.tokenizer, calibration_data=self.calibration_items())


def calibrated(run: DemoRun, editor: BiasEditor, folder: Path) -> tuple[BiasEditor, dict]:
    """``editor`` saved to ``folder``, its edit scale calibrated there as the demo's trainer does: ``(the calibrated
    editor, its calibration)``."""
    editor.save_pretrained(folder)
    calibration = run.trainer(editor, folder).calibrate()
    return BiasEditor.from_pretrained(folder, device=run.device), calibration


def later_editor(run: DemoRun) -> BiasEditor:
    """The checkpoint's editor with the averaged parameters of the last validation."""
    checkpoint = run.folder / "editor" / "checkpoint"
    editor = BiasEditor.from_pretrained(checkpoint, device=run.device)
    with torch.no_grad():
        torch._foreach_copy_(list(editor.parameters()), read_average(checkpoint, editor))
    return editor


def untrained_editor(run: DemoRun, groups: int, folder: Path) -> BiasEditor:
    """The demo's initial editor for its seed, with normalisers fitted on the first ``groups`` training groups
    (those of the trainer's epoch-0 order; ``folder``: the trainer's output folder, nothing is written there)."""
    config = run.config
    editor, _ = editor_preset(config.model, run.peft_model, config.preset).editor_and_arguments(
        run.peft_model, str(folder), loss=config.loss or "token", base_model=config.model, seed=config.seed,
        progress=False, **config.overrides())
    trainer = run.trainer(editor, folder)
    for group in trainer._batches(trainer.train_data, 0)[:groups]:
        editor.cache_samples(run.peft_model, run.tokenizer, group, trainer.args.batch_size, update_normalizers=True)
    return editor


def mean_squared_key_norms(run: DemoRun, editor: BiasEditor, groups: int = 4) -> dict[str, float]:
    """Each edited layer's mean ``||u||^2`` over the keys of the first ``groups`` calibration groups."""
    pairs = run.calibration_items()[:groups * run.arguments["n_edits"]]
    cache, _, _ = editor.cache_samples(run.peft_model, run.tokenizer,
                                       [as_edit_sample(item, i) for i, item in enumerate(pairs)],
                                       run.arguments["batch_size"])
    return {name: cache.layer(name)[0].double().pow(2).sum(1).mean().item() for name in editor.config.targets}


def with_relative_ridge(editor: BiasEditor, norms: dict[str, float], rho: float) -> BiasEditor:
    """``editor`` with each layer's ``lambda = rho x norms[layer]``."""
    with torch.no_grad():
        for name in editor.config.targets:
            net, index = editor.net_for(name)
            net.log_lambda[index] = math.log(rho * norms[name])
    return editor


def per_batch_row(run: DemoRun, editor: BiasEditor) -> dict:
    """SS and LMS drop per bias type under the per-batch protocol on ``test`` (reference units; the paper code's SS
    too), with its seconds."""
    started = time.perf_counter()
    result = per_batch_protocol(editor, run.peft_model, run.tokenizer, run.items("test"),
                                edit_batch_size=run.arguments["n_edits"], batch_size=run.arguments["batch_size"],
                                n_resamples=0, seed=run.config.seed, progress=False)
    before, after = result["before"], result["after"]
    return {"seconds": time.perf_counter() - started,
            **{t: {"ss": after[t]["ss"], "lms_drop": before[t]["lms"] - after[t]["lms"]} for t in TYPES},
            "paper_ss": {t: result["other_units"]["after"][t]["ss"] for t in TYPES[:3]}}


def calibration_rows(calibration: dict) -> list[dict]:
    return [{k: row[k] for k in ("scale", "ss_pre", "ss_post", "lms_pre", "lms_post", "nll_increase", "selection")}
            for row in calibration["rows"]]


def run_variant(run: DemoRun, variant: str, work: Path, groups: int) -> dict:
    """One variant's report row: its editor's calibration (when calibrated) and per-batch figures."""
    name, _, value = variant.partition(":")
    kept = run.folder / "editor"
    if name == "kept":
        return {"per_batch": per_batch_row(run, BiasEditor.from_pretrained(kept, device=run.device))}
    if name == "multiple":
        editor = BiasEditor.from_pretrained(kept, device=run.device)
        scale_edits(editor, float(value))
        return {"multiple": float(value), "per_batch": per_batch_row(run, editor)}
    row: dict = {}
    if name == "later":
        editor = later_editor(run)
    elif name == "untrained":
        editor, row["groups"] = untrained_editor(run, groups, work / variant), groups
    elif name == "ridge":
        editor = BiasEditor.from_pretrained(kept, device=run.device)
        row["mean_squared_key_norm"] = norms = mean_squared_key_norms(run, editor)
        editor, row["rho"] = with_relative_ridge(editor, norms, float(value)), float(value)
    else:
        raise ValueError(f"Unknown variant {variant!r}: kept, later, untrained, ridge:RHO or multiple:M")
    editor, calibration = calibrated(run, editor, work / variant.replace(":", "-"))
    return {**row, "scale": calibration["scale"], "calibration": calibration_rows(calibration),
            "per_batch": per_batch_row(run, editor)}


def summary(variant: str, row: dict) -> str:
    figures = row["per_batch"]
    return (f"{variant}" + (f" (x{row['scale']:g})" if "scale" in row else "") + ": SS "
            + " / ".join(f"{figures[t]['ss']:.2f}" for t in TYPES) + ", LMS drop "
            + " / ".join(f"{figures[t]['lms_drop']:.2f}" for t in TYPES) + f" [{figures['seconds']:.0f} s]")


def editors_folder(out: Path) -> Path:
    """Where the editors calibrated for the report ``out`` are saved: ``OUT-editors/VARIANT`` beside it."""
    return out.parent / f"{out.stem}-editors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished demo folder (biasedit demo --out)")
    parser.add_argument("--variants", default="kept,later,untrained")
    parser.add_argument("--groups", type=int, default=100,
                        help="training groups the untrained editor's normalisers are fitted on")
    parser.add_argument("--out", required=True, type=Path, help="JSON written here (rewritten after every variant)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and its editors folder")
    args = parse_study_arguments(parser, argv)
    variants = args.variants.split(",")
    work = editors_folder(args.out)
    if work.exists() and not args.overwrite:
        parser.error(f"{work} (the calibrated editors of --out {args.out}) exists; pass --overwrite to replace it")
    run = DemoRun.load(args.run)
    report = {"run": str(args.run), "model": run.config.model, "variants": {}}
    for variant in variants:
        report["variants"][variant] = row = run_variant(run, variant, work, args.groups)
        write_json(args.out, report)
        print(summary(variant, row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

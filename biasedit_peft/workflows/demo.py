"""The whole BiasEdit workflow on one model, end to end: the job behind ``biasedit demo``.

1. evaluate the base model (StereoSet ``test`` split, CrowS-Pairs, perplexity),
2. meta-train an editor on the ``train`` split (``dev`` for early stopping)  -> ``OUT/editor``,
3. measure it under the paper's per-batch protocol, a held-out-targets protocol and one joint delta from the
   ``test`` items scored on them (``protocols.py``; all functional, nothing written),
4. the deployment protocol (``deployment.py``): one joint delta from the ``train`` items, its strength
   calibrated on ``dev``, written into a BiasEdit adapter -> ``OUT/adapter``,
5. evaluate base + adapter on ``test`` (items and target terms the adapter never saw), CrowS-Pairs, the
   gender-swapped ``test`` items and perplexity,
6. merge into a plain transformers checkpoint -> ``OUT/merged``, reload it without the adapter, re-score,
7. write ``OUT/results.json`` and a before / after bar chart ``OUT/before_after.png``.

Everything is offline; with ``model="testbed"`` (the default) it runs in minutes on a laptop CPU.

One unit: the run is built in the hidden run folder ``.OUT.run`` beside ``OUT``
(:func:`biasedit_peft._io.resumable_folder_in_place`) and swapped in whole when it ends, so ``OUT`` holds the
old state or the complete new demo, never half of one. Below, ``RUN`` is that folder.

Resumable (:mod:`biasedit_peft.progress_store`): each finished stage (:data:`STAGES`) is recorded at once
as ``RUN/stages/NAME.json`` (its JSON-able result, its seconds, the files it wrote), and ``RUN/stages/
config.json`` holds the settings that decide the results (:func:`demo_fingerprint`). A killed demo loses
at most the running stage, and less: editor training keeps its own checkpoint (``RUN/editor/checkpoint``)
and the evaluations keep their finished score pieces in ``RUN/stages/NAME.partial/``.
``run_demo(config, resume=True)`` (``biasedit demo --resume``) loads the finished stages (of the interrupted
run, or of the finished demo in ``OUT``) and runs the rest; a stored config that differs is refused
(``ResumeMismatch``, naming the fields) before anything is copied or computed. Without ``resume`` a non-empty
``OUT`` or an interrupted run is refused (``PreviousRunError``); ``overwrite=True`` replaces ``OUT`` whole.
Paths recorded in the results and the adapter name ``OUT``, where the files end up.

``results.json`` of an uninterrupted run is what it always was, plus ``resumed_stages``: the stages loaded
from an earlier run (``[]`` without a resume); their ``seconds`` are the stored ones, and ``seconds.total``
is this run's wall-clock time plus theirs.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from .._io import (
    OutputFolderError,
    check_resumable_output_folder,
    resumable_folder_in_place,
    resume_source,
    write_json,
)
from ..data import BIAS_TYPES, load_stereoset
from ..editor.calibration import MIN_DEBIAS_GAIN, by_type_summary, chosen_row
from ..editor.presets import PresetOverrides
from ..evaluation import take_per_type
from ..models import cpu_identity, default_device
from ..progress_store import (
    STAGE_CONFIG_NAME,
    PreviousRunError,
    ScoreStore,
    StageStore,
    files_under,
    read_json,
    run_stage,
)
from ..tuner.config import DEFAULT_NUM_EDIT_LAYERS
from .deployment import deployment_check

RESULTS_NAME = "results.json"
PLOT_NAME = "before_after.png"
STAGES_DIR = "stages"
STAGES = ("evaluate_before", "train_editor", "per_batch_protocol", "held_out_protocol", "joint_on_test", "debias",
          "evaluate_after", "merge_and_rescore")
"""The demo's stages, in the order they run (``merge_and_rescore`` only with ``merge``)."""
"""What a demo writes into ``OUT``; ``overwrite`` deletes these and nothing else."""
NOT_FINGERPRINTED = ("out", "progress", "command")
"""``DemoConfig`` fields that do not change the results (a resume may change them)."""
ADDED_LATER = ("step_size_meta_lr", "average_steps", "calibrate_on", "initial_edit_scale", "ss_coef")
"""Fields newer than some resumable runs: fingerprinted only when set (unset, they are what older runs did)."""


@dataclass
class DemoConfig(PresetOverrides):
    """Settings of one demo run; ``None`` means "the model family's preset" (``editor/presets.py``).

    The editor hyper-parameters (``n_edits``, ``batch_size``, ``lr``, ``meta_lr``, ``loc_coef``, ``rank``)
    come from :class:`~biasedit_peft.editor.presets.PresetOverrides`.
    """

    model: str = "testbed"
    out: str = "demo"
    preset: str | None = None
    """Editor preset name (``editor/presets.py``); default: ``testbed``'s own for the testbed, else by model type."""
    bias_types: tuple[str, ...] = BIAS_TYPES
    targets: tuple[str, ...] | None = None
    """Modules to edit (default: MLP output projections of the last ``num_edit_layers`` blocks)."""
    num_edit_layers: int = DEFAULT_NUM_EDIT_LAYERS
    layers_to_transform: tuple[int, ...] | None = None
    """Edit the MLP output projections of these block indices instead (e.g. ``(0, 1)``: the first blocks)."""
    max_steps: int | None = 150
    eval_every: int | None = 25
    loss: str | None = None
    calibrate_on: str | None = "dev+train-calib"
    """Where the kept editor's edit scale is calibrated (:data:`CALIBRATION_RECIPES`): ``"dev+train-calib"``
    meta-trains on ``train-fit`` and calibrates on ``dev`` plus ``train-calib``, twice the held-out target terms
    (validation and early stopping stay on ``dev``); ``"dev"`` (None: what runs before this default did)
    meta-trains on ``train`` and calibrates on ``dev``."""
    select_by: str = "target"
    """Which validated editor is kept: ``"target"`` (dev SS closest to 50 within LMS / perplexity bounds) or
    ``"loss"`` (the lowest dev meta-loss); ``BiasEditTrainingArguments.select_by``."""
    patience: int | None = None
    limit: int | None = None
    """Keep only the first N items per bias type of every split (quick runs and tests)."""
    n_resamples: int = 1000
    seed: int = 0
    dtype: str | None = None
    """The LM's dtype (the editor and deltas stay float32). ``None``: ``bf16`` for a model other than the
    testbed on a CPU that lists bf16 instructions (``models.cpu_bf16_is_fast``: they make bf16 ~2x faster; without
    them bf16 is emulated and several times slower), else the checkpoint's own."""
    device: str | None = None
    merge: bool = True
    crows: bool = True
    progress: bool = True
    command: str | None = None

    def __post_init__(self):
        from ..data.splits import check_limit
        from ..metrics import check_n_resamples

        training_splits(self.calibrate_on)  # an unknown recipe fails here, not after the first stage
        check_limit(self.limit)
        check_n_resamples(self.n_resamples)
        if self.dtype is None:
            self.dtype = default_demo_dtype(self.model, default_device(self.device))


def default_demo_dtype(model: str, device: str | torch.device) -> str | None:
    """``"bf16"`` for a model other than the bundled testbed on a CPU that lists bf16 instructions
    (``models.cpu_bf16_is_fast``); None (the checkpoint's dtype) else."""
    from ..models import TESTBED_NAME, cpu_bf16_is_fast

    on_cpu = torch.device(device).type == "cpu"
    return "bf16" if model != TESTBED_NAME and on_cpu and cpu_bf16_is_fast() else None


def load_demo_items(split: str, bias_types: Sequence[str], limit: int | None) -> list:
    """StereoSet items of ``split`` for ``bias_types``, the first ``limit`` per type when given."""
    return take_per_type(load_stereoset(split, bias_types=list(bias_types)), limit)


def build_model(config: DemoConfig, adapter: str | Path | None = None):
    """``(peft_model, tokenizer, device)`` with a zero BiasEdit adapter on the configured targets, or with the
    saved ``adapter`` folder loaded instead."""
    from peft import get_peft_model

    from ..models import load_model_and_tokenizer
    from ..tuner import BiasEditConfig

    device = default_device(config.device)
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype, device=device)
    if adapter is not None:
        from ..sharing.adapter_files import load_biasedit_adapter

        return load_biasedit_adapter(model, adapter), tokenizer, device
    peft_config = BiasEditConfig(
        target_modules=list(config.targets) if config.targets else None, num_edit_layers=config.num_edit_layers,
        layers_to_transform=list(config.layers_to_transform) if config.layers_to_transform else None,
    )
    return get_peft_model(model, peft_config), tokenizer, device


def editor_preset(model_name: str, peft_model, preset: str | None = None):
    """The preset named ``preset``, else that of ``peft_model``'s family (``testbed``'s own for the testbed)."""
    from ..editor import preset_for_model, preset_name_for

    return preset_for_model(peft_model.get_base_model(), preset_name_for(model_name, preset))


CALIBRATION_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dev": ("train", ()),
    "dev+train-calib": ("train-fit", ("train-calib",)),
}
"""``calibrate_on`` -> (the split meta-trained on, the splits pooled with ``dev`` to calibrate the edit scale; none:
``dev`` alone, the pairs that validate). ``train-calib`` is carved from ``train`` by target term
(``data/splits.py``), so it is calibrated on only when not meta-trained on."""


def training_splits(calibrate_on: str | None) -> tuple[str, tuple[str, ...]]:
    """``(train split, splits calibrated on beside dev)`` of a demo's ``calibrate_on`` (None: ``"dev"``).

    Raises:
        ValueError: An unknown recipe (the error lists the known ones).
    """
    name = calibrate_on or "dev"
    if name not in CALIBRATION_RECIPES:
        raise ValueError(f"Unknown calibrate_on {calibrate_on!r}; choose one of {sorted(CALIBRATION_RECIPES)}")
    return CALIBRATION_RECIPES[name]


def train_editor(config: DemoConfig, peft_model, tokenizer, device: str, out_dir: Path, resume: bool = False):
    """Meta-train an editor on ``train`` (``train-fit`` with ``calibrate_on="dev+train-calib"``; ``dev`` for
    validation) and calibrate its edit scale (:func:`training_splits`); returns ``(best editor, trainer state,
    args)``.

    ``resume``: continue from the trainer checkpoint in ``out_dir/checkpoint`` when there is one.
    """
    from ..editor import BiasEditor, BiasEditTrainer

    editor, args = editor_preset(config.model, peft_model, config.preset).editor_and_arguments(
        peft_model, str(out_dir), loss=config.loss or "token", base_model=config.model, patience=config.patience,
        max_steps=config.max_steps, eval_every=config.eval_every, seed=config.seed, progress=config.progress,
        select_by=config.select_by,
        resume=resume, **config.overrides(),
    )
    train_split, pooled_with_dev = training_splits(config.calibrate_on)
    train = load_demo_items(train_split, config.bias_types, config.limit)
    dev = load_demo_items("dev", config.bias_types, config.limit)
    pooled = [item for split in pooled_with_dev for item in load_demo_items(split, config.bias_types, config.limit)]
    calibration = dev + pooled if pooled_with_dev else None  # None: the trainer calibrates on dev, which validates
    trainer = BiasEditTrainer(peft_model, editor, args, train, dev, tokenizer=tokenizer, calibration_data=calibration)
    state = trainer.train()
    best = BiasEditor.from_pretrained(out_dir, device=device)
    return best, state, args


def training_summary(state, args) -> dict:
    """``results["training"]``: where meta-training ended (a ``TrainerState``) and its arguments."""
    return {"steps": state.global_step, "epochs": state.epoch, "stopped_early": state.stopped_early,
            "best_loss": state.best_loss, "best_step": state.best_step, "calibration": state.calibration,
            "initial_calibration": state.initial_calibration,
            "history": state.history, "arguments": asdict(args)}


def evaluate(model, tokenizer, config: DemoConfig, name: str, adapter: str | None = None,
             store: ScoreStore | None = None) -> dict:
    """``evaluate_model`` on the ``test`` split with the demo's bias types (the ``biasedit evaluate`` schema);
    ``store`` keeps (and resumes from) its finished score pieces."""
    from ..evaluation import evaluate_model

    benchmarks = ("stereoset", "crows", "gender_swapped") if config.crows else ("stereoset", "gender_swapped")
    return evaluate_model(model, tokenizer, benchmarks=benchmarks, bias_types=list(config.bias_types), split="test",
                          progress=config.progress, limit=config.limit, model_name=name, adapter=adapter,
                          n_resamples=config.n_resamples, seed=config.seed, store=store)


def max_abs_difference(first: dict, second: dict,
                       sections: Sequence[str] = ("stereoset", "crows", "gender_swapped", "perplexity")) -> float:
    """Largest ``|a - b|`` over the metrics of ``sections`` (``flatten_metrics``: finite values, counts
    skipped); inf when the two results do not hold the same metrics."""
    from ..sharing.model_card import flatten_metrics

    a = flatten_metrics({k: first.get(k) for k in sections})
    b = flatten_metrics({k: second.get(k) for k in sections})
    if a.keys() != b.keys():
        return math.inf
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


def target_check(before: dict, after: dict, bias_types: Sequence[str], ss_tolerance: float = 3.0,
                 lms_drop: float = 3.0) -> dict:
    """Per bias type: ``|SS - 50| <= ss_tolerance`` and ``LMS drop <= lms_drop`` after debiasing?"""
    rows = {}
    for bias_type in bias_types:
        if bias_type not in after or bias_type not in before:
            continue
        ss, drop = after[bias_type]["ss"], before[bias_type]["lms"] - after[bias_type]["lms"]
        rows[bias_type] = {"ss": ss, "lms_drop": drop, "ss_ok": abs(ss - 50) <= ss_tolerance,
                           "lms_ok": drop <= lms_drop}
    rows["all_ok"] = all(r["ss_ok"] and r["lms_ok"] for r in rows.values())
    return rows


def debias_and_save(editor, peft_model, tokenizer, config: DemoConfig, out_dir: Path, batch_size: int,
                    editor_id: str) -> dict:
    """The deployment adapter (``deployment.deployable_adapter``): one joint delta from the ``train`` items,
    scaled as ``dev`` says, written into the adapter, which is saved to ``out_dir``; ``editor_id`` is the editor
    it records."""
    from .deployment import CALIBRATION_DATA, EDIT_DATA, deployable_adapter, record_edit

    train = load_demo_items("train", config.bias_types, config.limit)
    dev = load_demo_items("dev", config.bias_types, config.limit)
    report = deployable_adapter(editor, peft_model, tokenizer, train, dev, batch_size=batch_size,
                                progress=config.progress)
    record_edit(peft_model.peft_config["default"], report, editor_id, EDIT_DATA, ",".join(config.bias_types),
                config.limit, CALIBRATION_DATA)
    peft_model.save_pretrained(out_dir)
    return {**report, "edit_data": EDIT_DATA, "calibrated_on": CALIBRATION_DATA,
            "guard_perplexity_rise": guard_perplexity_rise(report)}


def _guard_note(deployment: dict) -> str:
    rise = deployment.get("guard_perplexity_rise")
    return "" if rise is None else f" (guard-text perplexity {100 * rise:+.2f} % there)"


def guard_perplexity_rise(report: dict) -> float | None:
    """The guard text's relative perplexity rise at a deployment's chosen scale (``exp(text_nll_increase) - 1``),
    None when it was not scored."""
    from ..editor.calibration import chosen_row

    row = chosen_row(report["calibration"]) if report.get("calibration") else {}
    return math.expm1(row["text_nll_increase"]) if "text_nll_increase" in row else None


def write_card(peft_model, out_dir: Path, config: DemoConfig, before: dict, after: dict) -> None:
    from ..sharing import adapter_model_card

    card = adapter_model_card(peft_model, base_model=config.model, metrics_before=before, metrics_after=after,
                              command=config.command, datasets=["stereoset", "crows_pairs"])
    (out_dir / "README.md").write_text(str(card), encoding="utf-8")


def merge_and_rescore(config: DemoConfig, adapter_dir: Path, merged_dir: Path, after: dict,
                      store: ScoreStore | None = None, recorded_as: str | None = None) -> dict:
    """Merge the adapter into a plain checkpoint, reload it with transformers alone, score it again
    (through ``store`` when given); the results name it ``recorded_as`` (default: ``merged_dir``)."""
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer
    from ..sharing import merge_to_folder

    report = merge_to_folder(config.model, [adapter_dir], merged_dir, dtype=config.dtype)
    device = default_device(config.device)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(device).eval()
    name = recorded_as or str(merged_dir)
    scores = evaluate(merged, load_tokenizer(str(merged_dir)), config, name=name, store=store)
    return {"path": name, "max_abs_weight_change": max(c.max_abs_change for c in report.changes),
            "evaluation": scores, "max_abs_metric_difference": max_abs_difference(after, scores)}


def merge_rounding_note(dtype: str | None) -> str:
    """Why a merged 16-bit checkpoint scores differently from base + adapter ('' for float32): the merge rounds
    ``W + delta`` to ``dtype`` while the adapter adds its float32 delta to the rounded ``W``."""
    if dtype not in ("bf16", "fp16"):
        return ""
    return (f" ({dtype} weights: the merge rounds W + delta to {dtype}, which base + adapter does not; "
            "`biasedit merge --dtype fp32` keeps the delta exact)")


def demo_fingerprint(config: DemoConfig) -> dict:
    """The settings that decide a demo's results: ``config`` without :data:`NOT_FINGERPRINTED`, with the
    device it resolves to, and ``average_steps`` as the preset resolves it where that is known before the model
    loads (``cpu``, ``testbed`` or a named preset): those presets' default changed, so a run made under the
    old one is not resumed under the new one."""
    from ..editor.presets import PRESETS, preset_name_without_model

    fields = {k: v for k, v in asdict(config).items()
              if k not in NOT_FINGERPRINTED and not (k in ADDED_LATER and v is None)}
    fields["device"] = str(default_device(config.device))
    preset = preset_name_without_model(config.model, config.preset, fields["device"])
    if config.average_steps is None and preset in PRESETS:
        fields["average_steps"] = PRESETS[preset].average_steps
    return fields


def check_out(config: DemoConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Apply the resume / overwrite rules (module docstring) to ``OUT`` before anything is computed or copied;
    returns ``OUT``.

    Raises:
        PreviousRunError: A non-empty ``OUT`` or an interrupted run without ``resume`` / ``overwrite``; ``resume``
            with nothing to resume, or a run without ``stages/config.json``.
        ResumeMismatch: ``resume`` with a stored config that differs (the fields are named).
    """
    try:
        out = check_resumable_output_folder(config.out, [config.model], resume, overwrite)
    except OutputFolderError as error:
        raise PreviousRunError(str(error)) from None
    if resume:
        stored = resume_source(out) / STAGES_DIR / STAGE_CONFIG_NAME
        if not stored.is_file():
            raise PreviousRunError(f"{resume_source(out)} holds a demo without {STAGES_DIR}/{STAGE_CONFIG_NAME} to "
                                   "resume from; pass --overwrite to start again")
        StageStore(stored.parent, ()).check(demo_fingerprint(config))
    return out


def open_stages(config: DemoConfig, run: Path, resume: bool) -> StageStore:
    """The stage store in run folder ``run``, opened (``StageStore.open``) for ``config``."""
    stages = StageStore(run / STAGES_DIR, STAGES if config.merge else STAGES[:-1])
    stages.open(demo_fingerprint(config), resume)
    return stages


class DemoSession:
    """One demo run: the stages' computations, and the live objects they share (model, editor, test items),
    built when a stage that runs (is not loaded) first needs them."""

    def __init__(self, config: DemoConfig, stages: StageStore, resume: bool, run: Path):
        self.config, self.stages, self.resume = config, stages, resume
        self.final = Path(config.out)
        self.out = Path(run)  # where files are written until the swap
        self.adapter_dir = self.out / "adapter"

    def recorded(self, name: str) -> str:
        """The path recorded for entry ``name`` of the demo: where it will be, under ``OUT``."""
        return str(self.final / name)

    def store_of(self, stage: str, field: str, entry: str) -> ScoreStore:
        """Stage ``stage``'s score store, whose fingerprint names the demo's own ``entry`` (its ``field``:
        ``"model"`` or ``"adapter"``) as ``OUT/ENTRY``: the same from any working directory and wherever
        ``OUT`` lies, as a relative ``--out`` or a moved run folder would not be."""
        return self.stages.partial(stage, labels={field: f"OUT/{entry}"})

    @cached_property
    def built(self) -> tuple:
        """``(peft_model, tokenizer, device)``; the adapter is the saved one when ``debias`` finished earlier."""
        return build_model(self.config, self.adapter_dir if self.stages.finished("debias") else None)

    @property
    def peft_model(self):
        return self.built[0]

    @property
    def tokenizer(self):
        return self.built[1]

    @cached_property
    def editor(self):
        """The best editor, from ``OUT/editor`` (set directly by :meth:`train`)."""
        from ..editor import BiasEditor

        return BiasEditor.from_pretrained(self.out / "editor", device=self.built[2])

    @cached_property
    def test_items(self) -> list:
        return load_demo_items("test", self.config.bias_types, self.config.limit)

    def run(self, name: str, compute, seconds: dict[str, float], files: Sequence[str] = ()) -> Any:
        """Stage ``name``: loaded when it finished earlier, else ``compute()`` recorded with ``files`` (folders
        or files under ``OUT``, listed when the stage ends)."""
        return run_stage(self.stages, name, compute, seconds, lambda: files_under(self.out, files))

    def evaluate_before(self) -> dict:
        return evaluate(self.peft_model, self.tokenizer, self.config, self.config.model,
                        store=self.stages.partial("evaluate_before"))

    def train(self) -> dict:
        """Meta-train (resuming from the trainer checkpoint when resuming); returns :func:`training_summary`."""
        self.editor, state, args = train_editor(self.config, self.peft_model, self.tokenizer, self.built[2],
                                                self.out / "editor", resume=self.resume)
        return training_summary(state, replace(args, output_dir=self.recorded("editor")))

    def protocol_arguments(self, training: dict) -> dict:
        config = self.config
        return dict(batch_size=training["arguments"]["batch_size"], n_resamples=config.n_resamples, seed=config.seed,
                    progress=config.progress)

    def per_batch(self, training: dict) -> dict:
        from .protocols import per_batch_protocol

        return per_batch_protocol(self.editor, self.peft_model, self.tokenizer, self.test_items,
                                  edit_batch_size=training["arguments"]["n_edits"],
                                  **self.protocol_arguments(training))

    def held_out(self, training: dict) -> dict:
        from .protocols import held_out_protocol

        return held_out_protocol(self.editor, self.peft_model, self.tokenizer, self.test_items,
                                 **self.protocol_arguments(training))

    def joint_on_test(self, training: dict) -> dict:
        from .protocols import joint_protocol

        return joint_protocol(self.editor, self.peft_model, self.tokenizer, self.test_items, self.test_items,
                              **self.protocol_arguments(training))

    def debias(self, training: dict) -> dict:
        return debias_and_save(self.editor, self.peft_model, self.tokenizer, self.config, self.adapter_dir,
                               training["arguments"]["batch_size"], editor_id=self.recorded("editor"))

    def evaluate_after(self, before: dict) -> dict:
        """Evaluate base + adapter and write the adapter's model card."""
        after = evaluate(self.peft_model, self.tokenizer, self.config, self.config.model, self.recorded("adapter"),
                         store=self.store_of("evaluate_after", "adapter", "adapter"))
        write_card(self.peft_model, self.adapter_dir, self.config, before, after)
        return after

    def merge(self, after: dict) -> dict:
        return merge_and_rescore(self.config, self.adapter_dir, self.out / "merged", after,
                                 store=self.store_of("merge_and_rescore", "model", "merged"),
                                 recorded_as=self.recorded("merged"))


def run_demo(config: DemoConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the whole workflow (module docstring); returns what ``OUT/results.json`` holds.

    Args:
        config: The run's settings.
        resume: Load the stages a killed run of the same config (or the finished demo in ``OUT``) finished and
            run the rest.
        overwrite: Replace ``OUT`` (and discard an interrupted run). Without either, a non-empty ``OUT`` or an
            interrupted run is refused.

    Raises:
        PreviousRunError: See :func:`check_out`.
        ResumeMismatch: ``resume`` with a stored config that differs (the fields are named).
    """
    out = check_out(config, resume, overwrite)
    with resumable_folder_in_place(out, resume) as run:
        results = run_stages(config, open_stages(config, run, resume), run, resume)
        write_json(run / RESULTS_NAME, results)
        plot_before_after(results, run / PLOT_NAME)
    return results


def run_stages(config: DemoConfig, stages: StageStore, run: Path, resume: bool) -> dict:
    """Every stage into run folder ``run`` (finished ones loaded from ``stages``); returns the results."""
    resumed = [name for name in stages.stages if stages.finished(name)]
    elsewhere = sessions_elsewhere(stages, made_on(config), resume)
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    demo = DemoSession(config, stages, resume, run)
    before = demo.run("evaluate_before", demo.evaluate_before, seconds)
    training = demo.run("train_editor", demo.train, seconds, files=["editor"])
    per_batch = demo.run("per_batch_protocol", lambda: demo.per_batch(training), seconds)
    held_out = demo.run("held_out_protocol", lambda: demo.held_out(training), seconds)
    joint = demo.run("joint_on_test", lambda: demo.joint_on_test(training), seconds)
    edit = demo.run("debias", lambda: demo.debias(training), seconds, files=["adapter"])
    after = demo.run("evaluate_after", lambda: demo.evaluate_after(before), seconds, files=["adapter/README.md"])
    results: dict[str, Any] = {"before": before, "after": after}
    if config.merge:
        results["merged"] = demo.run("merge_and_rescore", lambda: demo.merge(after), seconds, files=["merged"])
    results["protocols"] = {"per_batch": per_batch, "held_out": held_out, "joint_on_test": joint,
                            "deployment": {key: edit[key] for key in ("edit_data", "calibrated_on", "scale",
                                                                      "guard_perplexity_rise", "n_samples",
                                                                      "n_tokens", "recipe", "recipes")
                                           if key in edit}}
    results["targets"] = {
        "deployment": deployment_check(before, after, config.bias_types),
        "joint_on_test": target_check(joint["before"], joint["after"], config.bias_types),
        "per_batch": target_check(per_batch["before"], per_batch["after"], config.bias_types),
        "per_batch_paper_units": target_check(per_batch["other_units"]["before"], per_batch["other_units"]["after"],
                                              config.bias_types),
        "held_out": target_check(held_out["before"], held_out["after"], config.bias_types),
    }
    results["edit"] = edit
    results["training"] = training
    results["config"] = asdict(config)
    results["environment"] = environment()
    if elsewhere:
        results["environment"]["sessions_elsewhere"] = elsewhere
    seconds["total"] = round(time.perf_counter() - started + sum(stages.seconds(name) for name in resumed), 2)
    results["seconds"] = seconds
    results["resumed_stages"] = resumed
    return results


SESSIONS_NAME = "sessions.json"
"""Under ``stages/``: what each session of a run (its first start and every ``--resume``) ran on, in order."""


def made_on(config: DemoConfig) -> dict:
    """What decides a run's numbers besides its config: seeds repeat on one CPU (or GPU) at one thread count, not
    across them. ``{"cpu": model name, "threads": torch's intra-op threads, "device": the LM's device type}``, and
    ``"gpu"`` (its name) on CUDA."""
    device = torch.device(default_device(config.device))
    machine = {"cpu": cpu_identity()["model"], "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def sessions_elsewhere(stages: StageStore, now: dict, resume: bool) -> list[dict]:
    """Record this session in ``stages/sessions.json`` (a fresh run starts the list; ``first_stage``: the first of
    ``stages`` it runs rather than loads, None when all are finished) and return the earlier sessions
    made on another machine than ``now`` (:func:`made_on`), warning on stderr before anything is computed: a resumed
    run's loaded stages, its trainer checkpoint and partial scores come from those sessions, so its figures mix
    machines. (Runs from before the record was kept have none to compare.)"""
    path = stages.root / SESSIONS_NAME
    earlier = read_json(path) if resume and path.is_file() else []
    first = next((name for name in stages.stages if not stages.finished(name)), None)
    write_json(path, [*earlier, {**now, "first_stage": first}])
    elsewhere = [s for s in earlier if {k: v for k, v in s.items() if k != "first_stage"} != now]
    if elsewhere:
        print(f"warning: this run was started or resumed before on another machine or thread count ({elsewhere}) "
              f"and goes on on {now}: seeds repeat only on one CPU at one thread count, so its figures will mix "
              f"them (recorded in results.json, environment.sessions_elsewhere). Resume where it was made, or "
              "start again (--overwrite), for figures of one.", file=sys.stderr)
    return elsewhere


def environment() -> dict:
    import platform

    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu": cpu_identity(), "argv": sys.argv}


# ----- presentation ------------------------------------------------------------------------------------
def _row(label: str, before: float | None, after: float | None) -> str:
    def text(value):
        return f"{value:8.2f}" if isinstance(value, (int, float)) else f"{'-':>8}"

    change = after - before if isinstance(before, (int, float)) and isinstance(after, (int, float)) else None
    return f"{label:<28} {text(before)} {text(after)} {('%+8.2f' % change) if change is not None else '':>8}"


def format_results(results: dict) -> str:
    """The before / after table printed by ``biasedit demo``."""
    before, after = results["before"], results["after"]
    lines = ["", f"{'metric (test split)':<28} {'before':>8} {'after':>8} {'change':>8}"]
    for bias_type, entry in after["stereoset"].items():
        for metric in ("ss", "lms", "icat"):
            lines.append(_row(f"StereoSet {bias_type} {metric.upper()}", before["stereoset"][bias_type][metric],
                              entry[metric]))
    for bias_type, entry in after.get("gender_swapped", {}).items():
        if bias_type != "overall":
            lines.append(_row(f"gender-swapped {bias_type} SS", before["gender_swapped"][bias_type]["ss"],
                              entry["ss"]))
    for bias_type, entry in after.get("crows", {}).items():
        lines.append(_row(f"CrowS-Pairs {bias_type}", before["crows"][bias_type]["metric"], entry["metric"]))
    lines.append(_row("perplexity", before["perplexity"], after["perplexity"]))
    deployment = results["protocols"].get("deployment")
    if deployment:
        lines.append(f"  (after = the deployment adapter: one joint delta from {deployment['edit_data']} "
                     f"({deployment['n_samples']} pairs), scaled x{deployment['scale']:.3g} as "
                     f"{deployment['calibrated_on']} says{_guard_note(deployment)}; SS ideal 50, LMS / ICAT ideal "
                     "100)")
    per_batch = results["protocols"]["per_batch"]
    shown = [(per_batch, "per-batch protocol (paper), reference SS")]
    if "other_units" in per_batch:
        shown.append((per_batch["other_units"], "per-batch protocol (paper), the paper code's SS"))
    shown.append((results["protocols"]["held_out"], "held-out target terms"))
    if "joint_on_test" in results["protocols"]:
        shown.append((results["protocols"]["joint_on_test"], "one joint delta from the test items, scored on them"))
    for protocol, label in shown:
        lines += ["", f"{label}: SS / LMS before -> after"]
        for bias_type, entry in protocol["after"].items():
            b = protocol["before"][bias_type]
            lines.append(f"  {bias_type:<10} SS {b['ss']:6.2f} -> {entry['ss']:6.2f}   "
                         f"LMS {b['lms']:6.2f} -> {entry['lms']:6.2f}   (n={entry['n']})")
    lines.append("")
    for name, check in results["targets"].items():
        lines.append(format_deployment_check(check) if name == "deployment" else format_target_check(name, check))
    merged = results.get("merged")
    if merged:
        lines.append(f"merged checkpoint {merged['path']}: reloaded without the adapter, max |metric difference| "
                     f"{merged['max_abs_metric_difference']:.2e} vs base + adapter"
                     + merge_rounding_note(results["config"].get("dtype")))
    lines.append(f"total {results['seconds']['total']:.0f} s: " +
                 ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items() if k != "total"))
    calibration = results.get("training", {}).get("calibration") or {}
    row = chosen_row(calibration) if calibration.get("rows") else {}
    by_type = by_type_summary(row)
    if by_type:
        lines.append(f"edit scale x{calibration['scale']:g}, chosen on the pooled calibration pairs (SS "
                     f"{row['ss_pre']:.1f}->{row['ss_post']:.1f}); by bias type there: {by_type}")
    if calibration.get("debias_gain", MIN_DEBIAS_GAIN) < MIN_DEBIAS_GAIN:
        lines.append(f"WARNING: the kept editor moved dev SS only {calibration['debias_gain']:.2f} points toward 50 "
                     "at its best edit scale: meta-training failed from this initialisation; rerun with another "
                     "--seed (docs/results.md, 'Over editor initialisations').")
    return "\n".join(lines)


def format_target_check(name: str, check: dict) -> str:
    """One line of a :func:`target_check`."""
    verdicts = ", ".join(f"{t}: |SS-50| {abs(r['ss'] - 50):.1f}{'' if r['ss_ok'] else ' (>3)'}, "
                         f"LMS drop {r['lms_drop']:.1f}{'' if r['lms_ok'] else ' (>3)'}"
                         for t, r in check.items() if t != "all_ok")
    return f"target |SS-50|<=3 and LMS drop<=3, {name}: {'met' if check['all_ok'] else 'NOT met'} ({verdicts})"


def format_deployment_check(check: dict) -> str:
    """One line of a ``deployment.deployment_check``."""
    def crows(row: dict) -> str:
        if row["crows_toward_50"] is None:
            return "CrowS -"
        away = "" if row["crows_toward_50"] else " (not toward 50)"
        return f"CrowS {row['crows_before']:.1f}->{row['crows_after']:.1f}{away}"

    cells = [f"{t}: SS {r['ss_before']:.1f}->{r['ss_after']:.1f}{'' if r['ss_halfway'] else ' (<half-way)'}"
             f"{' inside CI' if r['ss_outside_ci'] is False else ''}, {crows(r)}, LMS drop {r['lms_drop']:.1f}"
             f"{'' if r['lms_ok'] else ' (>3)'}" for t, r in check.items() if isinstance(r, dict)]
    rise = check["perplexity_rise"]
    over = "" if check["perplexity_ok"] else " (>5 %)"
    cells.append(f"perplexity {'-' if rise is None else f'{100 * rise:+.1f} %'}{over}")
    return (f"target deployment (SS half-way to 50, CrowS toward 50, LMS drop<=3, perplexity<=+5 %): "
            f"{'met' if check['all_ok'] else 'NOT met'} ({'; '.join(cells)})")


def plot_before_after(results: dict, path: str | Path) -> Path | None:
    """Grouped bars of SS, LMS and ICAT per bias type: before, after the deployment adapter (from ``train``), and
    after each batch's own edit (the paper's per-batch protocol); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = {"before": results["before"]["stereoset"], "deployment adapter": results["after"]["stereoset"]}
    if "protocols" in results:
        series["per-batch edits (paper)"] = results["protocols"]["per_batch"]["after"]
    types = list(series["before"])
    metrics_ = ("ss", "lms", "icat")
    figure, axes = plt.subplots(1, len(metrics_), figsize=(4.4 * len(metrics_), 3.8))
    width = 0.8 / len(series)
    for axis, metric in zip(axes, metrics_):
        for k, (label, scores) in enumerate(series.items()):
            offsets = [p - 0.4 + width * (k + 0.5) for p in range(len(types))]
            axis.bar(offsets, [scores[t][metric] for t in types], width, label=label)
        axis.set_xticks(list(range(len(types))), types, rotation=20)
        axis.set_title({"ss": "SS (ideal 50)", "lms": "LMS (ideal 100)", "icat": "ICAT (ideal 100)"}[metric])
        axis.set_ylim(0, 100)
        if metric == "ss":
            axis.axhline(50, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(loc="lower left", fontsize=8)
    figure.suptitle(f"BiasEdit on {results['before'].get('model')}: StereoSet test split")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""Meta-training of a :class:`~biasedit_peft.editor.editor.BiasEditor` (BiasEdit, Xu et al. 2025, Sec. 3).

One meta-step on ``n_edits`` samples:

1. cache keys / value gradients of the debias loss (normaliser statistics updated),
2. predict the deltas ``S`` (hyper-network + ridge solve, no autograd),
3. apply ``S`` functionally (``override_deltas``) and back-propagate the meta-loss
   ``debias(post-edit) + loc_coef * retention(pre -> post, unrelated sentences)
   [+ held_out_coef * debias(post-edit, held-out pairs)]`` to ``dL/dS`` only,
4. ``BiasEditor.meta_backward`` carries ``dL/dS`` through the solve into the editor; clip; Adam step.

The held-out term is MEND's and MALMEN's generalisation loss: the edit computed from one group is also scored
on another group of pairs of the same bias types and other target terms (:func:`held_out_group`: the next
group of the epoch, filtered), so the editor is trained for what a deployed adapter meets, pairs it was not
computed from. Its weight ``held_out_coef`` is 0 in the paper's presets.

Checkpoints: ``output_dir`` always holds the best editor so far (an editor folder); ``output_dir/checkpoint``
holds the latest resumable state (editor, optimiser, trainer state, and a manifest of their sha256), written as one
unit (built beside it, swapped in whole). A resume checks the manifest, and refuses other settings or data.
Ctrl-C writes a checkpoint of the last completed meta-step before it stops the run (the Adam update and the
step count are applied together, with SIGINT held back), so ``resume=True`` continues exactly from there.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_write, folder_in_place, verify_manifest, write_manifest
from ..distributed import Processes, as_processes, split_for, sum_gradients
from ..metrics import item_ss_lms
from ..profiling import EDITOR_RANGE, float32_range
from ..scoring import encode_sentences
from ..tuner.layout import native_from_key_value
from .cache import EditSample, as_edit_sample
from .calibration import (
    EDIT_SCALES,
    INITIAL_EDIT_SCALES,
    MAX_EDGE_STEPS,
    MAX_LMS_DROP,
    MAX_NLL_INCREASE,
    MIN_DEBIAS_GAIN,
    calibrate_edit_scale,
    chosen_row,
    debias_gain,
    scale_edits,
    target_score,
)
from .editor import (
    BiasEditor,
    encode_pairs,
    forward_logits,
    length_order,
)
from .losses import (
    gap_scale,
    level_loss,
    pair_debias_loss,
    pair_gap,
    pair_scores,
    retention_terms,
    soft_signs,
    soft_ss_of_sums,
    sums_by_type,
    type_indices,
)
from .replay import PrefixReplay

CHECKPOINT_DIR = "checkpoint"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


@dataclass
class BiasEditTrainingArguments:
    """Meta-training settings (see ``presets.py`` for the paper's values)."""

    output_dir: str
    n_edits: int = 64
    batch_size: int = 16
    meta_lr: float = 1e-5
    step_size_meta_lr: float | None = None
    """Adam learning rate of the editor's step sizes ``lr[m]`` alone; None: ``meta_lr``, as for every other
    parameter (MALMEN's one optimizer). The step sizes are plain (not log) parameters of order the preset's ``lr``,
    so ``meta_lr`` moves them by about ``meta_lr / lr`` of their value a step (100 % in the ``cpu`` preset); the
    ridge ``log_lambda`` moves by ``meta_lr`` relative."""
    loc_coef: float = 4.0
    level_coef: float = 0.0
    """Weight of the level loss (``losses.level_loss``: each pair's average log-prob kept; protects LMS)."""
    ss_coef: float = 0.0
    """Weight of the soft-SS term of the meta-loss (``losses.soft_ss_of``: each bias type's smoothed mean
    stereotype preference in the edit group, squared, weighted by its share of the group; experimental). With it,
    each LM batch's pair graph is kept until the group's term is known, once per meta-step."""
    held_out_coef: float = 0.0
    """Weight of the held-out debias loss: the edit scored on pairs of the same bias types and other target terms
    (:func:`held_out_group`; needs samples with ``target`` and ``bias_type``, as StereoSet items have)."""
    epochs: int = 100
    max_steps: int | None = None
    """Stop after this many meta-steps in total (counting those before a resume)."""
    eval_every: int | None = None
    """Validate (and checkpoint) every this many steps; None: at the end of each epoch."""
    early_stopping_patience: int = 3
    """Stop after this many validations in a row that do not improve the selection score (by more than
    :data:`SELECTION_TIE`)."""
    average_steps: int = 0
    """Validate, keep and calibrate an average of the editor's parameters over the meta-steps rather than the last
    iterate (Polyak averaging, :func:`average_weight`): their mean over the steps so far, and after ``average_steps``
    steps an exponential average over about that many. 0: the last iterate (MALMEN). Buffers (the normalisers) are
    the last iterate's either way. Without ``eval_data`` the validations are ranked by the last training batch's
    metrics, which the iterate made."""
    select_by: str = "target"
    """How validation picks the editor that is kept (``output_dir``) and counts early stopping:
    ``"target"``: the smallest dev ``|SS_post - 50|`` among validations whose LMS drop is at most
    ``max_lms_drop`` and whose mean token NLL on the unrelated sentences rose by at most ``max_nll_increase``
    (a validation outside them ranks after every one inside, by how far outside); ``"loss"``: the smallest
    dev meta-loss (the paper's early stopping); ``"held_out"``: as ``"target"``, with the SS of each dev group's
    held-out pairs (:func:`held_out_group`) under its edit. See :func:`selection_score`."""
    max_lms_drop: float = MAX_LMS_DROP
    """LMS points an editor may cost on dev and still be selected (``select_by="target"``)."""
    max_nll_increase: float = MAX_NLL_INCREASE
    """Rise of the mean token NLL of unrelated dev sentences allowed (``log 1.05``: ~5 % perplexity)."""
    max_grad_norm: float = 1.0
    seed: int = 0
    editor_device: str | None = None
    """Device of the editor nets (default: where they are); the LM stays where it is."""
    adapter_name: str = "default"
    calibrate: bool = True
    """After training, choose one multiplier of the kept editor's edits among ``edit_scales`` (and past its ends,
    ``edit_scale_edge_steps``) by the same selection on dev, and bake it into the editor (``calibration.py``; only
    with ``select_by="target"`` and dev data)."""
    edit_scales: tuple[float, ...] = EDIT_SCALES
    edit_scale_edge_steps: int = MAX_EDGE_STEPS
    """While the best multiple is the largest (or smallest) tried, try twice (half) it, up to this many times
    (``calibration.next_edge_scale``); 0: ``edit_scales`` only."""
    initial_edit_scale: bool = False
    """Before the first meta-step, multiply the editor's step sizes by the multiple of :data:`INITIAL_EDIT_SCALES`
    (and past its ends, ``edit_scale_edge_steps``) whose edits of the first ``initial_scale_groups`` training groups
    score best by the selection rule (:meth:`BiasEditTrainer.calibrate_initial_strength`). The preset's ``lr`` is
    the same for every model, and how far an untrained editor's edit at that ``lr`` moves SS is the model's: the
    ``cpu`` preset's breaks LMS by ~20 points on SmolLM2 and Gemma 3 270M (this picks x1/16 on both) and is within
    bounds on the testbed (x1). Experimental: whether starting meta-training at that strength gives a better editor
    is not measured (docs/results.md). False: the preset's ``lr``."""
    initial_scale_groups: int = 4
    """Training groups (of ``n_edits``) the initial strength is chosen on: the first of epoch 0's shuffle."""
    prefix_replay: bool = True
    """Run the edited forward passes from the first edited block on, replaying the unedited hidden states that
    enter it (``replay.py``; checked once against a full forward). Same results, fewer FLOPs."""
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.select_by not in SELECT_BY:
            raise ValueError(f"Unknown select_by {self.select_by!r}; choose one of {SELECT_BY}")
        if self.initial_scale_groups < 1:
            raise ValueError(f"initial_scale_groups must be at least 1, got {self.initial_scale_groups}")


SELECT_BY = ("target", "loss", "held_out")
SELECTION_TIE = 1e-6
"""Selection scores closer than this are a tie, which keeps the earlier editor. Dev SS is pooled from per-group
percentages in floating point, so one count can come out a few ulps apart; a real change is ``100 / N`` points."""
AVERAGE_NAME = "average.safetensors"
"""The averaged editor parameters in a checkpoint (``average_steps > 0``)."""


def read_average(checkpoint: str | Path, editor: BiasEditor) -> list[torch.Tensor]:
    """The averaged parameters saved in ``checkpoint`` (its :data:`AVERAGE_NAME`), in ``editor.parameters()`` order
    and on their devices."""
    from safetensors.torch import load_file

    average = load_file(str(Path(checkpoint) / AVERAGE_NAME))
    return [average[str(i)].to(p.device) for i, p in enumerate(editor.parameters())]


def average_weight(step: int, average_steps: int) -> float:
    """The weight of meta-step ``step``'s iterate (1-based) in the running parameter average: ``1 / step`` while
    ``step <= average_steps`` (the plain mean of the iterates so far), then ``1 / average_steps`` (an exponential
    average whose weights fall by ``1 - 1 / average_steps`` a step)."""
    return 1.0 / min(step, average_steps)


@dataclass
class TrainerState:
    """Where training stands (saved as ``trainer_state.json``)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_loss: float = math.inf
    """The best validation's selection score (:func:`selection_score`; the dev meta-loss for ``"loss"``)."""
    best_step: int | None = None
    """The meta-step of the kept (best) editor."""
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: dict | None = None
    """The edit-scale calibration of the kept editor (``calibrate_edit_scale``), once it ran."""
    initial_calibration: dict | None = None
    """The strength chosen before meta-training (``initial_edit_scale``), once it ran."""

    def best_record(self) -> dict | None:
        """The validation record of the kept editor (meta-step :attr:`best_step`) in :attr:`history`."""
        return next((record for record in self.history if record["step"] == self.best_step), None)

    def kept_record(self) -> dict | None:
        """:meth:`best_record` with the :attr:`calibration` merged in (:func:`calibrated_record`): the record the
        kept editor was saved with, and its card made from."""
        record = self.best_record()
        return calibrated_record(record or {}, self.calibration) if self.calibration else record


def calibrated_record(record: dict, calibration: dict) -> dict:
    """Validation ``record`` after the edit-scale ``calibration``: its chosen multiple (``edit_scale``), selection
    score and before / after figures on the calibration data (``eval_*``)."""
    chosen = chosen_row(calibration)
    return {**record, "edit_scale": calibration["scale"], "selection": chosen["selection"],
            **{f"eval_{k}": chosen[k] for k in ("ss_pre", "ss_post", "lms_pre", "lms_post", "nll_increase")}}


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "scalars": {}}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{index}.{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def meta_parameter_groups(editor: BiasEditor, args: BiasEditTrainingArguments) -> list[dict[str, Any]]:
    """The editor's parameters as Adam groups: one at ``meta_lr``, or, with ``step_size_meta_lr``, the step sizes
    ``lr[m]`` of every net in a second group at that rate (every other parameter first, in ``editor.parameters()``
    order)."""
    if args.step_size_meta_lr is None:
        return [{"params": list(editor.parameters())}]
    step_sizes = [net.lr for net in editor.nets.values()]
    chosen = {id(p) for p in step_sizes}
    return [{"params": [p for p in editor.parameters() if id(p) not in chosen]},
            {"params": step_sizes, "lr": args.step_size_meta_lr}]


def selection_score(metrics: dict[str, float], args: BiasEditTrainingArguments) -> float:
    """How good the editor behind one validation's ``metrics`` (an :meth:`BiasEditTrainer.evaluate` dict) is;
    lower is better.

    ``"loss"``: the meta-loss. ``"target"``: ``|ss_post - 50|`` when the LMS drop is at most ``max_lms_drop``
    and ``nll_increase`` at most ``max_nll_increase``; else ``100 +`` the excess LMS drop ``+ 100 x`` the
    excess NLL rise (so every editor within both bounds ranks first, and the rest by how far they are out;
    ``calibration.target_score``).
    """
    if args.select_by == "loss":
        return float(metrics["loss"])
    if args.select_by == "held_out":
        metrics = {**metrics, "ss_post": metrics["held_out_ss_post"]}
    return target_score(metrics, args.max_lms_drop, args.max_nll_increase)


def unlabelled_samples(samples: Sequence[EditSample]) -> list[int]:
    """Indices of the samples without a ``target`` or ``bias_type`` (the held-out meta-loss needs both)."""
    return [i for i, s in enumerate(samples) if s.target is None or s.bias_type is None]


def held_out_group(edit: Sequence[EditSample], pool: Sequence[EditSample]) -> list[EditSample]:
    """The samples of ``pool`` whose bias type is one of ``edit``'s and whose target term is none of ``edit``'s.

    Raises:
        ValueError: A sample has no ``target`` or ``bias_type``.
    """
    unlabelled = unlabelled_samples([*edit, *pool])
    if unlabelled:
        raise ValueError("The held-out meta-loss needs samples with 'target' and 'bias_type' (StereoSet items or "
                         f"dicts with both keys); samples {unlabelled[:5]} of the group have none")
    types, targets = {s.bias_type for s in edit}, {s.target for s in edit}
    return [s for s in pool if s.bias_type in types and s.target not in targets]


RESUMABLE_CHANGES = ("output_dir", "max_steps", "epochs", "progress", "resume", "editor_device")
"""Training arguments a resumed run may change (how long and where it runs, not what it computes)."""
SOFT_SS_FORM = "per_type"
"""What the soft-SS term is (``losses.soft_ss_of``), kept in checkpoints: checkpoints from before a8e85ac hold
none and trained the ``"pooled"`` form (one mean sign for the whole group), so one that trained with the term is
not resumed under this one (:func:`resume_mismatches`)."""
ADDED_LATER_ARGS = ("step_size_meta_lr", "average_steps", "ss_coef")
"""Training arguments newer than some checkpoints, whose default is what the older code did: a checkpoint without
one is compared as if it held the default (``step_size_meta_lr=None``: one Adam group)."""


def resume_mismatches(saved: dict, args: BiasEditTrainingArguments, saved_config, config,
                      data: dict[str, int], inputs: dict[str, str] | None = None) -> dict[str, tuple]:
    """``{field: (checkpoint's value, this run's)}`` for every training argument (but
    :data:`RESUMABLE_CHANGES`), editor setting (``loss``, ``rank``, ``n_blocks``, ``chunk_size``), data size
    (``--limit``, other data) and input (``inputs``: the model's dtype, its base weights' digest, each data set's
    digest, :func:`run_inputs`) that differs between checkpoint ``saved`` (its ``trainer_state.json``) and now.
    The base model's name (``base_model``, as given: a path depends on the working directory) is compared only
    where the checkpoint holds no weights digest, and named beside the digests where those differ.
    A training argument the checkpoint does not name is not compared, except those of :data:`ADDED_LATER_ARGS`,
    which count as their default there (what older code did); nor is an input it does not record (checkpoints from
    before the inputs were kept). A checkpoint that trained with the soft-SS term in another form than
    :data:`SOFT_SS_FORM` differs in ``"soft-SS form"``."""
    differing = {}
    saved_args = saved.get("args", {})
    defaults = {f.name: f.default for f in fields(BiasEditTrainingArguments) if f.name in ADDED_LATER_ARGS}
    for name, value in asdict(args).items():
        if name in RESUMABLE_CHANGES or name not in saved_args and name not in defaults:
            continue
        before = saved_args.get(name, defaults.get(name))
        if (list(before) if isinstance(before, (list, tuple)) else before) != \
                (list(value) if isinstance(value, (list, tuple)) else value):
            differing[name] = (before, value)
    saved_form = saved.get("soft_ss_form", "pooled")
    if saved_args.get("ss_coef") and saved_form != SOFT_SS_FORM:
        differing["soft-SS form"] = (saved_form, SOFT_SS_FORM)
    # the base model's name as given counts only where the checkpoint has no digest of its weights (from before
    # it was kept): the same folder by another path, or the same weights from another file, is the same model
    weighed = "base weights" in saved.get("inputs", {}) and "base weights" in (inputs or {})
    for name in ("loss", "rank", "n_blocks", "chunk_size") + (() if weighed else ("base_model",)):
        if getattr(saved_config, name) != getattr(config, name):
            differing[name] = (getattr(saved_config, name), getattr(config, name))
    for split, count in data.items():
        if saved.get("data", {}).get(split, count) != count:
            differing[f"{split} samples"] = (saved["data"][split], count)
    for name, value in (inputs or {}).items():
        if saved.get("inputs", {}).get(name, value) != value:
            differing[name] = (saved["inputs"][name], value)
    if "base weights" in differing and saved_config.base_model != config.base_model:
        differing["base_model"] = (saved_config.base_model, config.base_model)  # named beside the digests
    return differing


def base_weights_digest(peft_model: nn.Module) -> str | None:
    """``"sha256 HEX16"`` of the model's base parameters (names, dtypes, shapes, bytes), the adapters' own
    parameters left out and the names stripped of what wrapping adds (``base_model.model.``, ``.base_layer``,
    DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``): the weights a run edits, whatever name or path loaded
    them. None where a parameter is not in memory (``meta``: offloaded by accelerate). Computed once per run (a
    fraction of a second for SmolLM2-135M on a CPU core)."""
    from ..progress_store import tensors_digest
    from ..tuner.model import BiasEditModel

    named = {_unwrapped_name(name): p for name, p in peft_model.named_parameters()
             if BiasEditModel.prefix not in name}
    if any(p.is_meta for p in named.values()):
        return None
    return tensors_digest(named)


def _unwrapped_name(name: str) -> str:
    """A parameter's name in the bare transformers model: ``module.base_model.model.h.0.mlp.base_layer.weight`` ->
    ``h.0.mlp.weight``."""
    for wrapper in ("module.", "_orig_mod.", "base_model.model."):
        name = name.removeprefix(wrapper)
    return name.replace(".base_layer.", ".")


def run_inputs(layers: dict[str, nn.Module], data: dict[str, Sequence[EditSample]],
               base_weights: str | None = None) -> dict[str, str]:
    """What a training run computes on beyond its settings, kept in its checkpoints so that a resume on other inputs
    is refused (:func:`resume_mismatches`): ``"model dtype"``, the dtypes of the edited ``layers``' base weights
    (not the adapter's float32 deltas, nor an embedding kept in float32), ``"base weights"`` when given
    (:func:`base_weights_digest`), and ``"SPLIT data"``, a digest of every field of ``data[SPLIT]``'s samples in
    order (another file with as many rows differs)."""
    import hashlib

    dtypes = sorted({str(layer.get_base_layer().weight.dtype).removeprefix("torch.") for layer in layers.values()})
    inputs = {"model dtype": ", ".join(dtypes)}
    if base_weights is not None:
        inputs["base weights"] = base_weights
    for split, samples in data.items():
        text = json.dumps([asdict(sample) for sample in samples], ensure_ascii=False)
        inputs[f"{split} data"] = "sha256 " + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return inputs


class BiasEditTrainer:
    """Meta-trains ``editor`` on ``train_data`` (StereoSet-like samples with an unrelated sentence).

    Args:
        peft_model: The model with the BiasEdit adapter the editor edits.
        editor: The editor to train (``BiasEditor.for_model``).
        args: The settings (``BiasEditTrainingArguments``; presets in ``presets.py``).
        train_data: Edit samples for the meta-steps (StereoSet items, dicts or tuples, each with ``unrelated``).
        eval_data: Validation samples (selection, early stopping, calibration); None: the last training batch
            validates and nothing is calibrated.
        tokenizer: The model's tokenizer (default: loaded from the model's ``name_or_path``).
        calibration_data: The samples the kept editor's edit scale is calibrated on (default: ``eval_data``),
            e.g. ``dev`` plus ``train-calib``: more target terms than ``dev`` alone, none meta-trained on. Only
            with ``eval_data``, ``calibrate`` and ``select_by="target"`` (else ValueError).

    Raises:
        ValueError: Empty data, a sample without an unrelated sentence, or ``calibration_data`` that nothing
            would use.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        editor: BiasEditor,
        args: BiasEditTrainingArguments,
        train_data: Sequence[Any],
        eval_data: Sequence[Any] | None = None,
        tokenizer=None,
        processes: Any | None = None,
        calibration_data: Sequence[Any] | None = None,
    ):
        self.model, self.editor, self.args = peft_model, editor, args
        self.processes: Processes = as_processes(processes)  # Processes, an Accelerator, or None: the launcher's
        self.train_data = self._samples(train_data, "train_data")
        self.eval_data = self._samples(eval_data, "eval_data") if eval_data else []
        self.calibration_data = (self._samples(calibration_data, "calibration_data") if calibration_data
                                 else self.eval_data)
        if calibration_data and not (self.eval_data and self._calibrates()):
            raise ValueError("calibration_data is only used by the edit-scale calibration, which needs eval_data "
                             "(validation keeps the editor that is calibrated), calibrate=True and "
                             f"select_by='target' (got {args.select_by!r}); drop it or change those")
        self._check_held_out_labels()
        if tokenizer is None:
            from .editor import _load_tokenizer_for

            tokenizer = _load_tokenizer_for(peft_model)
        self.tokenizer = tokenizer
        self.layers = editor.check_compatible(peft_model)
        self.base_weights = base_weights_digest(peft_model)
        """The base weights' digest, kept in checkpoints (every process computes it: each checks a resume)."""
        self.replay = PrefixReplay(peft_model, list(self.layers.values()))
        self.replay.enabled = self.replay.enabled and args.prefix_replay
        self._replay_checked = False
        if args.editor_device is not None:
            editor.to(args.editor_device)
        self.processes.broadcast_module(editor)  # several processes start from rank 0's editor
        self.optimizer = torch.optim.Adam(meta_parameter_groups(editor, args), lr=args.meta_lr)
        self.average = ([p.detach().clone() for p in editor.parameters()] if args.average_steps > 0 else None)
        """The running average of the editor's parameters (``average_steps``), in ``parameters()`` order."""
        self.state = TrainerState()
        editor.provenance.update(splits={"train": len(self.train_data), "eval": len(self.eval_data),
                                         "calibration": len(self.calibration_data)},
                                 training_args=asdict(args))  # for the editor's model card

    @staticmethod
    def _samples(data: Sequence[Any], what: str) -> list[EditSample]:
        samples = [as_edit_sample(sample, index) for index, sample in enumerate(data)]
        if not samples:
            raise ValueError(f"{what} is empty")
        missing = [i for i, s in enumerate(samples) if not s.unrelated]
        if missing:
            raise ValueError(f"{what}: samples {missing[:5]} have no 'unrelated' sentence (needed for retention)")
        return samples

    def _check_held_out_labels(self) -> None:
        needs = {"train_data": self.args.held_out_coef > 0,
                 "eval_data": self.args.held_out_coef > 0 or self.args.select_by == "held_out"}
        for what, samples in (("train_data", self.train_data), ("eval_data", self.eval_data)):
            unlabelled = unlabelled_samples(samples) if needs[what] else []
            if unlabelled:
                raise ValueError(f"{what}: samples {unlabelled[:5]} have no 'target' / 'bias_type', which the "
                                 "held-out meta-loss and selection need (StereoSet items have both)")

    # ----- one meta-step ----------------------------------------------------------------------------
    def _natives(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Key -> value deltas ``[d_in, d_out]`` in each layer's native layout and device (keeps autograd)."""
        natives = {}
        for name, delta in deltas.items():
            layer = self.layers[name]
            natives[name] = native_from_key_value(delta, layer.fan_in_fan_out).to(layer.get_base_layer().weight.device)
        return natives

    def edit_step(self, samples: list[EditSample], train: bool,
                  held_out: Sequence[EditSample] = ()) -> dict[str, float]:
        """One edit of ``samples``; with ``train`` also the meta-update. Returns the batch metrics.

        ``held_out``: pairs the edit is also scored on (:func:`held_out_group`); their debias loss enters the
        meta-loss with weight ``held_out_coef``, and their SS before / after is reported (``held_out_*``).
        """
        from ..tuner.deltas import override_deltas

        args, kind, processes = self.args, self.editor.config.loss, self.processes
        self.model.eval()
        n = len(samples)  # every loss is a sum over all n pairs / n, whichever process holds them
        ordered = [samples[i] for i in length_order(self.tokenizer, samples).tolist()]  # LM batches pad little
        samples = split_for(processes, ordered)  # this process's block (all of them for one process)
        self._checked_replay(samples)
        with self.replay.record() as pair_prefixes:  # one per LM batch, in the order of the loop below
            cache, pre_stereo, pre_anti = self.editor.cache_samples(
                self.model, self.tokenizer, samples, args.batch_size,
                update_normalizers=train and not processes.distributed,
            )
        if train and processes.distributed:
            self.editor.merge_normalizers(cache, processes)  # the statistics of every process's rows
        solutions = self.editor.predict(cache, processes=processes)
        leaves = {name: s.delta.dense().requires_grad_(train) for name, s in solutions.items()}
        delta_grads = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
        names = list(leaves)

        def accumulate(loss: torch.Tensor) -> None:
            if train:
                for name, grad in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])):
                    delta_grads[name] += grad

        natives = self._natives(leaves)  # the deltas in each layer's layout, once per step (autograd kept)
        post_stereo, post_anti, pre_unrelated, post_unrelated = [], [], [], []
        debias_total = retention_total = level_total = 0.0
        # with ss_coef: each LM batch's pair loss and soft signs wait for the group's mean signs (one accumulate)
        scale = gap_scale(processes.gather_rows(pre_stereo - pre_anti)).item() if args.ss_coef else None
        waiting, signs = [], []
        with torch.set_grad_enabled(train):
            for number, start in enumerate(range(0, len(samples), args.batch_size)):
                chunk = samples[start:start + args.batch_size]
                batch = encode_pairs(self.tokenizer, chunk)
                prefix = pair_prefixes[number] if pair_prefixes else None
                with override_deltas(self.model, natives, args.adapter_name), self.replay.replay(prefix):
                    logits = forward_logits(self.model, batch)
                stereo, anti = pair_scores(logits, batch.to(logits.device))  # the vocabulary pass, once
                loss = pair_debias_loss(kind, stereo, anti).sum() / n
                debias_total += loss.item()
                if args.level_coef:
                    level = level_loss(stereo, anti, pre_stereo[start:start + len(chunk)],
                                       pre_anti[start:start + len(chunk)]).sum() / n
                    level_total += level.item()
                    loss = loss + args.level_coef * level
                if scale is None:
                    accumulate(loss)
                else:
                    waiting.append(loss)
                    signs.append(soft_signs(pair_gap(stereo, anti), scale))
                post_stereo.append(stereo.mean.detach().cpu())
                post_anti.append(anti.mean.detach().cpu())

                unrelated = encode_sentences(self.tokenizer, [s.unrelated for s in chunk])
                with torch.no_grad(), self.replay.record() as unrelated_prefix:
                    pre_logits = forward_logits(self.model, unrelated)
                prefix = unrelated_prefix[0] if unrelated_prefix else None
                with override_deltas(self.model, natives, args.adapter_name), self.replay.replay(prefix):
                    post_logits = forward_logits(self.model, unrelated)
                retention, pre_scores, post_scores = retention_terms(kind, pre_logits, post_logits,
                                                                     unrelated.to(post_logits.device))
                loss = retention.sum() / n
                accumulate(args.loc_coef * loss)
                retention_total += loss.item()
                pre_unrelated.append(pre_scores.mean.detach().cpu())
                post_unrelated.append(post_scores.mean.detach().cpu())
            held = self._held_out_terms(held_out, natives, accumulate) if held_out else {}
            soft_ss = (self._soft_ss_terms(waiting, signs, [s.bias_type for s in ordered], accumulate)
                       if scale is not None else 0.0)

        if train:
            if processes.distributed:  # dL/dS of every process's pairs: the same on each
                delta_grads = {name: processes.sum(grad) for name, grad in delta_grads.items()}
            if not all(torch.isfinite(g).all() for g in delta_grads.values()):
                raise FloatingPointError("Non-finite meta-gradient dL/dS; lower the editor lr or meta_lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.editor.meta_backward(cache, solutions, delta_grads, count_ridge=processes.is_main)
            sum_gradients(self.editor, processes)  # each process's rows: the one-process gradient
            with deferred_interrupts(), float32_range(EDITOR_RANGE):  # the update and its count: both or neither
                torch.nn.utils.clip_grad_norm_(self.editor.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.state.step_in_epoch += 1
                self.state.global_step += 1
                self._update_average()

        # losses summed over the processes, per-pair scores gathered in rank (= length) order
        debias_total, retention_total, level_total = processes.sum(
            torch.tensor([debias_total, retention_total, level_total], dtype=torch.float64)).tolist()
        pre_stereo, pre_anti, post_stereo, post_anti, pre_unrelated, post_unrelated = (
            processes.gather_rows(scores) for scores in (pre_stereo, pre_anti, torch.cat(post_stereo),
                                                         torch.cat(post_anti), torch.cat(pre_unrelated),
                                                         torch.cat(post_unrelated)))
        pre = item_ss_lms(pre_stereo, pre_anti, pre_unrelated)
        post = item_ss_lms(post_stereo, post_anti, post_unrelated)
        held_out_debias = held.get("held_out_debias", 0.0)
        return {
            "debias": debias_total,
            "retention": retention_total,
            "level": level_total,
            "soft_ss": soft_ss,
            "held_out_debias": held_out_debias,
            "loss": debias_total + args.loc_coef * retention_total + args.level_coef * level_total
            + args.ss_coef * soft_ss + args.held_out_coef * held_out_debias,
            "ss_pre": pre["ss"], "ss_post": post["ss"], "lms_pre": pre["lms"], "lms_post": post["lms"],
            "nll_increase": (pre_unrelated - post_unrelated).mean().item(),
            **held,
        }

    def _soft_ss_terms(self, waiting: list[torch.Tensor], signs: list[torch.Tensor],
                       group_types: Sequence[str | None], accumulate) -> float:
        """Accumulate the LM batches' ``waiting`` pair losses (scalars) and ``ss_coef`` times the soft-SS term
        (``losses.soft_ss_of``) of the whole group, whose bias types ``group_types`` ``[n]`` (in the group's length
        order) every process knows and whose soft signs ``signs`` (``[P_b]`` per LM batch, this process's block of
        that order: ``Processes.shard``) may lie on several processes; returns the term.

        With ``m_t`` the mean sign of type ``t`` over every process, each process adds
        ``sum_t 2 m_t sum_{p local in t} sign_p / n``, the ``m_t`` constants: its gradient in every local pair's
        gap is that of ``sum_t (n_t / n) m_t^2``, so the processes' summed meta-gradients are the one-process
        ones.
        """
        types, n_types = type_indices(group_types)
        local = torch.cat(signs)
        local_sums = sums_by_type(local, types[self.processes.shard(len(types))], n_types)
        counts = torch.bincount(types, minlength=n_types).double()
        group_sums = self.processes.sum(local_sums.detach().double().cpu())  # every process's signs, per type
        mean_signs = group_sums / counts  # m_t, constants
        linear = (2 * mean_signs.to(local.device, local.dtype) * local_sums).sum() / len(types)
        accumulate(sum(waiting) + self.args.ss_coef * linear)
        return soft_ss_of_sums(group_sums, counts).item()

    def _held_out_terms(self, held_out: Sequence[EditSample], natives: dict[str, torch.Tensor],
                        accumulate) -> dict[str, float]:
        """The post-edit debias loss of ``held_out`` (summed over pairs ``/ len(held_out)``; into ``accumulate``
        weighted by ``held_out_coef``) and their item-level SS before / after the edit."""
        from ..tuner.deltas import override_deltas

        args, kind, processes = self.args, self.editor.config.loss, self.processes
        n_held = len(held_out)
        held_out = split_for(processes, [held_out[i] for i in length_order(self.tokenizer, held_out).tolist()])
        total, pre_s, pre_a, post_s, post_a = 0.0, [], [], [], []
        for start in range(0, len(held_out), args.batch_size):
            batch = encode_pairs(self.tokenizer, held_out[start:start + args.batch_size])
            with torch.no_grad(), self.replay.record() as recorded:
                pre_logits = forward_logits(self.model, batch)
            with override_deltas(self.model, natives, args.adapter_name), \
                    self.replay.replay(recorded[0] if recorded else None):
                logits = forward_logits(self.model, batch)
            batch = batch.to(logits.device)
            post = pair_scores(logits, batch)  # the vocabulary pass, once
            loss = pair_debias_loss(kind, *post).sum() / n_held
            if args.held_out_coef:
                accumulate(args.held_out_coef * loss)
            total += loss.item()
            for (stereo, anti), into_s, into_a in ((pair_scores(pre_logits, batch), pre_s, pre_a),
                                                   (post, post_s, post_a)):
                into_s.append(stereo.mean.detach().cpu())
                into_a.append(anti.mean.detach().cpu())
        total = float(processes.sum(torch.tensor([total], dtype=torch.float64)))
        pre_s, pre_a, post_s, post_a = (processes.gather_rows(torch.cat(scores))
                                        for scores in (pre_s, pre_a, post_s, post_a))
        return {"held_out_debias": total, "held_out_ss_pre": item_ss_lms(pre_s, pre_a)["ss"],
                "held_out_ss_post": item_ss_lms(post_s, post_a)["ss"], "held_out_n": float(n_held)}

    # ----- loops ------------------------------------------------------------------------------------
    def _batches(self, samples: list[EditSample], epoch: int | None) -> list[list[EditSample]]:
        order = list(range(len(samples)))
        if epoch is not None:
            random.Random(self.args.seed * 1_000_003 + epoch).shuffle(order)
        n_edits = self.args.n_edits
        return [[samples[i] for i in order[s:s + n_edits]] for s in range(0, len(order), n_edits)]

    def _held_out(self, batches: list[list[EditSample]], index: int, validating: bool = False) -> list[EditSample]:
        """The held-out pairs of ``batches[index]``: :func:`held_out_group` of the next batch (none with one
        batch, or when neither the meta-loss nor, when ``validating``, the selection uses them)."""
        wanted = self.args.held_out_coef > 0 or (validating and self.args.select_by == "held_out")
        if not wanted or len(batches) < 2:
            return []
        return held_out_group(batches[index], batches[(index + 1) % len(batches)])

    def evaluate(self) -> dict[str, float]:
        """Mean metrics of editing each ``n_edits`` group of ``eval_data`` (no meta-update), weighted by the group
        size (the ``held_out_ss_*`` ones by the held-out group's size)."""
        batches = self._batches(self.eval_data, None)
        results = [self.edit_step(batch, train=False, held_out=self._held_out(batches, k, validating=True))
                   for k, batch in enumerate(batches)]
        pooled = {}
        for key in dict.fromkeys(key for result in results for key in result):
            weighted = [(r["held_out_n"] if key.startswith("held_out_ss") else len(batch), r[key])
                        for batch, r in zip(batches, results) if key in r]
            pooled[key] = sum(w * v for w, v in weighted) / sum(w for w, _ in weighted)
        if self.args.select_by == "held_out" and "held_out_ss_post" not in pooled:
            raise ValueError("select_by='held_out' needs dev groups with held-out pairs: at least two groups of "
                             "n_edits dev samples with other target terms of the same bias types")
        return pooled

    def train(self) -> TrainerState:
        """Meta-train until ``epochs`` / ``max_steps`` / early stopping, then calibrate the kept editor.

        Returns:
            The final :class:`TrainerState` (also in ``output_dir/checkpoint/trainer_state.json``). The kept editor
            is in ``output_dir``.
        """
        args = self.args
        torch.manual_seed(args.seed)
        if args.resume and (Path(args.output_dir) / CHECKPOINT_DIR / STATE_NAME).is_file():
            self.load_checkpoint()
        if args.initial_edit_scale and self.state.global_step == 0 and self.state.initial_calibration is None:
            self.calibrate_initial_strength()
        steps_per_epoch = math.ceil(len(self.train_data) / args.n_edits)
        total = steps_per_epoch * args.epochs
        if args.max_steps is not None:
            total = min(args.max_steps, total)
        metrics: dict[str, float] = {"loss": math.inf}
        bar = tqdm(total=total, initial=min(self.state.global_step, total), desc="meta-training",
                   disable=not args.progress or not self.processes.is_main, dynamic_ncols=True)
        try:
            while self.state.epoch < args.epochs and not self._done():
                batches = self._batches(self.train_data, self.state.epoch)
                while self.state.step_in_epoch < len(batches) and not self._done():
                    step = self.state.step_in_epoch
                    metrics = self.edit_step(batches[step], train=True,
                                             held_out=self._held_out(batches, step))  # counts the step
                    bar.update(1)
                    bar.set_postfix(debias=f"{metrics['debias']:.4f}", retain=f"{metrics['retention']:.4f}",
                                    ss=f"{metrics['ss_pre']:.0f}->{metrics['ss_post']:.0f}",
                                    lms=f"{metrics['lms_pre']:.0f}->{metrics['lms_post']:.0f}")
                    if args.eval_every and self.state.global_step % args.eval_every == 0:
                        self._validate(metrics)
                if self.state.step_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    if not args.eval_every:
                        self._validate(metrics)
            if not self.state.history or self.state.history[-1].get("step") != self.state.global_step:
                self.save_checkpoint()
            bar.close()
            if self._calibrates() and self.state.calibration is None:
                self.calibrate()
        except KeyboardInterrupt:
            bar.close()
            directory = self.save_checkpoint()
            print(f"\nInterrupted after meta-step {self.state.global_step}: checkpoint written to {directory}; "
                  "continue with resume=True (--resume).", file=sys.stderr)
            raise
        finally:
            bar.close()
        return self.state

    def _checked_replay(self, samples: Sequence[EditSample] | None = None) -> PrefixReplay:
        """The trainer's :class:`PrefixReplay`, checked against a full forward on its first use (on the
        unrelated sentences of ``samples``, else of the training data)."""
        if not self._replay_checked:
            probe_samples = (samples or self.train_data)[:self.args.batch_size]
            probe = encode_sentences(self.tokenizer, [s.unrelated for s in probe_samples])
            self.replay.check(lambda: forward_logits(self.model, probe))
            self._replay_checked = True
        return self.replay

    def _calibrates(self) -> bool:
        return self.args.calibrate and bool(self.calibration_data) and self.args.select_by == "target"

    def calibrate(self) -> dict:
        """Calibrate the kept editor's edit scale on ``calibration_data`` (``calibration.py``; dev by default),
        bake it in and save it to ``output_dir``; recorded in the state (and the checkpoint) as ``calibration``."""
        args = self.args
        self.processes.barrier()  # the main process has written the kept editor
        kept = BiasEditor.from_pretrained(args.output_dir, device=self.editor.device)
        kept.provenance = dict(self.editor.provenance)
        calibration = calibrate_edit_scale(
            kept, self.model, self.tokenizer, self._batches(self.calibration_data, None),
            lambda row: selection_score(row, args), args.batch_size, args.edit_scales, args.adapter_name,
            progress=args.progress, replay=self._checked_replay(), max_edge_steps=args.edit_scale_edge_steps)
        scale_edits(kept, calibration["scale"])
        chosen = chosen_row(calibration)
        calibration["debias_gain"] = debias_gain(chosen)
        if calibration["debias_gain"] < MIN_DEBIAS_GAIN and self.processes.is_main:
            warnings.warn(
                f"The kept editor hardly debiases the validation pairs: their SS goes {chosen['ss_pre']:.1f} -> "
                f"{chosen['ss_post']:.1f} at its best edit scale x{calibration['scale']:.3g} "
                f"({calibration['debias_gain']:.2f} points toward 50, under {MIN_DEBIAS_GAIN:g}). Meta-training did "
                "not find a debiasing editor from this initialisation; train again with another seed.", stacklevel=2)
        record = calibrated_record(self.state.best_record() or {}, calibration)
        if self.processes.is_main:
            kept.save_pretrained(args.output_dir, validation=record)
        self.state.calibration = calibration
        self.save_checkpoint()
        return calibration

    def calibrate_initial_strength(self) -> dict:
        """Scale the untrained editor's step sizes by the best multiple of :data:`INITIAL_EDIT_SCALES` on the
        first ``initial_scale_groups`` training groups (``initial_edit_scale``); recorded in the state as
        ``initial_calibration``.

        The editor cannot edit before its normalisers have seen rows, so those groups' rows are folded in for
        the choice and the normalisers are then put back as they were: meta-training starts from the same
        statistics with or without this step, and only the step sizes differ.
        """
        args = self.args
        groups = self._batches(self.train_data, 0)[:args.initial_scale_groups]
        normalizers = {key: {name: value.clone() for name, value in net.normalizer.state_dict().items()}
                       for key, net in self.editor.nets.items()}
        try:
            for group in groups:
                self.editor.cache_samples(self.model, self.tokenizer, group, args.batch_size, update_normalizers=True)
            calibration = calibrate_edit_scale(
                self.editor, self.model, self.tokenizer, groups,
                lambda row: target_score(row, args.max_lms_drop, args.max_nll_increase),
                args.batch_size, INITIAL_EDIT_SCALES, args.adapter_name, progress=args.progress,
                replay=self._checked_replay(), max_edge_steps=args.edit_scale_edge_steps)
        finally:
            for key, net in self.editor.nets.items():
                net.normalizer.load_state_dict(normalizers[key])
        scale_edits(self.editor, calibration["scale"])
        if self.average is not None:
            self.average = [p.detach().clone() for p in self.editor.parameters()]
        self.state.initial_calibration = calibration
        return calibration

    def _done(self) -> bool:
        return self.state.stopped_early or (
            self.args.max_steps is not None and self.state.global_step >= self.args.max_steps
        )

    def _update_average(self) -> None:
        """Fold the editor's parameters after a meta-step into :attr:`average` (:func:`average_weight`)."""
        if self.average is not None:
            weight = average_weight(self.state.global_step, self.args.average_steps)
            torch._foreach_lerp_(self.average, [p.detach() for p in self.editor.parameters()], weight)

    @contextmanager
    def _averaged_editor(self) -> Iterator[None]:
        """The editor holds :attr:`average` inside the block (nothing changes without averaging), and its own
        parameters again after it."""
        if self.average is None:
            yield
            return
        parameters = list(self.editor.parameters())
        iterate = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            torch._foreach_copy_(parameters, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(parameters, iterate)

    def _validate(self, train_metrics: dict[str, float]) -> None:
        """Validate (the averaged editor with ``average_steps``), save the best editor, checkpoint, and update
        early stopping."""
        with self._averaged_editor():
            measured = self.evaluate() if self.eval_data else train_metrics
            score = selection_score(measured, self.args)
            record = {"step": self.state.global_step, "epoch": self.state.epoch,
                      **{f"train_{k}": v for k, v in train_metrics.items()},
                      **({f"eval_{k}": v for k, v in measured.items()} if self.eval_data else {}),
                      "selection": score}
            self.state.history.append(record)
            improved = score < self.state.best_loss - SELECTION_TIE
            if improved:
                self.state.best_loss, self.state.best_step, self.state.bad_evals = score, self.state.global_step, 0
                if self.processes.is_main:
                    self.editor.save_pretrained(self.args.output_dir, validation=record)
        if not improved:
            self.state.bad_evals += 1
            if self.state.bad_evals >= self.args.early_stopping_patience:
                self.state.stopped_early = True
        self.save_checkpoint()

    # ----- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Editor + optimiser + trainer state + ``manifest.json`` (each file's sha256) under
        ``output_dir/checkpoint``, written as one unit: the folder is built beside it and swapped in whole
        (``_io.folder_in_place``), so a kill at any moment leaves the previous checkpoint or the new one."""
        from safetensors.torch import save_file

        directory = Path(self.args.output_dir) / CHECKPOINT_DIR
        if not self.processes.is_main:  # every process holds the same state; the main one writes it
            return directory
        with folder_in_place(directory) as building:
            self.editor.save_pretrained(building)
            tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
            atomic_write(building / OPTIMIZER_NAME, lambda path: save_file(tensors, path))  # mode: the umask's
            if self.average is not None:
                average = {str(i): t.contiguous() for i, t in enumerate(self.average)}
                atomic_write(building / AVERAGE_NAME, lambda path: save_file(average, path))
            settings = {k: v for k, v in asdict(self.args).items() if k != "output_dir"}  # the folder may move
            state = {"trainer": asdict(self.state), "optimizer": meta, "args": settings,
                     "data": self._data_sizes(), "inputs": self._inputs(), "soft_ss_form": SOFT_SS_FORM}
            (building / STATE_NAME).write_text(json.dumps(state, indent=2, default=float) + "\n", encoding="utf-8")
            write_manifest(building)
        if not (Path(self.args.output_dir) / "config.json").is_file():  # no validation yet: best = latest
            self.editor.save_pretrained(self.args.output_dir)
        return directory

    def _data_sizes(self) -> dict[str, int]:
        """Samples per data set, kept in a checkpoint so that a resume with other data is refused."""
        return {"train": len(self.train_data), "eval": len(self.eval_data), "calibration": len(self.calibration_data)}

    def _inputs(self) -> dict[str, str]:
        """The model's dtype, its base weights' digest and the data sets' digests (:func:`run_inputs`), kept in
        a checkpoint."""
        return run_inputs(self.layers, {"train": self.train_data, "eval": self.eval_data,
                                        "calibration": self.calibration_data}, self.base_weights)

    def load_checkpoint(self) -> None:
        """Restore editor, optimiser and trainer state from ``output_dir/checkpoint``, after checking its manifest
        and that the run's settings and data are the checkpoint's (:func:`resume_mismatches`).

        Raises:
            ValueError: A file that does not match the manifest, or settings that differ (named).
        """
        from safetensors.torch import load_file

        directory = Path(self.args.output_dir) / CHECKPOINT_DIR
        verify_manifest(directory)
        saved = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
        restored = BiasEditor.from_pretrained(directory)
        if restored.config.targets != self.editor.config.targets:
            raise ValueError(f"Checkpoint {directory} edits {sorted(restored.config.targets)}, "
                             f"not {sorted(self.editor.config.targets)}")
        differing = resume_mismatches(saved, self.args, restored.config, self.editor.config, self._data_sizes(),
                                      self._inputs())
        if differing:
            raise ValueError(f"--resume: {directory} was made with other settings: "
                             + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differing.items())
                             + ". Resume with the checkpoint's settings, or start afresh (--overwrite).")
        self.editor.load_state_dict(restored.state_dict())
        optimizer_state = _unflatten_optimizer(load_file(str(directory / OPTIMIZER_NAME)), saved["optimizer"])
        self.optimizer.load_state_dict(optimizer_state)
        if self.average is not None:
            self.average = read_average(directory, self.editor)
        self.state = TrainerState(**saved["trainer"])

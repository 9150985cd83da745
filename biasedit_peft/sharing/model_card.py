"""Model cards (``README.md`` with YAML metadata) for BiasEdit adapters and editors.

A card is generated from what we know about the artifact: base model, edited modules, delta storage and
size, editor provenance, training data, metrics before / after (as a Markdown table and as ``model-index``
metadata), the command that produced it, and how to load it (``import biasedit_peft`` first).

Metrics use the ``biasedit evaluate --json`` schema: nested dicts with numbers at the leaves, e.g.
``{"stereoset": {"gender": {"ss": 61.2, "lms": 91.0, "icat": 70.6, "n": 250}}, "crows": {...},
"perplexity": 31.4}``. Sample counts (``n``, ``n_*``) and non-numeric leaves are kept out of the metrics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMON_TAGS = ("peft", "biasedit", "debiasing")
TASK_TYPE = "text-generation"
DATASET_NAMES = {
    "stereoset": ("stereoset", "StereoSet (intrasentence)"),
    "crows": ("crows_pairs", "CrowS-Pairs"),
    "crows_pairs": ("crows_pairs", "CrowS-Pairs"),
    "perplexity": ("text", "Perplexity corpus"),
}
METRIC_LABELS = {"ss": "SS", "lms": "LMS", "icat": "ICAT", "perplexity": "Perplexity", "ppl": "Perplexity"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PAPER = "https://arxiv.org/abs/2503.08588"


@dataclass(frozen=True)
class MetricRow:
    """One number of an evaluation: ``path`` is its key path in the metrics dict, e.g.
    ``("stereoset", "gender", "ss")``."""

    path: tuple[str, ...]
    before: float | None
    after: float | None

    @property
    def label(self) -> str:
        *where, leaf = self.path
        name = METRIC_LABELS.get(leaf.lower(), leaf)
        if where and where[0].lower() in ("crows", "crows_pairs"):
            name = f"CrowS {name}" if name.lower() not in ("crows", "score", "metric") else "CrowS"
        details = [part for part in where[1:]]
        return f"{name} ({', '.join(details)})" if details else name

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


def _is_count(key: str) -> bool:
    return key == "n" or key.startswith("n_") or key in ("count", "num_samples")


def flatten_metrics(metrics: Mapping[str, Any] | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """``{key path: value}`` for every finite numeric leaf of an evaluate-style dict (counts skipped).

    Args:
        metrics: Nested dicts of numbers, e.g. ``biasedit evaluate``'s JSON.
        prefix: Key path prepended to every path.
    """
    flat: dict[tuple[str, ...], float] = {}
    for key, value in (metrics or {}).items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_count(str(key)):
            if math.isfinite(float(value)):
                flat[path] = float(value)
    return flat


def metric_rows(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[MetricRow]:
    """The union of metrics in ``before`` and ``after``, in the order they first appear.

    Args:
        before: Metrics of the base model (evaluate-style dict), or None.
        after: Metrics with the artifact applied, or None.
    """
    flat_before, flat_after = flatten_metrics(before), flatten_metrics(after)
    paths = list(dict.fromkeys([*flat_after, *flat_before]))
    return [MetricRow(path, flat_before.get(path), flat_after.get(path)) for path in paths]


def _format(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def metrics_table(rows: Sequence[MetricRow]) -> str:
    """A Markdown table: metric, before, after, change.

    Args:
        rows: From :func:`metric_rows`.
    """
    lines = ["| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.label} | {_format(r.before)} | {_format(r.after)} | {_format(r.change, True)} |" for r in rows]
    return "\n".join(lines)


def _eval_results(rows: Sequence[MetricRow], model_name: str):
    """``EvalResult`` entries for ``model-index``: the after values, and the base model's as ``*_base``."""
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        dataset_type, dataset_name = DATASET_NAMES.get(row.path[0].lower(), (row.path[0], row.path[0]))
        config = "/".join(row.path[1:-1]) or None
        metric_type = row.path[-1].lower()
        for value, suffix, name_suffix in ((row.after, "", ""), (row.before, "_base", " (base model)")):
            if value is None:
                continue
            results.append(EvalResult(
                task_type=TASK_TYPE, dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=config,
                metric_type=f"{metric_type}{suffix}", metric_value=round(value, 4),
                metric_name=f"{row.label}{name_suffix}",
            ))
    return results


def _hub_base_model(base_model: str | None) -> str | None:
    """``base_model`` metadata only for Hub ids (not local paths, not the bundled ``testbed``)."""
    if not base_model or base_model == "testbed" or Path(base_model).exists() or not HUB_ID.match(base_model):
        return None
    return base_model


def _card(metadata_kwargs: dict, body: str):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**metadata_kwargs)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _metadata(base_model: str | None, rows: Sequence[MetricRow], model_name: str, extra_tags: Sequence[str],
              datasets: Sequence[str] | None) -> dict:
    hub_base = _hub_base_model(base_model)
    tags = list(dict.fromkeys([*COMMON_TAGS, *extra_tags]))
    metadata: dict[str, Any] = {"library_name": "peft", "tags": tags, "model_name": model_name}
    if hub_base is not None:
        metadata["base_model"] = hub_base
    if datasets:
        metadata["datasets"] = list(datasets)
    if rows:
        metadata["eval_results"] = _eval_results(rows, model_name)
    return metadata


def _command_section(command: str | Sequence[str] | None) -> str:
    if command is None:
        return ""
    if not isinstance(command, str):
        import shlex

        command = shlex.join(command)
    return f"## How it was made\n\n```bash\n{command}\n```\n"


def _metrics_section(rows: Sequence[MetricRow]) -> str:
    if not rows:
        return "## Evaluation\n\nNo evaluation was recorded for this artifact.\n"
    return (
        "## Evaluation\n\nStereoSet SS is the share of stereotypical choices (ideal 50), LMS the share of meaningful "
        "over meaningless ones (ideal 100), ICAT combines both; CrowS is the share of pairs where the more "
        "stereotypical sentence is more likely (ideal 50). *before*: the base model; *after*: with this "
        f"artifact applied.\n\n{metrics_table(rows)}\n"
    )


def adapter_model_card(
    peft_model=None,
    adapter_name: str = "default",
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    target_modules: Sequence[str] | None = None,
    metrics_before: Mapping[str, Any] | None = None,
    metrics_after: Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    notes: str | None = None,
):
    """The ``huggingface_hub.ModelCard`` of a BiasEdit adapter.

    Facts come from ``peft_model`` (its ``peft_config[adapter_name]`` and adapter layers) when given; the
    keyword arguments fill in or override them. ``str(card)`` is the README text.

    Args:
        peft_model: The ``PeftModel`` holding the adapter, or None for a card from the keywords alone.
        adapter_name: The adapter described.
        repo_id: Hub repo id, used as the card's model name and in the loading code.
        base_model: The base model (Hub id or path); default: the adapter config's.
        target_modules: The edited modules; default: the adapter's.
        metrics_before: Evaluate-style metrics of the base model.
        metrics_after: The same with the adapter applied.
        command: The command line that made the adapter (a string or its argument list).
        datasets: Hub dataset ids for the card metadata.
        notes: Markdown appended to the card.
    """
    config = peft_model.peft_config[adapter_name] if peft_model is not None else None
    base_model = base_model or (config.base_model_name_or_path if config is not None else None)
    storage_lines: list[str] = []
    if peft_model is not None:
        from ..tuner import delta_nbytes, edit_targets

        layers = edit_targets(peft_model, adapter_name)
        target_modules = target_modules or list(layers)
        for name, layer in layers.items():
            rank = layer.delta_rank(adapter_name)
            rows_cols = "×".join(map(str, layer.weight_shape))
            form = f"factored, rank {rank}" if rank is not None else "dense"
            layout = "Conv1D [in, out]" if layer.fan_in_fan_out else "Linear [out, in]"
            storage_lines.append(f"| `{name}` | {layout} {rows_cols} | {form} |")
        size = delta_nbytes(peft_model, adapter_name)
        storage_lines.append(f"\nStored deltas: {size / 1024:.1f} KiB (float32).")
    rows = metric_rows(metrics_before, metrics_after)
    model_name = repo_id or "biasedit-adapter"
    provenance = []
    if config is not None:
        if config.editor_id:
            provenance.append(f"- Editor: `{config.editor_id}`")
        if config.edit_data:
            provenance.append(f"- Edit samples: `{config.edit_data}`")
        for key, value in sorted((config.edit_info or {}).items()):
            provenance.append(f"- {key}: `{value}`")
    storage_table = ("\n".join(["| module | weight | delta storage |", "| --- | --- | --- |", *storage_lines])
                     if storage_lines else "")
    repo = repo_id or "path/to/this/adapter"
    base_for_code = base_model or "BASE_MODEL"
    body = f"""
# {model_name}

A [BiasEdit]({PAPER}) debiasing adapter for `{base_model or 'unknown base model'}`: a weight delta on the MLP
output projections listed below, computed in one shot by a BiasEdit editor network. Stored as a
[PEFT](https://github.com/huggingface/peft) adapter of type `BIASEDIT`.

## Edited modules

{chr(10).join(f'- `{m}`' for m in (target_modules or [])) or '- (unknown)'}

{storage_table}

## Provenance

{chr(10).join(provenance) or '- (not recorded)'}

{_metrics_section(rows)}
{_command_section(command)}
## How to load

`import biasedit_peft` first: it registers the `BIASEDIT` method with peft.

```python
import biasedit_peft  # registers BIASEDIT with peft
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_for_code}")
model = PeftModel.from_pretrained(base, "{repo}")
```

To serve without `biasedit_peft`, merge it (`biasedit merge --model {base_for_code} --adapter {repo} --out merged`)
or export it as a LoRA adapter (`biasedit export-lora --model {base_for_code} --adapter {repo} --out lora`).

{notes or ''}
"""
    tags = ["biasedit-adapter"] + ([f"base_model:adapter:{_hub_base_model(base_model)}"]
                                   if _hub_base_model(base_model) else [])
    return _card(_metadata(base_model, rows, model_name, tags, datasets), body)


TRAINING_ARGS_ON_CARD = ("n_edits", "batch_size", "meta_lr", "loc_coef", "epochs", "max_steps", "eval_every",
                         "early_stopping_patience", "average_steps", "max_grad_norm", "seed")
"""Meta-training settings shown on an editor card (machine-specific ones such as ``output_dir`` are left out)."""
TRAINING_ARGS_ON_CARD_WHEN_SET = ("step_size_meta_lr",)
"""Settings shown only when a run set them (their ``None`` means "as another setting", e.g. ``meta_lr``)."""


def validation_metrics(record: Mapping[str, Any], eval_data: str | None = None) -> tuple[dict, dict]:
    """``(before, after)`` metrics dicts from a trainer validation record (``TrainerState.history`` entry).

    The record's ``eval_ss_pre`` / ``eval_ss_post`` (``lms`` alike) become SS / LMS before and after the
    editor's edit, under ``stereoset`` / the split name when ``eval_data`` is ``stereoset:SPLIT``. Without
    eval data the trainer validates on the last training batch (``train_*``), which the config name says.

    Args:
        record: One entry of ``TrainerState.history``.
        eval_data: The validation data spec the trainer was given, if any.
    """
    prefix = "eval_" if any(key.startswith("eval_") for key in record) else "train_"
    if prefix == "train_":
        dataset, config = "stereoset", "last training batch"
    elif eval_data and eval_data.startswith("stereoset:"):
        dataset, config = "stereoset", eval_data.replace("stereoset:", "")  # "dev", "dev + train-calib"
    else:
        dataset, config = "edit_validation", "dev"
    before, after = {}, {}
    for metric in ("ss", "lms"):
        if f"{prefix}{metric}_pre" in record:
            before[metric] = record[f"{prefix}{metric}_pre"]
        if f"{prefix}{metric}_post" in record:
            after[metric] = record[f"{prefix}{metric}_post"]
    return {dataset: {config: before}}, {dataset: {config: after}}


def _validation_section(record: Mapping[str, Any] | None, calibration_data: str | None = None) -> str:
    if not record:
        return ""
    prefix = "eval_" if any(key.startswith("eval_") for key in record) else "train_"
    where = "the validation data" if prefix == "eval_" else "the last training batch (no validation data)"
    calibrated_on = f"`{calibration_data}`" if calibration_data else "the same data"
    losses = ", ".join(f"{name} {record[prefix + name]:.4g}" for name in ("debias", "retention")
                       if prefix + name in record)
    loss = record.get(f"{prefix}loss")
    return (
        f"## Validation\n\nBest validation at meta-step {record.get('step', '?')} "
        f"(epoch {record.get('epoch', '?')}), on "
        f"{where}: meta-loss {loss:.4g}" + (f" ({losses})" if losses else "") + ".\n\n"
        "Its SS / LMS below are the trainer's quick measure: for each group of `n_edits` samples, the share of "
        "pairs whose stereotype has the higher mean token log-prob (LMS: both beat the unrelated sentence), "
        "*before* the editor's edit of that group (the base model) and *after* it. For StereoSet's reference SS, "
        "debias with this editor and run `biasedit evaluate` on the adapter.\n"
        + (f"\nThe edit strength was then calibrated on {calibrated_on}: the step sizes were multiplied by "
           f"{record['edit_scale']:g}, and the figures below are those of the "
           "calibrated editor on that data.\n" if "edit_scale" in record else "")
    ) if loss is not None else ""


def editor_model_card(
    *,
    base_model: str | None,
    target_modules: Sequence[str],
    repo_id: str | None = None,
    training_data: str | None = None,
    eval_data: str | None = None,
    calibration_data: str | None = None,
    splits: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    target_shapes: Mapping[str, Sequence[int]] | None = None,
    loss: str | None = None,
    validation: Mapping[str, Any] | None = None,
    metrics_before: Mapping[str, Any] | None = None,
    metrics_after: Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    notes: str | None = None,
):
    """The ``huggingface_hub.ModelCard`` of a trained BiasEdit editor (hyper-network) for ``base_model``.

    :meth:`BiasEditor.save_pretrained <biasedit_peft.editor.BiasEditor.save_pretrained>` writes it.

    Args:
        base_model: The model the editor edits (Hub id or path).
        target_modules: The modules it edits.
        repo_id: Hub repo id, used as the card's model name and in the loading code.
        training_data: The meta-training data spec (e.g. ``stereoset:train (bias types gender)``).
        eval_data: The validation data spec.
        calibration_data: The spec(s) the edit scale was calibrated on, when not ``eval_data``.
        splits: Sample counts per split.
        hyperparameters: The hyper-network's settings.
        training_args: The meta-training settings (only :data:`TRAINING_ARGS_ON_CARD` are shown).
        target_shapes: Module -> ``[key_size, value_size]`` (the editor config's ``targets``).
        loss: The loss variant.
        validation: The best trainer validation record, turned into before / after metrics by
            :func:`validation_metrics` unless ``metrics_before`` / ``metrics_after`` are given.
        metrics_before: Evaluate-style metrics before an edit.
        metrics_after: The same after it.
        command: The command line that trained the editor (a string or its argument list).
        datasets: Hub dataset ids for the card metadata.
        notes: Markdown appended to the card.
    """
    calibrated_on = calibration_data if validation and "edit_scale" in validation else None  # once it has run
    if validation and metrics_before is None and metrics_after is None:
        metrics_before, metrics_after = validation_metrics(validation, calibrated_on or eval_data)
    rows = metric_rows(metrics_before, metrics_after)
    model_name = repo_id or "biasedit-editor"
    repo = repo_id or "path/to/this/editor"
    base_for_code = base_model or "BASE_MODEL"
    shapes = target_shapes or {}
    if shapes:
        module_lines = ["| module | key size (in) | value size (out) |", "| --- | ---: | ---: |"]
        module_lines += [f"| `{m}` | {shapes[m][0]} | {shapes[m][1]} |" if m in shapes else f"| `{m}` | – | – |"
                         for m in target_modules]
    else:
        module_lines = [f"- `{m}`" for m in target_modules] or ["- (unknown)"]
    data_lines = [f"- Training data: `{training_data or 'not recorded'}`"]
    if eval_data:
        data_lines.append(f"- Validation data: `{eval_data}`")
    if calibrated_on:
        data_lines.append(f"- Edit scale calibrated on: `{calibrated_on}`")
    data_lines += [f"- {k}: `{v}`" for k, v in (splits or {}).items()]  # samples per split
    settings = {**(hyperparameters or {}), **({"loss": loss} if loss else {})}
    settings.update({k: v for k, v in (training_args or {}).items()
                     if k in TRAINING_ARGS_ON_CARD or (k in TRAINING_ARGS_ON_CARD_WHEN_SET and v is not None)})
    hyper_lines = [f"| `{k}` | `{v}` |" for k, v in settings.items()]
    hyper_section = ("## Hyper-parameters\n\n| name | value |\n| --- | --- |\n" + "\n".join(hyper_lines)) \
        if hyper_lines else ""
    body = f"""
# {model_name}

A [BiasEdit]({PAPER}) editor: a MALMEN-style hyper-network trained to turn the gradients of debiasing losses
into weight deltas for `{base_model or 'unknown base model'}`. Apply it to produce a BiasEdit PEFT adapter.

- Base model: `{base_model or 'not recorded'}`

## Edited modules

{chr(10).join(module_lines)}

## Training data

{chr(10).join(data_lines)}

{hyper_section}

{_validation_section(validation, calibrated_on)}
{_metrics_section(rows)}
{_command_section(command)}
## How to load

```python
import biasedit_peft
from biasedit_peft import BiasEditor

editor = BiasEditor.from_pretrained("{repo}")
```

Then debias: `biasedit debias --model {base_for_code} --editor {repo} --out adapter`.

{notes or ''}
"""
    hub_base = _hub_base_model(base_model)
    tags = ["biasedit-editor", "hypernetwork", "model-editing"] + ([f"base_model:{hub_base}"] if hub_base else [])
    return _card(_metadata(base_model, rows, model_name, tags, datasets), body)

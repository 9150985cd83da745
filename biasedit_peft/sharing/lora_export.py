"""Exporting a BiasEdit adapter as a standard peft LoRA adapter, for stacks that only serve LoRA.

A LoRA layer adds ``scaling * B @ A`` to the ``[out, in]`` weight, with ``A`` ``[r, in]`` and ``B`` ``[out, r]``.
We set ``lora_alpha = r`` for every module (``scaling = 1``) and factor each BiasEdit delta:

- deltas stored factored (``delta = A_f @ B_f``, rank ``k``): exact, no SVD, when ``rank`` is None or ``>= k``;
- otherwise a truncated SVD ``delta ≈ U_r S_r V_r^T``, split as ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``,
  which is the best rank-``r`` approximation (Eckart–Young); the relative Frobenius error
  ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` is reported per module. With ``rank=None`` the numerical rank is
  kept, so the export is exact up to float32 rounding.

Conv1D deltas (``[in, out]``) are transposed to the ``[out, in]`` LoRA convention; the config sets
``fan_in_fan_out=True`` when every target is a Conv1D, as peft expects for GPT-2.

How much of the debiasing survives a truncation is measured on the bundled StereoSet data
(:func:`measure_ss_survival`): SS of the base model, of base + BiasEdit adapter and of base + exported LoRA,
per bias type, and ``survival = (SS_lora - SS_base) / (SS_adapter - SS_base)`` (1 = the whole SS change
survives, 0 = none of it; undefined when the adapter did not change SS).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from ..tuner.layout import native_from_out_in_factors, out_in, out_in_factors, stored_delta

SAFETENSORS_NAME = "adapter_model.safetensors"
REPORT_NAME = "lora_export_report.json"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
SS_OPTIONS = ("bias_types", "split", "limit", "mode", "batch_size", "progress")
"""Keyword arguments of :func:`measure_ss_survival` that ``export_lora(..., measure_ss=True)`` passes on."""


@dataclass(frozen=True)
class ModuleExport:
    """How one delta was exported."""

    module: str
    rank: int
    """LoRA rank written for this module."""
    delta_rank: int
    """Numerical rank of the delta (the stored rank for factored deltas)."""
    relative_error: float
    """``||delta - B @ A|| / ||delta||`` (Frobenius), 0 when exact."""
    exact: bool


@dataclass
class LoraExportReport:
    """Per-module results and the overall relative Frobenius error of the export."""

    out_dir: str
    modules: list[ModuleExport] = field(default_factory=list)
    relative_error: float = 0.0
    """``sqrt(sum ||delta - BA||^2 / sum ||delta||^2)`` over all modules."""
    skipped_zero: list[str] = field(default_factory=list)
    """Modules whose delta is exactly zero (nothing to export)."""
    ss_survival: SSSurvival | None = None
    """StereoSet SS of base / adapter / LoRA and the share of the SS change that survives (when measured)."""
    ss_skipped: str | None = None
    """Why ``ss_survival`` was not measured (None when it was)."""

    @property
    def exact(self) -> bool:
        return all(m.exact for m in self.modules)

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "relative_error": self.relative_error, "exact": self.exact,
                "modules": [asdict(m) for m in self.modules], "skipped_zero": self.skipped_zero,
                "ss_survival": None if self.ss_survival is None else self.ss_survival.to_dict(),
                "ss_skipped": self.ss_skipped}

    def to_text(self) -> str:
        lines = [f"LoRA adapter written to {self.out_dir} ({'exact' if self.exact else 'truncated'}; "
                 f"relative Frobenius error {self.relative_error:.3e})"]
        lines += [f"  {m.module}: rank {m.rank} of {m.delta_rank}, relative error {m.relative_error:.3e}"
                  for m in self.modules]
        lines += [f"  {name}: zero delta, skipped" for name in self.skipped_zero]
        if self.ss_survival is not None:
            lines += ["", self.ss_survival.to_text()]
        elif self.ss_skipped:
            lines += [f"SS survival not measured: {self.ss_skipped}"]
        return "\n".join(lines)


@dataclass(frozen=True)
class SSSurvivalRow:
    """StereoSet SS (percent, ideal 50) of one bias type under the three models."""

    bias_type: str
    n: int
    """StereoSet items scored."""
    ss_base: float
    ss_adapter: float
    ss_lora: float

    @property
    def survival(self) -> float | None:
        """``(SS_lora - SS_base) / (SS_adapter - SS_base)``; None when the adapter left SS unchanged."""
        change = self.ss_adapter - self.ss_base
        if math.isclose(change, 0.0, abs_tol=1e-9):
            return None
        return (self.ss_lora - self.ss_base) / change

    def to_dict(self) -> dict:
        return {**asdict(self), "survival": self.survival}


@dataclass(frozen=True)
class SSSurvival:
    """How much of the adapter's StereoSet SS change the exported LoRA keeps, per bias type and overall."""

    rows: list[SSSurvivalRow]
    split: str
    mode: str
    limit: int | None
    """Items kept per bias type (None: all of the split)."""

    def row(self, bias_type: str) -> SSSurvivalRow:
        return next(r for r in self.rows if r.bias_type == bias_type)

    def to_dict(self) -> dict:
        return {"split": self.split, "mode": self.mode, "limit": self.limit,
                "bias_types": {r.bias_type: r.to_dict() for r in self.rows}}

    def to_text(self) -> str:
        per_type = "all items" if self.limit is None else f"first {self.limit} items per bias type"
        lines = [f"SS survival on StereoSet ({self.split} split, {self.mode} mode, {per_type}); "
                 "survival = (SS_lora - SS_base) / (SS_adapter - SS_base)",
                 f"  {'bias type':<12} {'n':>5} {'SS base':>8} {'SS adapter':>10} {'SS LoRA':>8} {'survival':>9}"]
        for r in self.rows:
            survival = "n/a" if r.survival is None else f"{r.survival:.3f}"
            lines.append(f"  {r.bias_type:<12} {r.n:>5} {r.ss_base:>8.2f} {r.ss_adapter:>10.2f} {r.ss_lora:>8.2f} "
                         f"{survival:>9}")
        if any(r.survival is None for r in self.rows):
            lines.append("  n/a: the adapter did not change SS for that bias type")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoraFactors:
    """``delta_out_in ≈ lora_B @ lora_A`` with ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` (float32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    delta_rank: int
    relative_error: float
    squared_error: float
    squared_norm: float


def numerical_rank(singular_values: torch.Tensor, shape: Sequence[int]) -> int:
    """Singular values above ``s_max * max(shape) * eps(float32)`` (numpy's ``matrix_rank`` rule).

    Args:
        singular_values: Of the matrix, in any order.
        shape: The matrix's shape.
    """
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    tolerance = singular_values.max() * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tolerance).sum())


def lora_factors_from_dense(delta_out_in: torch.Tensor, rank: int | None) -> LoraFactors:
    """Best rank-``rank`` factors of a ``[out, in]`` delta by SVD.

    Args:
        delta_out_in: The delta in ``nn.Linear`` layout.
        rank: The LoRA rank; None: the delta's numerical rank (exact).
    """
    delta = delta_out_in.to(torch.float64)
    left, singular, right_t = torch.linalg.svd(delta, full_matrices=False)
    delta_rank = numerical_rank(singular, delta.shape)
    keep = delta_rank if rank is None else min(rank, delta_rank)
    root = singular[:keep].sqrt()
    squared_norm = float((singular**2).sum())
    squared_error = float((singular[keep:] ** 2).sum()) if keep < delta_rank else 0.0
    return LoraFactors(
        lora_A=(root[:, None] * right_t[:keep]).to(torch.float32),
        lora_B=(left[:, :keep] * root).to(torch.float32),
        delta_rank=delta_rank,
        relative_error=math.sqrt(squared_error / squared_norm) if squared_norm > 0 else 0.0,
        squared_error=squared_error,
        squared_norm=squared_norm,
    )


def lora_factors_from_factored(first: torch.Tensor, second: torch.Tensor, fan_in_fan_out: bool,
                               rank: int | None) -> LoraFactors:
    """LoRA factors of a delta stored as ``first @ second`` (native layout), exact when ``rank`` fits.

    Args:
        first: ``A`` of the stored factors.
        second: ``B`` of the stored factors.
        fan_in_fan_out: Whether the layer is a ``Conv1D`` (native layout ``[in, out]``).
        rank: The LoRA rank; None: the stored rank.
    """
    first, second = first.detach().to(torch.float32), second.detach().to(torch.float32)
    lora_B, lora_A = out_in_factors(first, second, fan_in_fan_out)  # lora_B [out, k] @ lora_A [k, in]
    stored_rank = lora_A.shape[0]
    if rank is not None and rank < stored_rank:
        return lora_factors_from_dense(lora_B @ lora_A, rank)
    squared_norm = float((lora_B.double() @ lora_A.double()).pow(2).sum())
    return LoraFactors(lora_A.contiguous(), lora_B.contiguous(), stored_rank, 0.0, 0.0, squared_norm)


def _layer_factors(layer, adapter_name: str, rank: int | None) -> LoraFactors:
    stored = stored_delta(layer, adapter_name, drop_zero=False)
    if isinstance(stored, tuple):
        return lora_factors_from_factored(*stored, layer.fan_in_fan_out, rank)
    return lora_factors_from_dense(out_in(stored.to(torch.float32), layer.fan_in_fan_out), rank)


def _lora_config(base_model: str | None, ranks: dict[str, int], all_conv1d: bool) -> dict:
    """A LoRA ``adapter_config.json`` with one rank per module and ``lora_alpha == r`` (scaling 1)."""
    from peft import LoraConfig

    top_rank = max(ranks.values())
    config = LoraConfig(
        r=top_rank,
        lora_alpha=top_rank,
        target_modules=sorted(ranks),
        rank_pattern={name: r for name, r in ranks.items() if r != top_rank},
        alpha_pattern={name: r for name, r in ranks.items() if r != top_rank},
        fan_in_fan_out=all_conv1d,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        init_lora_weights=True,
    )
    return config.to_dict()


def _config_json(config: dict) -> str:
    def default(value):
        if isinstance(value, set):
            return sorted(value)
        return str(getattr(value, "value", value))

    return json.dumps(config, indent=2, sort_keys=True, default=default)


def lora_override_factors(peft_model, lora_dir: str | Path, adapter_name: str = "default") -> dict[str, tuple]:
    """The LoRA adapter written to ``lora_dir``, read back, as BiasEdit override factors (native layout).

    ``scaling * B @ A`` for every edited module (``[out, in]``; transposed for Conv1D); modules the LoRA does
    not cover get a rank-0 (zero) delta. Used with ``override_deltas`` this is base + exported LoRA.

    Args:
        peft_model: The BiasEdit ``PeftModel`` the LoRA was exported from.
        lora_dir: The LoRA adapter folder.
        adapter_name: The BiasEdit adapter whose modules are read back.
    """
    from safetensors.torch import load_file

    from ..tuner import edit_targets

    lora_dir = Path(lora_dir)
    weights = load_file(str(lora_dir / SAFETENSORS_NAME))
    config = json.loads((lora_dir / CONFIG_NAME).read_text())
    factors = {}
    for name, layer in edit_targets(peft_model, adapter_name).items():
        device = layer.get_base_layer().weight.device
        rows, cols = layer.weight_shape
        key = f"{KEY_PREFIX}{name}"
        if f"{key}.lora_A.weight" not in weights:
            factors[name] = (torch.zeros(rows, 0, device=device), torch.zeros(0, cols, device=device))
            continue
        lora_a, lora_b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
        rank = config.get("rank_pattern", {}).get(name, config["r"])
        scaling = config.get("alpha_pattern", {}).get(name, config["lora_alpha"]) / rank
        lora_b = lora_b * scaling
        pair = native_from_out_in_factors(lora_b, lora_a, layer.fan_in_fan_out)
        factors[name] = tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in pair)
    return factors


def measure_ss_survival(
    peft_model,
    lora_dir: str | Path,
    tokenizer,
    *,
    adapter_name: str = "default",
    bias_types: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    mode: str = "reference",
    batch_size: int = 32,
    progress: bool = False,
) -> SSSurvival:
    """StereoSet SS of base, base + BiasEdit adapter ``adapter_name`` and base + the LoRA in ``lora_dir``.

    One copy of the model: the base is the adapter disabled, the LoRA is its ``scaling * B @ A`` read back
    from ``lora_dir`` and applied in place of the adapter's deltas (``override_deltas``), which is what peft's
    LoRA forward adds. SS comes from :func:`~biasedit_peft.evaluation.evaluate_stereoset`.

    Args:
        peft_model: The BiasEdit ``PeftModel``; ``adapter_name`` must be active.
        lora_dir: The exported LoRA adapter folder.
        tokenizer: The base model's tokenizer.
        adapter_name: The BiasEdit adapter.
        bias_types: StereoSet bias types; None: all of the split.
        split: The bundled StereoSet split.
        limit: The first ``limit`` items per bias type; None: all.
        mode: ``"reference"`` or ``"paper"`` SS.
        batch_size: Sentences per forward pass.
        progress: Show progress bars.
    """
    from ..data import load_stereoset
    from ..evaluation import evaluate_stereoset, take_per_type
    from ..tuner import override_deltas

    if adapter_name not in peft_model.active_adapters:
        raise ValueError(f"Adapter {adapter_name!r} is not active (active: {peft_model.active_adapters}); "
                         "its SS would not be what the model computes.")
    items = take_per_type(load_stereoset(split, bias_types), limit)
    if not items:
        raise ValueError(f"No StereoSet items for split {split!r} and bias types {bias_types}.")

    def ss(model) -> dict:
        result = evaluate_stereoset(model, tokenizer, items, mode=mode, batch_size=batch_size, progress=progress,
                                    n_resamples=0)
        return {bias_type: (entry["ss"], entry["n"]) for bias_type, entry in result.items()}

    lora = lora_override_factors(peft_model, lora_dir, adapter_name)
    with peft_model.disable_adapter():
        base = ss(peft_model)
    adapter = ss(peft_model)
    with override_deltas(peft_model, lora, adapter_name):
        exported = ss(peft_model)
    rows = [SSSurvivalRow(bias_type, n, ss_base, adapter[bias_type][0], exported[bias_type][0])
            for bias_type, (ss_base, n) in base.items()]
    return SSSurvival(rows, split=split, mode=mode, limit=limit)


def _tokenizer_or_reason(peft_model, adapter_name: str, tokenizer):
    """``(tokenizer, None)``, or ``(None, why none is at hand)``; a ``str`` ``tokenizer`` names where to load it."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer, None
    from ..evaluation import model_name_of
    from ..models import load_tokenizer

    name = tokenizer or peft_model.peft_config[adapter_name].base_model_name_or_path or model_name_of(peft_model)
    try:
        loaded = load_tokenizer(str(name))
    except (OSError, ValueError, TypeError) as error:
        return None, f"no tokenizer could be loaded for the base model {str(name)!r} ({type(error).__name__}: {error})"
    if not loaded("The man is here.", add_special_tokens=False)["input_ids"]:  # transformers builds empty ones
        return None, (f"no tokenizer could be loaded for the base model {str(name)!r} (what loaded has "
                      f"{len(loaded)} token(s) and encodes nothing: the folder has no tokenizer files?)")
    return loaded, None


def export_lora_from_peft_model(peft_model, out_dir: str | Path, rank: int | None = None,
                                adapter_name: str = "default", *, measure_ss: bool = False, tokenizer=None,
                                source: str | None = None, **ss_options) -> LoraExportReport:
    """Write adapter ``adapter_name`` of a BiasEdit ``PeftModel`` to ``out_dir`` as a peft LoRA adapter.

    Args:
        peft_model: A ``PeftModel`` with a BiasEdit adapter.
        out_dir: The LoRA adapter folder to write (created).
        rank: The LoRA rank; None: each delta's full (numerical) rank, which is exact.
        adapter_name: The BiasEdit adapter to export.
        measure_ss: Also run :func:`measure_ss_survival`; when no tokenizer can be loaded, the report says why.
        tokenizer: For ``measure_ss``: a tokenizer, or a model name / folder to load one from; default: the
            adapter's base model.
        source: How errors name the adapter (its folder or Hub id); default: ``adapter_name``.
        **ss_options: Keyword arguments of :func:`measure_ss_survival` (:data:`SS_OPTIONS`).
    """
    from safetensors.torch import save_file

    from ..tuner import edit_targets

    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}.")
    unknown = sorted(set(ss_options) - set(SS_OPTIONS))
    if unknown or (ss_options and not measure_ss):
        misuse = f"options of measure_ss_survival {SS_OPTIONS}" if unknown else "used without measure_ss=True"
        raise TypeError(f"SS options {unknown or sorted(ss_options)} are not {misuse}.")
    named = source or repr(adapter_name)
    layers = edit_targets(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"Adapter {named} has no BiasEdit layers to export.")
    report = LoraExportReport(out_dir=str(out_dir))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    total_error = total_norm = 0.0
    for name, layer in layers.items():
        factors = _layer_factors(layer, adapter_name, rank)
        if factors.lora_A.shape[0] == 0:
            report.skipped_zero.append(name)
            continue
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = factors.lora_A.contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = factors.lora_B.contiguous()
        ranks[name] = factors.lora_A.shape[0]
        total_error += factors.squared_error
        total_norm += factors.squared_norm
        report.modules.append(ModuleExport(name, ranks[name], factors.delta_rank, factors.relative_error,
                                           exact=factors.relative_error == 0.0))
    if not ranks:
        raise ValueError(f"Every delta of adapter {named} is zero: there is nothing to export.")
    report.relative_error = math.sqrt(total_error / total_norm) if total_norm > 0 else 0.0
    config = peft_model.peft_config[adapter_name]
    all_conv1d = all(layers[name].fan_in_fan_out for name in ranks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(_config_json(_lora_config(config.base_model_name_or_path, ranks, all_conv1d)))
    if measure_ss:
        tokenizer, report.ss_skipped = _tokenizer_or_reason(peft_model, adapter_name, tokenizer)
        if tokenizer is not None:
            report.ss_survival = measure_ss_survival(peft_model, out_dir, tokenizer, adapter_name=adapter_name,
                                                     **ss_options)
    else:
        report.ss_skipped = "not requested (measure_ss=True, or --measure-ss on the command line)"
    write_json(out_dir / REPORT_NAME, report.to_dict())
    return report


def export_lora(
    peft_model_or_paths,
    out_dir: str | Path,
    rank: int | None = None,
    adapter_name: str = "default",
    *,
    measure_ss: bool = False,
    tokenizer=None,
    **ss_options,
) -> LoraExportReport:
    """Export a BiasEdit adapter as a standard peft LoRA adapter in ``out_dir``.

    Args:
        peft_model_or_paths: A BiasEdit ``PeftModel``, or a pair ``(base model name, adapter folder or Hub id)``.
        out_dir: The LoRA adapter folder to write (created).
        rank: The LoRA rank; None keeps each delta's full (numerical) rank, which is exact; a smaller rank
            truncates by SVD and the report gives the relative Frobenius error.
        adapter_name: The BiasEdit adapter to export.
        measure_ss: Also report how much of the SS change survives (:func:`measure_ss_survival`).
        tokenizer: As for :func:`export_lora_from_peft_model`.
        **ss_options: ``bias_types``, ``split``, ``limit``, ``mode``, ``batch_size``, ``progress`` of
            :func:`measure_ss_survival`.
    """
    if isinstance(peft_model_or_paths, (tuple, list)):
        from ..models import load_model
        from .adapter_files import require_biasedit_adapter
        from .merge import load_adapters

        base_name, adapter = peft_model_or_paths
        checked = require_biasedit_adapter(adapter)  # a bad adapter folder, or another type, is refused before the
        peft_model = load_adapters(load_model(base_name), [adapter], [checked])  # model loads; not read again
        config = peft_model.peft_config["adapter_0"]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = str(base_name)
        return export_lora_from_peft_model(peft_model, out_dir, rank, "adapter_0", measure_ss=measure_ss,
                                           tokenizer=tokenizer or str(base_name), source=str(adapter), **ss_options)
    return export_lora_from_peft_model(peft_model_or_paths, out_dir, rank, adapter_name, measure_ss=measure_ss,
                                       tokenizer=tokenizer, **ss_options)

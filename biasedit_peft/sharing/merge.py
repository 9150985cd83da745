"""Merging BiasEdit adapters into a plain transformers checkpoint.

For every edited module the merged weight is ``W' = cast(float32(W) + sum_k delta_k)``: the deltas of all
adapters add up (each was computed against the base model, so stacking e.g. one adapter per bias type is a
first-order combination of their edits), the sum is formed in float32 and cast to the output dtype *once*.
Nothing is added to and then subtracted from weights. Non-finite results are refused before anything is
written (peft's ``safe_merge``). The result has no adapter layers and loads without ``biasedit_peft``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from ..models import load_model, load_tokenizer, parse_dtype
from ..tuner.layout import DELTA_PARAMETER_NAMES

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class TensorChange:
    """What merging did to one weight."""

    module: str
    shape: tuple[int, ...]
    max_abs_delta: float
    """Largest entry of ``|sum of deltas|`` (float32): the intended change."""
    max_abs_change: float
    """Largest entry of ``|W' - cast(W)|`` in the output dtype: the change that survived rounding."""


@dataclass
class MergeReport:
    """The adapters merged, the output dtype and one :class:`TensorChange` per edited weight."""

    adapters: list[str]
    dtype: str
    changes: list[TensorChange] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"adapters": self.adapters, "dtype": self.dtype, "changes": [asdict(c) for c in self.changes]}

    def to_text(self) -> str:
        lines = [f"Merged {len(self.adapters)} adapter(s) into {len(self.changes)} weight(s), dtype {self.dtype}:"]
        lines += [f"  {c.module}: max |delta| {c.max_abs_delta:.3e}, max |change| {c.max_abs_change:.3e}"
                  for c in self.changes]
        return "\n".join(lines)


def _delta_module_names(weight_keys: Iterable[str]) -> set[str]:
    """Base module names that an adapter's saved weights (their tensor names) cover."""
    names = set()
    for key in weight_keys:
        module, _, parameter = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if parameter in DELTA_PARAMETER_NAMES:
            names.add(module)
    return names


def _check_made_for_model(config, model: torch.nn.Module, adapter: str | Path) -> None:
    made_for = (config.auto_mapping or {}).get("base_model_class")
    if made_for is not None and made_for != type(model).__name__:
        raise ValueError(
            f"Adapter {adapter} was made for a {made_for} (base {config.base_model_name_or_path!r}); "
            f"the base model given is a {type(model).__name__} ({getattr(model.config, 'model_type', '?')})."
        )


def load_adapters(model: torch.nn.Module, adapters: Sequence[str | Path],
                  adapter_configs: Sequence[dict] | None = None):
    """A ``PeftModel`` over ``model`` holding ``adapters`` (folders or Hub ids) as ``adapter_0``, ``adapter_1``, ...

    Each adapter's ``adapter_config.json`` is read once (none when ``adapter_configs`` gives them) and its weights
    file once, besides peft's own load.

    Args:
        model: The plain transformers base model.
        adapters: BiasEdit adapter folders or Hub ids.
        adapter_configs: Their ``adapter_config.json`` objects, in order, as
            ``adapter_files.require_biasedit_adapter`` returned them (a caller that checked them before loading the
            model); None reads them.

    Raises:
        ValueError: Naming the adapter, when it is not a BiasEdit adapter, was made for another model class, or
            its deltas do not fit the base model's modules (missing modules or wrong shapes); naming the file
            and tensor when its weights are unreadable or non-finite, and the file when its adapter_config.json is
            missing or broken (``adapter_files.AdapterFileError``); naming the path when it is neither a folder
            nor an ``org/name`` Hub id (``models.ModelNotFoundError``).
    """
    import biasedit_peft  # noqa: F401 - registers BIASEDIT with peft

    from ..tuner import edit_targets
    from .adapter_files import (
        AdapterFileError,
        load_adapter_config,
        load_biasedit_adapter_with_keys,
        require_biasedit_adapter,
    )

    if not adapters:
        raise ValueError("Give at least one adapter to load.")
    if adapter_configs is not None and len(adapter_configs) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(adapter_configs)} adapter configs")
    peft_model = None
    for index, adapter in enumerate(adapters):
        name = f"adapter_{index}"
        document = require_biasedit_adapter(  # the local folder and its adapter_config.json first, named
            adapter, adapter_config=None if adapter_configs is None else adapter_configs[index])
        config = load_adapter_config(adapter, adapter_config=document)
        _check_made_for_model(config, model, adapter)
        try:
            peft_model, file_keys = load_biasedit_adapter_with_keys(model if peft_model is None else peft_model,
                                                                    adapter, name, adapter_config=document)
        except AdapterFileError:
            raise
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"Adapter {adapter} (made for {config.base_model_name_or_path!r}) does not fit the base model "
                f"{type(model).__name__}: {error}"
            ) from error
        saved, loaded = _delta_module_names(file_keys), set(edit_targets(peft_model, name))
        if saved != loaded:
            raise ValueError(
                f"Adapter {adapter} holds deltas for {sorted(saved - loaded) or sorted(saved)}, but the base model "
                f"{type(model).__name__} only received {sorted(loaded)}: it was made for another model."
            )
    return peft_model


def summed_deltas(peft_model, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{module name: sum of the adapters' float32 deltas}`` (native layout, on CPU).

    Args:
        peft_model: A ``PeftModel`` holding the adapters (e.g. from :func:`load_adapters`).
        adapter_names: The adapters to add up.
    """
    from ..tuner import get_deltas

    total: dict[str, torch.Tensor] = {}
    for name in adapter_names:
        for module, delta in get_deltas(peft_model, name).items():
            delta = delta.to("cpu", torch.float32)
            total[module] = total[module] + delta if module in total else delta
    return total


def merge_deltas_into(
    model: torch.nn.Module,
    deltas: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype | None = None,
    safe_merge: bool = True,
) -> list[TensorChange]:
    """Write ``W + delta`` into the weights of a plain model, in float32, cast once to ``dtype``.

    Every merge is computed and checked (shape, finiteness with ``safe_merge``) before any weight is written.

    Args:
        model: A plain transformers model, changed in place.
        deltas: Module name -> float32 delta of the module's weight shape.
        dtype: The model's dtype afterwards (``"bf16"``, ``torch.float16``, ...); None keeps it.
        safe_merge: Refuse (``ValueError``, nothing written) a merged weight with NaN or infinite values.

    Returns:
        One :class:`TensorChange` per merged module.
    """
    target_dtype = parse_dtype(dtype) or next(model.parameters()).dtype
    modules = dict(model.named_modules())
    planned: dict[str, tuple[torch.Tensor, TensorChange]] = {}
    for name, delta in deltas.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise KeyError(f"The model has no module {name!r} with a weight to merge into.")
        if tuple(weight.shape) != tuple(delta.shape):
            raise ValueError(f"Delta for {name!r} has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}.")
        delta32 = delta.to(weight.device, torch.float32)
        merged = (weight.detach().to(torch.float32) + delta32).to(target_dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"Merging into {name!r} gives NaN or infinite values in {target_dtype}; "
                             "nothing was written.")
        base_cast = weight.detach().to(target_dtype)
        change = TensorChange(
            module=name, shape=tuple(weight.shape), max_abs_delta=float(delta32.abs().max()),
            max_abs_change=float((merged.to(torch.float32) - base_cast.to(torch.float32)).abs().max()),
        )
        planned[name] = (merged, change)
    model.to(target_dtype)
    with torch.no_grad():
        for name, (merged, _) in planned.items():
            modules[name].weight.copy_(merged)
    return [change for _, change in planned.values()]


def merge_adapters_with_report(
    base_model: str | torch.nn.Module,
    adapter_paths: Sequence[str | Path],
    dtype: str | torch.dtype | None = None,
    safe_merge: bool = True,
):
    """``(plain transformers model with all adapters merged, MergeReport)``.

    Args:
        base_model: A name for :func:`biasedit_peft.models.load_model` (folder, Hub id, ``testbed``) or a loaded
            model (which is modified in place).
        adapter_paths: BiasEdit adapter folders or Hub ids; the deltas of several adapters add.
        dtype: The merged model's dtype; None keeps the base model's.
        safe_merge: See :func:`merge_deltas_into`.
    """
    from .adapter_files import require_biasedit_adapter

    # a bad adapter folder, or another type, is refused before the model is loaded
    adapter_configs = [require_biasedit_adapter(adapter) for adapter in adapter_paths]
    model = load_model(base_model) if isinstance(base_model, str) else base_model
    peft_model = load_adapters(model, adapter_paths, adapter_configs)
    names = [f"adapter_{i}" for i in range(len(adapter_paths))]
    deltas = summed_deltas(peft_model, names)
    plain = peft_model.unload()  # drops the adapter layers, restores the base modules untouched
    changes = merge_deltas_into(plain, deltas, dtype, safe_merge)
    if safe_merge:
        check_finite_forward(plain, adapter_paths)
    target = parse_dtype(dtype) or next(plain.parameters()).dtype
    report = MergeReport([str(a) for a in adapter_paths], str(target).removeprefix("torch."), changes)
    return plain, report


PROBE_TOKENS = 8
"""Token ids ``0 .. 7`` make the probe batch of :func:`check_finite_forward`."""


@torch.no_grad()
def check_finite_forward(model: torch.nn.Module, adapters: Sequence[str | Path] = ()) -> None:
    """Run the merged model on one probe batch (token ids ``0 .. PROBE_TOKENS - 1``) and refuse non-finite logits:
    finite weights (1e30 deltas) can still overflow in the forward.

    Raises:
        ValueError: Naming the adapters; nothing has been written.
    """
    from ..editor.editor import input_device

    vocab = int(getattr(model.config, "vocab_size", PROBE_TOKENS))
    ids = torch.arange(min(PROBE_TOKENS, vocab)).unsqueeze(0).to(input_device(model))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"The model merged with {[str(a) for a in adapters]} gives non-finite logits on a probe "
                         "batch (deltas too large for the dtype?); nothing was written.")


def merge_adapters(
    base_model: str | torch.nn.Module,
    adapter_paths: Sequence[str | Path],
    dtype: str | torch.dtype | None = None,
    safe_merge: bool = True,
) -> torch.nn.Module:
    """A plain transformers model with ``adapter_paths`` merged.

    Args:
        base_model: As for :func:`merge_adapters_with_report`.
        adapter_paths: As for :func:`merge_adapters_with_report`.
        dtype: As for :func:`merge_adapters_with_report`.
        safe_merge: As for :func:`merge_adapters_with_report`.
    """
    return merge_adapters_with_report(base_model, adapter_paths, dtype, safe_merge)[0]


def save_merged(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    report: MergeReport | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a standard transformers checkpoint (safetensors), the tokenizer and ``merge_report.json``.

    Args:
        model: The merged model.
        out_dir: The folder to write (created).
        tokenizer: Saved beside the model when given.
        report: Written as ``merge_report.json`` (:func:`biasedit_peft._io.write_json`) when given.
        max_shard_size: Largest safetensors shard.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if report is not None:
        write_json(out_dir / "merge_report.json", report.to_dict())
    return out_dir


def merge_to_folder(
    base_model: str,
    adapter_paths: Sequence[str | Path],
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> MergeReport:
    """Load ``base_model`` by name, merge ``adapter_paths``, save model + tokenizer to ``out_dir``.

    Args:
        base_model: A name for :func:`biasedit_peft.models.load_model`; its tokenizer is saved too.
        adapter_paths: BiasEdit adapter folders or Hub ids.
        out_dir: The folder to write.
        dtype: The merged model's dtype; None keeps the base model's.
        max_shard_size: Largest safetensors shard.
    """
    model, report = merge_adapters_with_report(base_model, adapter_paths, dtype)
    save_merged(model, out_dir, load_tokenizer(base_model), report, max_shard_size)
    return report

"""The public way to write, read and temporarily override BiasEdit deltas.

Module names are those of the *base* model's ``named_modules()`` (``transformer.h.3.mlp.c_proj``); a delta
is a tensor of that module's weight shape (native layout), or a pair ``(A, B)`` whose product is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from .layer import BiasEditLayer
from .layout import DeltaLike, factorise, in_smaller_form

DeltaMapping = Mapping[str, DeltaLike]


def _peft_config(model, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise KeyError(f"Adapter {adapter_name!r} not found; the model has {sorted(configs or {})}.")
    return configs[adapter_name]


def _base_model(model) -> torch.nn.Module:
    """The transformers model under a ``PeftModel`` (or the tuner's ``.model``)."""
    tuner = model.base_model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model
    return getattr(tuner, "model", tuner)


def edit_targets(model, adapter_name: str | None = None) -> dict[str, BiasEditLayer]:
    """``{base module name: BiasEdit layer}`` in model order.

    Args:
        model: A ``PeftModel``, its tuner, or the transformers model under it.
        adapter_name: Keep only the layers that hold this adapter; ``None``: every BiasEdit layer.
    """
    targets = {}
    for name, module in _base_model(model).named_modules():
        if isinstance(module, BiasEditLayer) and (adapter_name is None or module.has_delta(adapter_name)):
            targets[name] = module
    return targets


def _as_factors(delta: DeltaLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(delta, (tuple, list)):
        if len(delta) != 2 or not all(isinstance(t, torch.Tensor) for t in delta):
            raise TypeError("A factored delta must be a pair of tensors (A, B) with delta = A @ B.")
        return delta[0], delta[1]
    return None


def _validate(name: str, layer: BiasEditLayer, delta: DeltaLike) -> None:
    rows, cols = layer.weight_shape
    factors = _as_factors(delta)
    if factors is not None:
        first, second = factors
        if first.dim() != 2 or second.dim() != 2 or first.shape[0] != rows or second.shape[1] != cols or (
            first.shape[1] != second.shape[0]
        ):
            raise ValueError(
                f"Factored delta for {name!r} has shapes {tuple(first.shape)} @ {tuple(second.shape)}; "
                f"expected [{rows}, r] @ [r, {cols}] (the module's weight is {[rows, cols]})."
            )
        tensors = factors
    else:
        if not isinstance(delta, torch.Tensor):
            raise TypeError(f"Delta for {name!r} must be a tensor or a pair of tensors, got {type(delta).__name__}.")
        if tuple(delta.shape) != (rows, cols):
            raise ValueError(
                f"Delta for {name!r} has shape {tuple(delta.shape)}; expected the module's weight shape "
                f"{[rows, cols]} ({'[in, out], Conv1D' if layer.fan_in_fan_out else '[out, in], nn.Linear'})."
            )
        tensors = (delta,)
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise TypeError(f"Delta for {name!r} must be floating point, got {tensor.dtype}.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Delta for {name!r} has NaN or infinite values; nothing was written.")


def _check_names(model, adapter_name: str, deltas: DeltaMapping) -> dict[str, BiasEditLayer]:
    targets = edit_targets(model)
    unknown = sorted(set(deltas) - set(targets))
    if unknown:
        raise KeyError(f"No BiasEdit layer named {unknown}; adapter {adapter_name!r} edits {sorted(targets)}.")
    missing = [name for name in deltas if not targets[name].has_delta(adapter_name)]
    if missing:
        raise KeyError(f"Adapter {adapter_name!r} does not cover {missing}.")
    return targets


def _in_storage(delta: DeltaLike, storage: str, shape: tuple[int, int]) -> DeltaLike:
    """Convert ``delta`` into the form ``storage`` asks for ('auto': fewer stored numbers)."""
    factors = _as_factors(delta)
    if storage == "dense":
        return factors[0] @ factors[1] if factors is not None else delta
    if storage == "factored":
        return factors if factors is not None else factorise(delta)
    return in_smaller_form(factors, shape) if factors is not None else delta


def set_deltas(model, deltas: DeltaMapping, adapter_name: str = "default") -> None:
    """Write ``deltas`` into adapter ``adapter_name``.

    Every entry is validated first (unknown module, wrong shape, non-finite values, merged adapter): on
    any error nothing is written. Storage follows ``config.delta_storage``; the config's ``delta_ranks``
    is updated so that a saved adapter reloads with the same parameter shapes.

    Args:
        model: A ``PeftModel`` with a BiasEdit adapter.
        deltas: ``{module name: delta}``, each a dense tensor in the module's weight layout (``[in, out]`` for
            ``Conv1D``, ``[out, in]`` for ``nn.Linear``) or factors ``(A, B)`` with ``delta = A @ B``.
        adapter_name: The adapter to write.

    Raises:
        KeyError: A name is no BiasEdit layer of ``adapter_name``.
        ValueError: A delta has the wrong shape or non-finite values.
        TypeError: A delta is not a floating-point tensor or a pair of them.
        RuntimeError: The adapter is merged into a named layer.
    """
    config = _peft_config(model, adapter_name)
    targets = _check_names(model, adapter_name, deltas)
    for name, delta in deltas.items():
        _validate(name, targets[name], delta)
        if targets[name].merged and adapter_name in targets[name].merged_adapters:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into {name!r}; unmerge before writing deltas.")
    stored = {
        name: _in_storage(tuple(d) if isinstance(d, list) else d, config.delta_storage, targets[name].weight_shape)
        for name, d in deltas.items()
    }
    for name, delta in stored.items():
        targets[name].write_delta(adapter_name, delta)
        if isinstance(delta, tuple):
            config.delta_ranks[name] = int(delta[0].shape[1])
        else:
            config.delta_ranks.pop(name, None)


def get_deltas(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{module name: dense float32 delta}`` of ``adapter_name`` (detached copies, native layout).

    Args:
        model: A ``PeftModel`` with a BiasEdit adapter.
        adapter_name: The adapter to read.
    """
    _peft_config(model, adapter_name)
    return {
        name: layer.get_delta_weight(adapter_name).detach().clone()
        for name, layer in edit_targets(model, adapter_name).items()
    }


@contextlib.contextmanager
def override_deltas(model, deltas: DeltaMapping, adapter_name: str = "default") -> Iterator[None]:
    """Within the block, layers use ``deltas`` (which may carry autograd) instead of their stored deltas.

    The functional application of an edit: nothing is written to weights or adapter parameters, so leaving
    the block restores the previous behaviour exactly. Modules not named keep their stored delta.

    Args:
        model: A ``PeftModel`` with a BiasEdit adapter.
        deltas: ``{module name: delta or (A, B)}``, as for :func:`set_deltas`.
        adapter_name: The adapter whose deltas are overridden.

    Raises:
        KeyError: A name is no BiasEdit layer of ``adapter_name``.
        ValueError: A delta does not have the module's weight shape.
    """
    targets = _check_names(model, adapter_name, deltas)
    for name, delta in deltas.items():
        rows_cols = targets[name].weight_shape
        factors = _as_factors(delta)
        shape = (factors[0].shape[0], factors[1].shape[1]) if factors is not None else tuple(delta.shape)
        if shape != rows_cols:
            raise ValueError(f"Override for {name!r} has shape {shape}; expected {rows_cols}.")
    try:
        for name, delta in deltas.items():
            targets[name]._delta_overrides[adapter_name] = tuple(delta) if isinstance(delta, list) else delta
        yield
    finally:
        for name in deltas:
            targets[name]._delta_overrides.pop(adapter_name, None)


def delta_nbytes(model, adapter_name: str = "default") -> int:
    """Bytes the stored deltas of ``adapter_name`` take (what ``save_pretrained`` writes, before headers).

    Args:
        model: A ``PeftModel`` with a BiasEdit adapter.
        adapter_name: The adapter to measure.
    """
    total = 0
    for layer in edit_targets(model, adapter_name).values():
        for store in (layer.biasedit_delta, layer.biasedit_A, layer.biasedit_B):
            if adapter_name in store:
                total += store[adapter_name].numel() * store[adapter_name].element_size()
    return total



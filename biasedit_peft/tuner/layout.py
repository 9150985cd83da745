"""The one owner of how a BiasEdit delta is laid out: orientation, dense or factored, and how deltas add.

Three layouts meet here:

- **key -> value** ``[d_in, d_out]``: what the editor's ridge solve produces (``v' = v + u S``);
- **native**: the base weight's own layout, ``[in, out]`` for a GPT-2 ``Conv1D`` (``fan_in_fan_out``) and
  ``[out, in]`` for ``nn.Linear``; what an adapter stores and :func:`~biasedit_peft.tuner.set_deltas` takes;
- **out -> in** ``[out, in]``: ``nn.Linear``'s and LoRA's (``delta = lora_B @ lora_A``).

A delta is dense or a pair of factors ``(A, B)`` with ``delta = A @ B``; it is stored factored exactly when that
holds fewer numbers (:func:`factored_is_smaller`). Nothing outside ``tuner/`` reads an adapter's parameters:
:func:`stored_delta` gives its stored form.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]
DeltaLike = Union[Tensor, Factors]

DELTA_PARAMETER_NAMES = ("biasedit_delta", "biasedit_A", "biasedit_B")
"""The adapter parameters that hold deltas (the ``adapter_layer_names`` of ``BiasEditLayer``)."""


def native_from_key_value(delta: Tensor, fan_in_fan_out: bool) -> Tensor:
    """A key -> value delta ``[d_in, d_out]`` in the native layout (a view: ``[in, out]`` or ``[out, in]``)."""
    return delta if fan_in_fan_out else delta.T


def native_factors(left: Tensor, right: Tensor, fan_in_fan_out: bool) -> Factors:
    """Key -> value factors ``left [d_in, r] @ right [r, d_out]`` as native factors ``(A, B)``, ``A @ B`` native."""
    return (left, right) if fan_in_fan_out else (right.T, left.T)


def out_in(delta: Tensor, fan_in_fan_out: bool) -> Tensor:
    """A native dense delta in ``[out, in]`` layout."""
    return delta.T if fan_in_fan_out else delta


def out_in_factors(first: Tensor, second: Tensor, fan_in_fan_out: bool) -> Factors:
    """Native factors ``(A, B)`` as ``(left [out, r], right [r, in])``: ``left @ right`` is the ``[out, in]`` delta."""
    return (second.T, first.T) if fan_in_fan_out else (first, second)


def native_from_out_in_factors(left: Tensor, right: Tensor, fan_in_fan_out: bool) -> Factors:
    """``(left [out, r], right [r, in])`` (LoRA's ``lora_B``, ``lora_A``) as native factors."""
    return (right.T, left.T) if fan_in_fan_out else (left, right)


def factored_is_smaller(rank: int, shape: tuple[int, int]) -> bool:
    """Whether rank-``rank`` factors of a ``shape`` delta hold fewer numbers than the dense delta."""
    rows, cols = shape
    return rank * (rows + cols) < rows * cols


def in_smaller_form(factors: Factors, shape: tuple[int, int]) -> DeltaLike:
    """``factors``, or their product when the dense ``shape`` delta is smaller."""
    return factors if factored_is_smaller(factors[0].shape[1], shape) else factors[0] @ factors[1]


def factorise(delta: Tensor) -> Factors:
    """An exact (to float32 rounding) rank-revealing factorisation ``delta = A @ B`` by SVD."""
    left, singular, right = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    tolerance = singular.max().clamp_min(torch.finfo(torch.float32).tiny) * max(delta.shape) * 1e-7
    rank = max(1, int((singular > tolerance).sum()))
    return left[:, :rank] * singular[:rank], right[:rank]


def add_deltas(current: DeltaLike | None, new: Factors, shape: tuple[int, int]) -> DeltaLike:
    """``current + new`` exactly, in the smaller form: factors are concatenated (``[A1 A2] @ [B1; B2]``), a dense
    ``current`` gets the product added. ``current`` None: ``new`` alone. All native layout, ``shape``."""
    if current is None:
        return in_smaller_form(new, shape)
    if isinstance(current, tuple):
        return in_smaller_form((torch.cat((current[0], new[0]), 1), torch.cat((current[1], new[1]), 0)), shape)
    return current + new[0] @ new[1]


def stored_delta(layer, adapter_name: str, drop_zero: bool = True) -> DeltaLike | None:
    """What ``layer`` stores for ``adapter_name`` (detached, native layout, dense or factored); with ``drop_zero``
    None when it is zero. KeyError when the layer does not hold the adapter."""
    if not layer.has_delta(adapter_name):
        raise KeyError(f"Adapter {adapter_name!r} does not cover this layer")
    if adapter_name in layer.biasedit_A:
        pair = (layer.biasedit_A[adapter_name].detach(), layer.biasedit_B[adapter_name].detach())
        return None if drop_zero and not (pair[0].any() and pair[1].any()) else pair
    dense = layer.biasedit_delta[adapter_name].detach()
    return None if drop_zero and not dense.any() else dense

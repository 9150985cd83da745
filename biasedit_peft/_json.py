"""Plain-JSON values for the documents the commands write (``trace.json``, ``sweep.json``)."""

from __future__ import annotations

import math

from torch import Tensor


def json_ready(value, digits: int = 6):
    """``value`` with tensors as lists, floats rounded to ``digits`` and NaN as None (strict JSON has no NaN);
    dicts, lists and tuples converted recursively, anything else unchanged."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, digits) for v in value]
    return value

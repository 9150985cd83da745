"""Named profiler ranges around the float32-by-design work, and a step's time split by part.

The editor, its solve and the vocabulary-wide log-softmax run in float32 whatever the LM's dtype, so a bf16 LM
speeds up only the rest of a meta-step. :func:`float32_range` marks that work with
``torch.profiler.record_function`` (about a microsecond when no profiler runs; under one the ranges show in
``chrome://tracing`` or TensorBoard traces), and :func:`time_by_part` splits a profiled step's CPU time into
:data:`PARTS`. ``biasedit bench --sections speed`` prints the split and what it implies for bf16 / fp32
(:func:`float32_parts_bound`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from torch.profiler import record_function

EDITOR_RANGE = "biasedit::editor_float32"
"""The hyper-network, the ridge solve, the meta-backward and the editor's optimizer step."""
VOCABULARY_RANGE = "biasedit::vocabulary_float32"
"""The log-softmax over the vocabulary of the debias and retention losses and its backward (scoring.py,
editor/losses.py)."""

PARTS = ("editor_float32", "vocabulary_float32", "attention", "lm_matmul", "lm_other", "untracked")
"""Where a step's time goes: the two float32 ranges; then, outside them, the attention kernels (and every op they
call), the other matrix products, every other op; ``untracked`` is wall time in no op (Python, the profiler)."""
FLOAT32_PARTS = ("editor_float32", "vocabulary_float32")

_RANGE_PARTS = {EDITOR_RANGE: "editor_float32", VOCABULARY_RANGE: "vocabulary_float32"}
_ATTENTION_PREFIX = "aten::_scaled_dot_product"
_PUBLIC_ATTENTION = "aten::scaled_dot_product_attention"
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                        "aten::_addmm_activation"})


def float32_range(name: str) -> record_function:
    """A ``with`` block that the profiler records as ``name`` (:data:`EDITOR_RANGE` or :data:`VOCABULARY_RANGE`)."""
    if name not in _RANGE_PARTS:
        raise ValueError(f"Unknown range {name!r}; use one of {sorted(_RANGE_PARTS)}")
    return record_function(name)


class ProfiledOp(Protocol):
    """What :func:`part_of` reads of a ``torch.autograd.profiler_util.FunctionEvent``."""

    name: str
    cpu_parent: Any
    self_cpu_time_total: float


def part_of(event: ProfiledOp) -> str:
    """The part of :data:`PARTS` that ``event``'s own time belongs to: the innermost float32 range around it; else
    ``attention`` inside (or being) an attention kernel; else ``lm_matmul`` for a matrix product; else ``lm_other``."""
    in_attention = False
    node = event
    while node is not None:
        if node.name in _RANGE_PARTS:
            return _RANGE_PARTS[node.name]
        in_attention = in_attention or node.name.startswith((_ATTENTION_PREFIX, _PUBLIC_ATTENTION))
        node = node.cpu_parent
    if in_attention:
        return "attention"
    return "lm_matmul" if event.name in MATMUL_OPS else "lm_other"


def time_by_part(events: Iterable[ProfiledOp], wall_seconds: float) -> dict[str, float]:
    """Seconds per part of :data:`PARTS` of a profiled stretch that took ``wall_seconds``: each event's own
    (``self``) CPU time goes to :func:`part_of` it, so nothing is counted twice; ``untracked`` is the wall time
    left over (never below 0).

    ``events``: ``profiler.events()`` of a ``torch.profiler.profile`` on the CPU around the stretch.
    """
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in events:
        seconds[part_of(event)] += event.self_cpu_time_total / 1e6
    seconds["untracked"] = max(0.0, wall_seconds - sum(seconds.values()))
    return seconds


def float32_seconds(parts: Mapping[str, float]) -> float:
    """The float32-by-design share of :func:`time_by_part`'s ``parts`` (:data:`FLOAT32_PARTS`), in its units."""
    return sum(parts[part] for part in FLOAT32_PARTS)


def float32_parts_bound(fp32_step: float, fp32_float32: float, bf16_float32: float, matmul_ratio: float) -> float:
    """The best bf16 / fp32 speed-up of a step that takes ``fp32_step`` seconds in fp32, of which
    ``fp32_float32`` are float32 by design, if everything else ran ``matmul_ratio`` times faster in bf16 and the
    float32 parts took ``bf16_float32`` seconds, as measured in the bf16 step.

    It is an upper bound: in bf16 the LM's norms, activations and copies do not speed up with the matrix units."""
    return fp32_step / (bf16_float32 + (fp32_step - fp32_float32) / matmul_ratio)

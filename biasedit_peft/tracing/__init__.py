"""Bias tracing: ROME-style causal tracing of where a model's stereotype preference lives (docs/tracing.md).

``trace_items`` runs it on StereoSet items and returns a :class:`TraceResult` (``to_json()`` for the numbers,
:func:`format_trace` for a text summary, :func:`plot_trace` for the pictures, which needs matplotlib:
``pip install biasedit-peft[plot]``).
"""

from .layout import KINDS, ModelLayout, find_layout
from .plots import PLOT_HINT, plot_trace
from .prompts import POSITIONS, SKIP_REASONS, TracePrompt, UntraceableItem, prepare_prompt, prepare_prompts
from .trace import (
    TRACE_FORMAT,
    WEAK_GAP,
    KindSummary,
    PromptTrace,
    PromptTracer,
    TraceResult,
    TraceSettings,
    bias_effect,
    embedding_std,
    format_trace,
    trace_items,
    trace_prompt,
    window_matrix,
)

__all__ = [
    "KINDS", "PLOT_HINT", "POSITIONS", "SKIP_REASONS", "TRACE_FORMAT", "WEAK_GAP", "KindSummary", "ModelLayout",
    "PromptTrace", "PromptTracer", "TracePrompt", "TraceResult", "TraceSettings", "UntraceableItem", "bias_effect",
    "embedding_std", "find_layout", "format_trace", "plot_trace", "prepare_prompt", "prepare_prompts",
    "trace_items", "trace_prompt", "window_matrix",
]

"""Forward hooks for causal tracing: record clean states, add noise to input embeddings, restore states.

Every hook returns a new tensor (no in-place change of activations the model may reuse, never of
weights) and is removed when its context exits. A module's output may be a tensor or a tuple whose first
element is the state (attention modules return ``(output, weights)``); both are handled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..scoring import batch_major
from .layout import base_model_of


def _state(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_state(output, state: Tensor):
    return (state, *output[1:]) if isinstance(output, tuple) else state


@contextmanager
def record_states(modules: Sequence[nn.Module], batch_shape: Sequence[int]) -> Iterator[list[Tensor | None]]:
    """Yields a list that holds, after a forward pass of a ``batch_shape`` ``(B, T)`` batch, each module's output
    state [B, T, D] (detached)."""
    records: list[Tensor | None] = [None] * len(modules)

    def hook_for(index: int):
        def hook(module, inputs, output):
            records[index] = batch_major(_state(output), batch_shape, f"Traced module {index}").detach()
        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_embedding_noise(model: nn.Module, noise: Tensor, start: int) -> Iterator[None]:
    """Add ``noise`` [B, n, D] to the input-embedding output at positions ``[start, start + n)``."""
    embeddings = base_model_of(model).get_input_embeddings()

    def hook(module, inputs, output):
        patched = output.clone()
        end = start + noise.shape[1]
        patched[:, start:end] = output[:, start:end] + noise.to(output)
        return patched

    handle = embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def restore_states(modules: Sequence[nn.Module], clean: Tensor, sentence_of_row: Tensor,
                   mask: Tensor) -> Iterator[None]:
    """Replace module outputs by clean states where ``mask`` says so.

    ``clean`` [2, L, T, D]: clean states of the two sentences at each of the ``L`` modules;
    ``sentence_of_row`` [B] long: which sentence each batch row is; ``mask`` [B, L, T] bool: restore row
    ``b``'s state at module ``l``, position ``t``. Modules with nothing to restore are left alone.
    """
    def hook_for(layer: int):
        def hook(module, inputs, output):
            where = mask[:, layer]  # [B, T]
            if not bool(where.any()):
                return None
            state = _state(output)
            current = batch_major(state, where.shape, f"Traced module {layer}")  # [B, T, D]
            source = clean[sentence_of_row, layer].to(state)  # [B, T, D]
            return _with_state(output, torch.where(where[..., None], source, current).view_as(state))
        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def continuation_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prefix_len: int) -> Tensor:
    """``sum_{t >= prefix_len} log p(x_t | x_<t)`` over the real tokens of each row -> [B] float32.

    ``input_ids`` / ``attention_mask`` [B, T], right-padded. Only the logits at positions
    ``prefix_len - 1 .. T - 2`` are computed: a pre-hook on the output embedding slices its input.
    """
    keep = slice(prefix_len - 1, input_ids.shape[1] - 1)
    head = base_model_of(model).get_output_embeddings()
    handle = None
    if head is not None:
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, keep], *args[1:]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if logits.shape[1] == input_ids.shape[1]:  # the model did not call its output embedding module
        logits = logits[:, keep]
    logits = logits.float()  # [B, K, V]
    targets = input_ids[:, prefix_len:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return picked.masked_fill(attention_mask[:, prefix_len:] == 0, 0.0).sum(-1)

"""Prefix replay: run only the blocks from the first edited one on, when what comes before cannot change.

A meta-step runs every LM batch through the model twice: once unedited (caching keys and value gradients,
or the pre-edit logits of the retention loss) and once with the predicted deltas. The deltas sit in the
MLP output projections of the last few blocks, so everything before the first edited block computes the
same thing both times. :class:`PrefixReplay` records the hidden states that enter that block during the
first pass and, in the second, skips the blocks before it (each returns its input unchanged) and feeds
the recorded hidden states into the first edited block instead. With SmolLM2-135M (30 blocks, the last 3
edited) the edited pass then costs the last 3 blocks and the LM head.

Nothing about the architecture is assumed beyond a ``ModuleList`` of blocks that the model calls in order
with the hidden states as first argument (or ``hidden_states=``). A skipped block returns what the blocks
returned while recording: the hidden states alone (Llama, GPT-2, ...) or a tuple led by them, padded with None
(Falcon, Bloom, MPT, whose model loop reads ``outputs[0]``). :meth:`PrefixReplay.check` compares a
replayed forward with a full one; the trainer runs it once and falls back to full forwards, with a
warning, if they differ.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


def decoder_blocks(model: nn.Module, edited: Sequence[nn.Module]) -> tuple[nn.ModuleList, int] | None:
    """The ``ModuleList`` of blocks that holds the ``edited`` layers and the index of the first block holding
    one; None when no single ``ModuleList`` holds them all."""
    wanted = {id(module) for module in edited}
    best: tuple[nn.ModuleList, int] | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        holding = [i for i, block in enumerate(module) if wanted & {id(m) for m in block.modules()}]
        covered = {id(m) for i in holding for m in module[i].modules()} & wanted
        if holding and covered == wanted and (best is None or holding[0] > best[1]):
            best = (module, holding[0])
    return best


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class PrefixReplay:
    """Record the input of the first edited block, and replay it while skipping the blocks before it.

    Args:
        model: The (PEFT) model.
        edited: Its edited layers. ``enabled`` is False when they are not in one block list or start at block 0
            (nothing to skip); then both contexts do nothing.
    """

    def __init__(self, model: nn.Module, edited: Sequence[nn.Module]):
        found = decoder_blocks(model, edited)
        self.blocks, self.first = found if found is not None else (None, 0)
        self.enabled = self.blocks is not None and self.first > 0
        self.tuple_length: int | None = None
        """None while the blocks return the hidden states alone; else the length of the tuple they return
        (noted from the first block while recording)."""

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward appends the (detached) hidden states ``[B, T, hidden]`` entering the
        first edited block to the yielded list."""
        recorded: list[torch.Tensor] = []
        if not self.enabled:
            yield recorded
            return

        def keep(module, args, kwargs):
            recorded.append(_hidden_states(args, kwargs).detach())

        def note_output_structure(module, args, output):
            self.tuple_length = len(output) if isinstance(output, tuple) else None

        handles = [self.blocks[self.first].register_forward_pre_hook(keep, with_kwargs=True),
                   self.blocks[0].register_forward_hook(note_output_structure)]
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replay(self, hidden: torch.Tensor | Sequence[torch.Tensor] | None) -> Iterator[None]:
        """Within the block, forwards skip the blocks before the first edited one and feed it recorded hidden
        states instead: ``hidden`` ``[B, T, hidden]`` for one forward, or a sequence of them (from
        :meth:`record`) consumed one per forward, in order. ``hidden`` None: full forwards.

        A forward whose batch is not the shape of the next recorded one, or one too many, raises RuntimeError.
        """
        if not self.enabled or hidden is None:
            yield
            return
        queue = iter([hidden] if isinstance(hidden, torch.Tensor) else list(hidden))

        def substitute(module, args, kwargs):
            arriving = _hidden_states(args, kwargs)
            recorded = next(queue, None)
            if recorded is None or recorded.shape != arriving.shape:
                raise RuntimeError(f"Prefix replay: a forward of shape {tuple(arriving.shape)} has no recorded "
                                   f"prefix of that shape ({None if recorded is None else tuple(recorded.shape)})")
            if args:
                return (recorded, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": recorded}

        skipped = list(self.blocks)[: self.first]
        saved = [block.__dict__.get("forward") for block in skipped]  # e.g. accelerate's hooked forward
        pass_through = partial(_pass_through, tuple_length=self.tuple_length)
        for block in skipped:
            block.forward = pass_through
        handle = self.blocks[self.first].register_forward_pre_hook(substitute, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for block, forward in zip(skipped, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def check(self, forward: Callable[[], torch.Tensor], rtol: float = 1e-3, atol: float = 1e-3) -> bool:
        """Whether ``forward()`` (logits) gives the same with a recorded prefix replayed as in full; on a
        mismatch replay is switched off (``enabled`` False) with a warning. Returns ``enabled``."""
        if not self.enabled:
            return False
        try:
            with torch.no_grad():
                with self.record() as recorded:
                    full = forward()
                with self.replay(recorded[0] if len(recorded) == 1 else None):
                    replayed = forward()
            same = len(recorded) == 1 and torch.allclose(full.float(), replayed.float(), rtol=rtol, atol=atol)
        except Exception:  # a model whose block loop expects something else from its blocks
            same = False
        if not same:
            self.enabled = False
            warnings.warn("Prefix replay does not reproduce this model's forward pass; meta-steps run every block "
                          "(slower, same results)", stacklevel=2)
        return self.enabled


def _pass_through(*args, tuple_length: int | None = None, **kwargs):
    """A skipped block: returns the hidden states it was given, alone (``tuple_length`` None) or first in a tuple
    of ``tuple_length`` padded with None."""
    hidden = _hidden_states(args, kwargs)
    return hidden if tuple_length is None else (hidden,) + (None,) * (tuple_length - 1)

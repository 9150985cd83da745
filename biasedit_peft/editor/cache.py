"""Caching the keys and value gradients the editor consumes.

For every edited layer and every *scored logit position* the cache keeps the key ``u`` (the layer's
input) and the value gradient ``g`` (gradient of the debias loss with respect to the layer's output).
A scored token at position ``t`` is predicted by the logits at ``t - 1``, so those are the positions
cached (the BiasEdit code caches ``t`` instead: off by one, see docs/method.md).

:class:`KeyValueCache` is the accumulator (``update`` per LM batch, like a LEACE fitter);
:func:`record_layer_io` is the hook context that captures inputs and output gradients of the layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..scoring import batch_major, logit_positions


@dataclass
class LayerRecord:
    """Per-layer tensors captured during one forward pass."""

    inputs: torch.Tensor | None = None
    """``[B, T, d_in]`` layer input (``[B * T, d_in]`` in OPT), detached."""
    outputs: torch.Tensor | None = None
    """``[B, T, d_out]`` layer output (``[B * T, d_out]`` in OPT), in the autograd graph of the loss."""


def rows_at_positions(tensor: torch.Tensor, positions: torch.Tensor, layer: str) -> torch.Tensor:
    """``[N, d]``: the rows of ``layer``'s input or output ``tensor`` (``[B, T, d]``, or ``[B * T, d]`` in OPT:
    :func:`~biasedit_peft.scoring.batch_major`) at ``positions`` ``[B, T]`` (bool, N True)."""
    return batch_major(tensor, positions.shape, f"Layer {layer!r}")[positions.to(tensor.device)]


class LayerRecorder:
    """Forward hooks that record each layer's input and output; value gradients come from ``autograd.grad``.

    Using ``torch.autograd.grad`` (not ``backward``) leaves every ``.grad`` of the model untouched.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.records = {name: LayerRecord() for name in modules}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            record = self.records[name]
            record.inputs = inputs[0].detach()
            if not torch.is_grad_enabled():
                record.outputs = None
                return None
            if not output.requires_grad:  # the first edited layer of a frozen model: start the graph here
                output = output.detach().requires_grad_(True)
            record.outputs = output
            return output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def take(
        self, loss: torch.Tensor, positions: torch.Tensor, device: torch.device | str
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (keys [N, d_in], value_grads [N, d_out])}`` at ``positions [B, T]``, float32 on ``device``.

        ``value_grads`` is ``d loss / d output`` at each recorded layer. Clears the records.
        """
        names = list(self.records)
        missing = [name for name in names if self.records[name].outputs is None]
        if missing:
            raise RuntimeError(f"Layers {missing} saw no forward pass with gradients; are they on the model's path?")
        outputs = [self.records[name].outputs for name in names]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        taken = {}
        for name, output, grad in zip(names, outputs, grads):
            if grad is None:
                grad = torch.zeros_like(output)
            taken[name] = (
                rows_at_positions(self.records[name].inputs, positions, name).to(device=device, dtype=torch.float32),
                rows_at_positions(grad, positions, name).to(device=device, dtype=torch.float32),
            )
            self.records[name] = LayerRecord()
        return taken


@contextmanager
def record_layer_io(modules: Mapping[str, nn.Module]) -> Iterator[LayerRecorder]:
    """Hook ``modules`` for one or more forward passes; hooks are removed on exit."""
    recorder = LayerRecorder(modules)
    try:
        yield recorder
    finally:
        recorder.remove()


@dataclass
class KeyValueCache:
    """Keys and value gradients per layer, accumulated over LM batches (all float32)."""

    keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    value_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def update(self, taken: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append one batch ``{name: (keys [n, d_in], value_grads [n, d_out])}``; rejects non-finite."""
        for name, (keys, value_grads) in taken.items():
            if not (torch.isfinite(keys).all() and torch.isfinite(value_grads).all()):
                raise FloatingPointError(f"Non-finite keys or value gradients at layer {name!r}")
            self.keys.setdefault(name, []).append(keys)
            self.value_grads.setdefault(name, []).append(value_grads)

    def layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [N, d_in], value_grads [N, d_out])`` of layer ``name`` over all batches."""
        if name not in self.keys:
            raise KeyError(f"No cached tokens for layer {name!r}")
        return torch.cat(self.keys[name]), torch.cat(self.value_grads[name])

    @property
    def names(self) -> list[str]:
        return list(self.keys)

    @property
    def n_tokens(self) -> int:
        """Number of cached token positions (the same for every layer)."""
        first = next(iter(self.keys.values()), [])
        return sum(k.shape[0] for k in first)


@dataclass(frozen=True)
class EditSample:
    """One edit: a stereotyped sentence, its anti-stereotyped twin and (optionally) an unrelated one.

    ``target`` / ``bias_type`` (optional: StereoSet items have them) say which group the pair is about; the
    held-out meta-loss (``trainer.held_out_group``) pairs an edit with pairs of the same bias type and other
    target terms.
    """

    stereotype: str
    anti_stereotype: str
    unrelated: str | None = None
    target: str | None = None
    bias_type: str | None = None


def as_edit_sample(sample, index: int = 0) -> EditSample:
    """Accept a StereoSet item (attributes), a dict with the same keys, or a 2- / 3-tuple of strings."""
    if isinstance(sample, EditSample):
        return sample
    keys = ("stereotype", "anti_stereotype", "unrelated", "target", "bias_type")
    if isinstance(sample, (tuple, list)) and len(sample) in (2, 3):
        fields = list(sample) + [None] * (5 - len(sample))
    elif isinstance(sample, dict):
        fields = [sample.get(key) for key in keys]
    else:
        fields = [getattr(sample, key, None) for key in keys]
    stereotype, anti_stereotype, unrelated, target, bias_type = fields
    for key, value in (("stereotype", stereotype), ("anti_stereotype", anti_stereotype)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"Sample {index}: field {key!r} must be a non-empty sentence, got {value!r}")
    if unrelated is not None and not isinstance(unrelated, str):
        raise ValueError(f"Sample {index}: field 'unrelated' must be a sentence or None, got {unrelated!r}")
    for key, value in (("target", target), ("bias_type", bias_type)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"Sample {index}: field {key!r} must be a string or absent, got {value!r}")
    return EditSample(stereotype, anti_stereotype, unrelated, target, bias_type)


@torch.no_grad()
def key_grams(model: nn.Module, layers: Mapping[str, nn.Module],
              batches: Iterable) -> tuple[dict[str, torch.Tensor], int]:
    """``({name: U^T U [d_in, d_in] float64}, N)``: the Gram of each layer's inputs ``U [N, d_in]`` at every logit
    position that scores a token (:func:`~biasedit_peft.scoring.logit_positions`) of the
    :class:`~biasedit_peft.scoring.TokenBatch` es ``batches``, summed over them (no gradients; the model is run as
    it is)."""
    from ..scoring import model_device

    grams: dict[str, torch.Tensor] = {}
    n_rows = 0
    device = model_device(model)
    with record_layer_io(layers) as recorder:
        for batch in batches:
            batch = batch.to(device)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            positions = logit_positions(batch.target_mask)
            n_rows += int(positions.sum())
            for name, record in recorder.records.items():
                keys = rows_at_positions(record.inputs, positions, name).to(torch.float64)
                grams[name] = grams[name] + keys.T @ keys if name in grams else keys.T @ keys
                recorder.records[name] = LayerRecord()
    return grams, n_rows

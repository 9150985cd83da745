"""Where the blocks, MLPs and attentions of a causal LM are, found from the module tree (not class names).

A :class:`ModelLayout` names the block list (``transformer.h`` in GPT-2, ``model.layers`` in Llama-style
models) and the attribute of the MLP and of the attention inside a block. :func:`find_layout` tries the
usual names; models laid out differently pass them explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

KINDS = ("hidden", "mlp", "attn")
"""What is restored: a block's output (the residual stream after the block), its MLP output, its attention output."""

BLOCK_PATHS = ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.layers",
               "model.language_model.layers", "transformer.blocks")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc2")
"""``fc2``: OPT's blocks hold no MLP module; the output of its MLP output projection is the MLP's output (seen
flattened to ``[B * T, D]``, which the patching hooks view back to ``[B, T, D]``)."""
ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (its adapter layers stay in place), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class ModelLayout:
    """Dotted path of the block ``ModuleList`` and the MLP / attention attribute names inside a block."""

    blocks: str
    mlp: str
    attn: str

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return _get(base_model_of(model), self.blocks)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.block_list(model))

    def modules(self, model: nn.Module, kind: str) -> list[nn.Module]:
        """The ``n_layers`` modules whose outputs are the states of ``kind`` (one of :data:`KINDS`)."""
        blocks = list(self.block_list(model))
        if kind == "hidden":
            return blocks
        if kind in ("mlp", "attn"):
            return [getattr(block, getattr(self, kind)) for block in blocks]
        raise ValueError(f"Unknown state kind {kind!r}; choose one of {KINDS}")


def _first_child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if isinstance(getattr(block, name, None), nn.Module)), None)


def find_layout(model: nn.Module, blocks: str | None = None, mlp: str | None = None,
                attn: str | None = None) -> ModelLayout:
    """The layout of ``model`` (a ``PeftModel`` is looked through); given names override the search.

    Args:
        model: A transformers causal LM or a ``PeftModel`` over one.
        blocks: Dotted path of the block list (e.g. ``"model.layers"``); None: searched.
        mlp: Name of the MLP inside a block; None: searched.
        attn: Name of the attention inside a block; None: searched.

    Raises:
        ValueError: Naming what to pass, when the block list or a sub-module is not found.
    """
    base = base_model_of(model)
    hint = ("pass blocks='path.to.ModuleList' (e.g. 'transformer.h', 'model.layers'), mlp='...' and attn='...' "
            "(CLI: --blocks, --mlp-module, --attn-module)")
    paths = (blocks,) if blocks else BLOCK_PATHS
    found = next((p for p in paths if isinstance(_get(base, p), nn.ModuleList) and len(_get(base, p))), None)
    if found is None:
        what = (f"{blocks!r} is not a non-empty ModuleList" if blocks
                else f"none of {list(BLOCK_PATHS)} is a ModuleList")
        raise ValueError(f"Cannot find the transformer blocks of {type(base).__name__}: {what}; {hint}")
    first = _get(base, found)[0]
    names = {}
    for kind, given, candidates in (("mlp", mlp, MLP_NAMES), ("attn", attn, ATTN_NAMES)):
        names[kind] = _first_child(first, (given,) if given else candidates)
        if names[kind] is None:
            children = [name for name, _ in first.named_children()]
            raise ValueError(f"Cannot find the {kind} module in {found}[0] (children: {children}); {hint}")
    return ModelLayout(found, names["mlp"], names["attn"])

"""``BiasEditModel``: the PEFT tuner that wraps the edited layers of a model in BiasEdit adapter layers."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_NUM_EDIT_LAYERS, BiasEditConfig
from .layer import BiasEditLayer, Linear

# model_type -> suffix of the MLP output projection inside each block (matched as peft does: exact or ".suffix").
MLP_OUTPUT_PROJECTION: dict[str, str] = {
    "gpt2": "mlp.c_proj",
    "gptj": "mlp.fc_out",
    "gpt_neox": "mlp.dense_4h_to_h",
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "gemma": "mlp.down_proj",
    "gemma2": "mlp.down_proj",
    "gemma3_text": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "qwen3": "mlp.down_proj",
    "phi": "mlp.fc2",
    "phi3": "mlp.down_proj",
    "opt": "fc2",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "olmo": "mlp.down_proj",
    "olmo2": "mlp.down_proj",
    "stablelm": "mlp.down_proj",
    "starcoder2": "mlp.c_proj",
    "granite": "mlp.down_proj",
    # checked like the ones above, on tiny models built from their transformers configs (tests/test_tuner.py)
    "gpt_bigcode": "mlp.c_proj",
    "codegen": "mlp.fc_out",
    "persimmon": "mlp.dense_4h_to_h",
    "mpt": "ffn.down_proj",
    "xglm": "fc2",
    "biogpt": "fc2",
    "cohere": "mlp.down_proj",
    "cohere2": "mlp.down_proj",
    "smollm3": "mlp.down_proj",
    "glm": "mlp.down_proj",
    "glm4": "mlp.down_proj",
    "nemotron": "mlp.down_proj",
    "olmo3": "mlp.down_proj",
    "exaone4": "mlp.down_proj",
    "helium": "mlp.down_proj",
    "ministral": "mlp.down_proj",
    "ernie4_5": "mlp.down_proj",
    "lfm2": "feed_forward.w2",
}

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def default_target_suffix(model_type: str, model: torch.nn.Module | None = None) -> str:
    """The MLP output projection suffix for ``model_type``; for a type not in :data:`MLP_OUTPUT_PROJECTION`, the
    one known suffix that names modules in the numbered blocks of ``model`` (:func:`inferred_target_suffix`).

    Args:
        model_type: A transformers ``config.model_type``.
        model: The model, to infer the suffix of an unlisted architecture from its module names (None: no guess).

    Raises:
        ValueError: Unknown architecture and no single known suffix in ``model``; the message says how to name the
            targets instead.
    """
    suffix = MLP_OUTPUT_PROJECTION.get(model_type)
    if suffix is not None:
        return suffix
    suffix = inferred_target_suffix(model) if model is not None else None
    if suffix is not None:
        warnings.warn(f"BiasEdit has no table entry for model_type {model_type!r}; editing the modules ending in "
                      f"{suffix!r}, the only MLP output projection it knows in this model's blocks. Pass "
                      "BiasEditConfig(target_modules=[...]) to choose others.", stacklevel=3)
        return suffix
    known = ", ".join(sorted(MLP_OUTPUT_PROJECTION))
    raise ValueError(
        f"BiasEdit has no default target for model_type {model_type!r}. Pass "
        "BiasEditConfig(target_modules=[...]) naming the MLP output projection of the blocks to edit, e.g. "
        "target_modules=['mlp.down_proj'] (Llama-style) or ['mlp.c_proj'] (GPT-2), optionally with "
        f"layers_to_transform=[...]. Known model types: {known}."
    )


def inferred_target_suffix(model: torch.nn.Module) -> str | None:
    """The one suffix of :data:`MLP_OUTPUT_PROJECTION` that names modules in numbered blocks of ``model``, the most
    specific where two name the same modules (``mlp.fc2`` over ``fc2``); None when none does or several different
    ones do (e.g. a vision tower's ``mlp.fc2`` beside a language model's ``mlp.down_proj``)."""
    found = {suffix for suffix in set(MLP_OUTPUT_PROJECTION.values()) if block_indices(model, suffix)}
    specific = {suffix for suffix in found if not any(other.endswith("." + suffix) for other in found)}
    return specific.pop() if len(specific) == 1 else None


def block_indices(model: torch.nn.Module, suffix: str) -> list[int]:
    """Sorted block indices of the modules whose name ends with ``suffix`` (e.g. ``[0, 1, ..., 23]``).

    Args:
        model: The transformers model.
        suffix: A module-name suffix such as ``"mlp.down_proj"``.
    """
    indices = set()
    for name, _ in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            match = _BLOCK_INDEX.findall(name)
            if match:
                indices.add(int(match[-1]))
    return sorted(indices)


def _refuse_missing_blocks(wanted: list[int] | int, indices: list[int], suffix: str) -> None:
    """Raise ``ValueError`` naming the blocks of ``layers_to_transform`` (``wanted``) that hold no module ending in
    ``suffix`` (the model's are ``indices``, sorted)."""
    missing = sorted(set([wanted] if isinstance(wanted, int) else wanted) - set(indices))
    if missing:
        raise ValueError(f"layers_to_transform={wanted!r}: the model has no block {missing} with a module ending "
                         f"in {suffix!r}; its blocks are {indices[0]}-{indices[-1]}.")


class BiasEditModel(BaseTuner):
    """Wraps the targeted layers of a transformers model in BiasEdit adapter layers.

    Default targets (``target_modules=None``): the MLP output projection of the last ``num_edit_layers``
    blocks, chosen by ``model.config.model_type`` (see :data:`MLP_OUTPUT_PROJECTION`).
    """

    prefix: str = "biasedit_"
    tuner_layer_cls = BiasEditLayer
    target_module_mapping = {model_type: [suffix] for model_type, suffix in MLP_OUTPUT_PROJECTION.items()}

    def _prepare_adapter_config(self, peft_config: BiasEditConfig, model_config: dict) -> BiasEditConfig:
        if not getattr(self.model, "name_or_path", ""):
            warnings.warn(
                "This base model has no name_or_path (it was built from a config), so a saved adapter records "
                "base_model_name_or_path=None and AutoPeftModelForCausalLM cannot find its base. Load such "
                "adapters with PeftModel.from_pretrained(base, path), or save the base first and set "
                "model.name_or_path to its folder.",
                stacklevel=2,
            )
        if peft_config.target_modules is not None:
            if peft_config.layers_to_transform is not None and not isinstance(peft_config.target_modules, str):
                for suffix in sorted(peft_config.target_modules):  # a saved adapter's blocks, checked by name
                    indices = block_indices(self.model, suffix)
                    if indices:
                        _refuse_missing_blocks(peft_config.layers_to_transform, indices, suffix)
            return peft_config
        suffix = default_target_suffix(model_config.get("model_type", ""), self.model)
        peft_config.target_modules = {suffix}
        indices = block_indices(self.model, suffix)
        if not indices:
            raise ValueError(f"No module ending in {suffix!r} found in the model; pass target_modules explicitly.")
        if peft_config.layers_to_transform is None:
            if peft_config.num_edit_layers > max(len(indices), DEFAULT_NUM_EDIT_LAYERS):  # the default edits every
                # block of a smaller model; a number asked for is refused where the model has fewer blocks
                raise ValueError(f"num_edit_layers={peft_config.num_edit_layers}: the model has only {len(indices)} "
                                 f"blocks with a module ending in {suffix!r} ({indices[0]}-{indices[-1]}).")
            peft_config.layers_to_transform = indices[-peft_config.num_edit_layers :]
            return peft_config
        _refuse_missing_blocks(peft_config.layers_to_transform, indices, suffix)
        return peft_config

    @staticmethod
    def _create_new_module(config: BiasEditConfig, adapter_name: str, target: torch.nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (torch.nn.Linear, Conv1D)):
            raise TypeError(
                f"Target module {target} is not supported by BiasEdit: only torch.nn.Linear and transformers' "
                "Conv1D are (an MLP output projection is one of these)."
            )
        return Linear(target, adapter_name, config=config, **kwargs)

    def _create_and_replace(
        self,
        config: BiasEditConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, BiasEditLayer):
            target.update_layer(adapter_name, config=config, module_name=current_key)
            return
        new_module = self._create_new_module(config, adapter_name, target, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

"""``BiasEditConfig``: which layers a BiasEdit adapter edits and how its deltas are stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

DELTA_STORAGES = ("auto", "dense", "factored")


DEFAULT_NUM_EDIT_LAYERS = 3
"""The paper's number of edited blocks (the last three)."""


@dataclass
class BiasEditConfig(PeftConfig):
    """Configuration of a BiasEdit adapter (a weight delta per edited MLP output projection).

    The delta of a layer is produced by a trained :class:`~biasedit_peft.BiasEditor`, never by gradient
    training of the adapter itself. It has the shape of the base module's own ``weight`` (``[out, in]`` for
    ``nn.Linear``, ``[in, out]`` for transformers' ``Conv1D``), so merging is ``W + delta``; it can also be held
    exactly in factored form ``A @ B``.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names (exact or suffix match, as in peft) or a regex of the modules to edit. None: the MLP "
                "output projection of the last `num_edit_layers` blocks, chosen by `model.config.model_type`."
            )
        },
    )
    num_edit_layers: int = field(
        default=DEFAULT_NUM_EDIT_LAYERS,
        metadata={"help": "With target_modules=None and layers_to_transform=None: edit this many last blocks (the "
                          "default on a model with fewer blocks: all of them; another number it lacks: an error)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Block indices to edit (as in peft's LoRA). None: the last `num_edit_layers` blocks."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the block list (e.g. 'h' or 'layers'), used with layers_to_transform."},
    )
    delta_storage: Literal["auto", "dense", "factored"] = field(
        default="auto",
        metadata={
            "help": (
                "How deltas are stored: 'dense' (the weight's shape), 'factored' (A @ B), or 'auto' (whichever "
                "has fewer numbers for each delta written)."
            )
        },
    )
    factored_rank: int = field(
        default=8,
        metadata={"help": "Rank of a freshly created factored delta (delta_storage='factored')."},
    )
    delta_ranks: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Filled in automatically: module name -> rank, for every module whose delta is stored factored. "
                "Saved to adapter_config.json so that loading recreates the same parameter shapes."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero delta (the adapter is a no-op until an editor writes it). False: small random "
                  "delta, for tests."},
    )
    editor_id: Optional[str] = field(
        default=None, metadata={"help": "Provenance: the editor (folder or Hub id) that produced the deltas."}
    )
    edit_data: Optional[str] = field(
        default=None,
        metadata={"help": "Provenance: the samples the deltas were computed from (e.g. 'stereoset:test')."},
    )
    edit_info: dict = field(
        default_factory=dict,
        metadata={"help": "Provenance: free-form JSON-serialisable facts (counts, solve, command line)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft.utils import PeftType

        self.peft_type = PeftType.BIASEDIT
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.target_modules, set) and not self.target_modules:
            raise ValueError("BiasEditConfig.target_modules is empty; pass None for the default targets.")
        indices = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if indices is not None and any(not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"layers_to_transform must be non-negative ints, got {self.layers_to_transform!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform.")
        if not isinstance(self.num_edit_layers, int) or self.num_edit_layers < 1:
            raise ValueError(f"num_edit_layers must be a positive int, got {self.num_edit_layers!r}")
        if self.delta_storage not in DELTA_STORAGES:
            raise ValueError(f"delta_storage must be one of {DELTA_STORAGES}, got {self.delta_storage!r}")
        if not isinstance(self.factored_rank, int) or self.factored_rank < 1:
            raise ValueError(f"factored_rank must be a positive int, got {self.factored_rank!r}")
        if not isinstance(self.delta_ranks, dict) or any(
            not isinstance(r, int) or r < 1 for r in self.delta_ranks.values()
        ):
            raise ValueError(f"delta_ranks must map module names to positive ints, got {self.delta_ranks!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if not isinstance(self.edit_info, dict):
            raise ValueError(f"edit_info must be a dict, got {type(self.edit_info).__name__}")

"""BiasEdit adapter layers: a float32 weight delta added to ``nn.Linear`` / ``Conv1D`` outputs.

Per adapter a layer holds either a dense delta ``biasedit_delta[name]`` in the base weight's native layout
(``[out, in]`` for ``nn.Linear``, ``[in, out]`` for ``Conv1D``) or two factors ``biasedit_A[name] @
biasedit_B[name]`` equal to it. Deltas stay float32 whatever the base dtype; the forward computes the delta's
contribution in float32 and casts once.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import BiasEditConfig
from .layout import DELTA_PARAMETER_NAMES, DeltaLike

# scale of the random delta used with init_weights=False, relative to 1/sqrt(fan_in)
_RANDOM_INIT_SCALE = 0.1


class BiasEditLayer(BaseTunerLayer):
    """Mixin holding the per-adapter deltas of one edited layer."""

    adapter_layer_names = DELTA_PARAMETER_NAMES
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.biasedit_delta = nn.ParameterDict({})
        self.biasedit_A = nn.ParameterDict({})
        self.biasedit_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # weight copy taken at the first merge; unmerge restores it bitwise (no add-then-subtract)
        self._weight_before_merge: Optional[torch.Tensor] = None
        # adapter name -> tensor used instead of the stored delta (functional application, see deltas.py)
        self._delta_overrides: dict[str, DeltaLike] = {}

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(f"BiasEdit supports nn.Linear and transformers Conv1D layers, got {type(base).__name__}")

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight (native layout), which every dense delta shares."""
        return tuple(self.get_base_layer().weight.shape)

    # ----- creating deltas -------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: BiasEditConfig, module_name: str = "", **kwargs: Any) -> None:
        """Create (or re-create) the delta of ``adapter_name`` as ``config`` says, then move it next to the base."""
        rank = config.delta_ranks.get(module_name)
        if rank is None and config.delta_storage == "factored":
            rank = min(config.factored_rank, *self.weight_shape)
        self._remove_delta(adapter_name)
        if rank is None:
            self.biasedit_delta[adapter_name] = nn.Parameter(self._initial_dense(config.init_weights))
        else:
            first, second = self._initial_factors(rank, config.init_weights)
            self.biasedit_A[adapter_name] = nn.Parameter(first)
            self.biasedit_B[adapter_name] = nn.Parameter(second)
        self._move_delta_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _initial_dense(self, init_weights: bool) -> torch.Tensor:
        if init_weights:
            return torch.zeros(self.weight_shape, dtype=torch.float32)
        std = _RANDOM_INIT_SCALE / self.in_features**0.5
        return torch.randn(self.weight_shape, dtype=torch.float32) * std

    def _initial_factors(self, rank: int, init_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [rows, rank]``, ``B [rank, cols]``. Zero product at init still lets gradients reach ``A``."""
        rows, cols = self.weight_shape
        std = (_RANDOM_INIT_SCALE / self.in_features**0.5) ** 0.5 / rank**0.25
        first = torch.randn(rows, rank, dtype=torch.float32) * std
        second = torch.randn(rank, cols, dtype=torch.float32) * std
        if init_weights:
            first.zero_()
        return first, second

    def _remove_delta(self, adapter_name: str) -> None:
        for store in (self.biasedit_delta, self.biasedit_A, self.biasedit_B):
            if adapter_name in store:
                del store[adapter_name]

    def _move_delta_to_base_device(self, adapter_name: str) -> None:
        """Move this adapter's tensors to the base weight's device, keeping them float32."""
        device = self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for store in (self.biasedit_delta, self.biasedit_A, self.biasedit_B):
            tensor = store.get(adapter_name)
            if tensor is not None and tensor.device.type != "meta" and tensor.device != device:
                store[adapter_name] = nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)

    def write_delta(self, adapter_name: str, delta: DeltaLike) -> None:
        """Store ``delta`` for ``adapter_name`` as float32 on the base device.

        Validation is the caller's job (see :func:`biasedit_peft.tuner.deltas.set_deltas`).

        Args:
            adapter_name: The adapter whose delta is replaced.
            delta: A dense tensor of :attr:`weight_shape`, or factors ``(A, B)`` with ``delta = A @ B``.
        """
        requires_grad = self._requires_grad(adapter_name)
        self._remove_delta(adapter_name)
        device = self.get_base_layer().weight.device
        if isinstance(delta, tuple):
            first, second = delta
            self.biasedit_A[adapter_name] = nn.Parameter(
                first.detach().to(device, torch.float32).clone(), requires_grad=requires_grad
            )
            self.biasedit_B[adapter_name] = nn.Parameter(
                second.detach().to(device, torch.float32).clone(), requires_grad=requires_grad
            )
        else:
            self.biasedit_delta[adapter_name] = nn.Parameter(
                delta.detach().to(device, torch.float32).clone(), requires_grad=requires_grad
            )

    def _requires_grad(self, adapter_name: str) -> bool:
        for store in (self.biasedit_delta, self.biasedit_A):
            if adapter_name in store:
                return store[adapter_name].requires_grad
        return False

    # ----- reading deltas --------------------------------------------------------------------------
    def has_delta(self, adapter_name: str) -> bool:
        return adapter_name in self.biasedit_delta or adapter_name in self.biasedit_A

    def delta_rank(self, adapter_name: str) -> Optional[int]:
        """The stored rank of a factored delta, or None for a dense one.

        Args:
            adapter_name: The adapter to look at.
        """
        if adapter_name in self.biasedit_A:
            return self.biasedit_A[adapter_name].shape[1]
        return None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense float32 delta of ``adapter_name`` in the base weight's native layout.

        Args:
            adapter_name: The adapter to read.
        """
        if adapter_name in self.biasedit_delta:
            return self.biasedit_delta[adapter_name]
        return self.biasedit_A[adapter_name] @ self.biasedit_B[adapter_name]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """BiasEdit is additive (W' = W + delta): peft (>= 0.22, ``convert_to_lora``) may approximate it by a LoRA."""
        return True

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """W' - W of ``adapter_name`` for peft's ``get_additive_delta`` (>= 0.22, which refuses while an adapter is
        merged): :meth:`get_delta_weight`, float32, in the base weight's layout."""
        return self.get_delta_weight(adapter_name)

    def _active_delta(self, adapter_name: str) -> Optional[DeltaLike]:
        """What forward adds for ``adapter_name``: an override, the dense delta, or the factors."""
        if adapter_name in self._delta_overrides:
            return self._delta_overrides[adapter_name]
        if adapter_name in self.biasedit_delta:
            return self.biasedit_delta[adapter_name]
        if adapter_name in self.biasedit_A:
            return self.biasedit_A[adapter_name], self.biasedit_B[adapter_name]
        return None


def delta_output(x: torch.Tensor, delta: DeltaLike, fan_in_fan_out: bool) -> torch.Tensor:
    """``x @ delta`` in the layout that turns inputs ``[..., in]`` into outputs ``[..., out]`` (float32).

    Args:
        x: Layer inputs ``[..., in]``.
        delta: Dense, ``[in, out]`` when ``fan_in_fan_out`` (Conv1D) and ``[out, in]`` otherwise; or factors
            ``(A, B)`` that multiply out to that, applied without forming the product.
        fan_in_fan_out: Whether the base layer is a ``Conv1D``.
    """
    x = x.to(torch.float32)
    if isinstance(delta, tuple):
        first, second = delta
        if fan_in_fan_out:  # delta [in, out] = A [in, r] @ B [r, out]
            return (x @ first) @ second
        return (x @ second.T) @ first.T  # delta [out, in] = A [out, r] @ B [r, in]
    return x @ delta if fan_in_fan_out else x @ delta.T


def refuse_non_finite_deltas(state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of every BiasEdit layer: a delta tensor with NaN or Inf is refused, naming it
    (``PeftModel.from_pretrained`` would otherwise load it as it is)."""
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and any(key.startswith(f"{prefix}{name}.") for name in DELTA_PARAMETER_NAMES):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"BiasEdit delta {key!r} holds non-finite values (NaN or Inf); refusing to load it")


class Linear(nn.Module, BiasEditLayer):
    """A BiasEdit adapter around ``nn.Linear`` or ``Conv1D`` (``fan_in_fan_out`` tells them apart)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: BiasEditConfig,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        BiasEditLayer.__init__(self, base_layer)
        self._register_load_state_dict_pre_hook(refuse_non_finite_deltas)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config, module_name=module_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active ones) to the base weight.

        Computed as ``(W.float() + sum(deltas)).to(W.dtype)``: one cast.

        Args:
            safe_merge: Raise on a non-finite result and leave the weight untouched (it is always computed out
                of place here).
            adapter_names: The adapters to merge; ``None``: the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if self.has_delta(name)]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            merged = weight.detach().to(torch.float32)
            for name in adapter_names:
                merged = merged + self.get_delta_weight(name).detach().to(merged.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(adapter_names)} seems to be broken"
                )
            if self._weight_before_merge is None:
                self._weight_before_merge = weight.detach().clone()
            weight.data = merged.to(weight.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        update = None
        for name in self.active_adapters:
            delta = self._active_delta(name)
            if delta is None:
                continue
            term = delta_output(x, delta, self.fan_in_fan_out)
            update = term if update is None else update + term
        if update is None:
            return result
        return (result.to(torch.float32) + update).to(result.dtype)

    def __repr__(self) -> str:
        return "biasedit." + super().__repr__()

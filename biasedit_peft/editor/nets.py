"""The MALMEN hyper-network (Tan et al., ICLR 2024) that BiasEdit trains.

One :class:`EditorNet` serves every edited layer of one weight shape; per-layer behaviour comes from
the per-module ``scale`` / ``shift`` of each block, the step size ``lr[m]`` and the ridge strength
``lambda[m] = exp(log_lambda[m])``. Everything here is float32.
"""

from __future__ import annotations

import torch
from torch import nn


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count [], mean [size], sum of squared deviations from the mean [size])`` of rows ``x [N, size]``."""
    mean = x.mean(0)
    return torch.tensor(float(x.shape[0]), device=x.device), mean, ((x - mean) ** 2).sum(0)


class RunningMeanStd(nn.Module):
    """Running mean and standard deviation of feature vectors (Chan et al.'s parallel update)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("sum_sq", torch.zeros(size))  # sum of squared deviations from the mean

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold rows ``x [N, size]`` into the statistics."""
        self.merge(*batch_statistics(x))

    @torch.no_grad()
    def merge(self, count: torch.Tensor, mean: torch.Tensor, sum_sq: torch.Tensor) -> None:
        """Fold in the statistics of rows seen elsewhere (``count`` rows with ``mean [size]`` and ``sum_sq [size]``);
        the same as :meth:`update` with those rows."""
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.sum_sq += sum_sq + delta**2 * (self.count * count / total)
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        """Unbiased standard deviation ``[size]`` (zero before two rows were seen)."""
        return (self.sum_sq / (self.count - 1).clamp(min=1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


BLOCK_INITS = ("unit", "fan_in")
"""How a block's ``A`` is drawn: ``"unit"``, N(0, 1) entries (MALMEN's); ``"fan_in"``, N(0, 1 / size), so that
``h @ A`` has unit-variance entries for normalised ``h`` and one Adam step of size ``meta_lr`` on ``B`` moves the
block's output by about ``meta_lr * rank`` instead of ``meta_lr * rank * sqrt(size)`` (docs/method.md §3)."""


def check_block_init(block_init: str) -> None:
    """Refuses a ``block_init`` that is not one of :data:`BLOCK_INITS`."""
    if block_init not in BLOCK_INITS:
        raise ValueError(f"Unknown block_init {block_init!r}; choose one of {BLOCK_INITS}")


def block_a_std(block_init: str, size: int) -> float:
    """The standard deviation of a block's ``A`` entries for ``block_init`` (:data:`BLOCK_INITS`) and ``size``."""
    check_block_init(block_init)
    return 1.0 if block_init == "unit" else size ** -0.5


class EditorBlock(nn.Module):
    """``h + scale[m] * max(h @ A @ B + bias, 0) + shift[m]``; ``B = 0`` makes it the identity at init.

    The rectifier is ``clamp(min=0)``, as in MALMEN, not ``relu``: at init every pre-activation is exactly 0,
    where ``relu``'s gradient is 0 and ``clamp``'s is 1. With ``relu`` no gradient ever reaches ``A``, ``B``,
    ``bias`` or ``scale``, and the blocks stay the identity for the whole meta-training.
    """

    def __init__(self, size: int, rank: int, n_modules: int, a_std: float = 1.0):
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank) * a_std)
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, h: torch.Tensor, module_index: int) -> torch.Tensor:
        """``h [N, size]`` -> ``[N, size]``."""
        update = (h @ self.A @ self.B + self.bias).clamp(min=0)  # gradient 1 at 0: see the class docstring
        return h + self.scale[module_index] * update + self.shift[module_index]


class EditorNet(nn.Module):
    """Maps cached keys ``u`` and value gradients ``g`` of one layer to value changes ``d``.

    ``(u~, g~) = blocks(normalise([u, g]))`` and ``d = -lr[m] * (u . u~) * g~``: at init (identity
    blocks) this is MEND's rank-one gradient step with normalised factors.
    """

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int, lr: float,
                 block_init: str = "unit"):
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        size = key_size + value_size
        self.normalizer = RunningMeanStd(size)
        a_std = block_a_std(block_init, size)
        self.blocks = nn.ModuleList(EditorBlock(size, min(rank, size), n_modules, a_std) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_modules,), float(lr)))
        self.log_lambda = nn.Parameter(torch.zeros(n_modules))

    def forward(self, keys: torch.Tensor, value_grads: torch.Tensor, module_index: int):
        """``keys [N, key_size]``, ``value_grads [N, value_size]`` -> pseudo keys and value gradients."""
        h = self.normalizer(torch.cat((keys, value_grads), -1))
        for block in self.blocks:
            h = block(h, module_index)
        return h.split([self.key_size, self.value_size], -1)

    def value_changes(self, keys: torch.Tensor, value_grads: torch.Tensor, module_index: int) -> torch.Tensor:
        """``d = -lr[m] * (u . u~) * g~``: ``[N, value_size]``."""
        pseudo_keys, pseudo_grads = self(keys, value_grads, module_index)
        coefficients = -self.lr[module_index] * (keys * pseudo_keys).sum(-1, keepdim=True)
        return coefficients * pseudo_grads

    def ridge(self, module_index: int) -> torch.Tensor:
        """``lambda[m] = exp(log_lambda[m])`` (a scalar that carries autograd)."""
        return self.log_lambda[module_index].exp()

"""The ridge solve that turns value changes into a weight delta, and its exact backward pass.

For one layer with cached keys ``U [N, d_in]`` and value changes ``D [N, d_out]`` (one row per scored
token) MALMEN's delta is

    S = argmin_S ||U S - D||^2 + lambda ||S||^2
      = (U^T U + lambda I)^-1 U^T D          (primal, a d_in x d_in system)
      = U^T (U U^T + lambda I)^-1 D          (dual, an N x N system; push-through identity)

``S [d_in, d_out]`` maps keys to value changes (``v' = v + u S``). Both forms are an exact low-rank
product ``S = left @ right`` of rank ``min(N, d_in)``; we solve the smaller system (float32,
Cholesky) and keep the factors, never forming ``S`` unless asked. For the meta-gradient,
:meth:`RidgeSolution.backward` maps ``dL/dS`` to ``dL/dD`` and ``dL/dlambda`` in closed form
(MALMEN, Tan et al. 2024, Sec. 4.2), so the hyper-network can be recomputed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["auto", "primal", "dual"]


@dataclass(frozen=True)
class RidgeDelta:
    """A delta ``S = left @ right`` in key -> value layout ``[d_in, d_out]``, stored factored."""

    left: torch.Tensor
    """``[d_in, r]``: ``U^T`` (dual) or ``(U^T U + lambda I)^-1`` (primal)."""
    right: torch.Tensor
    """``[r, d_out]``: ``(U U^T + lambda I)^-1 D`` (dual) or ``U^T D`` (primal)."""

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def factored_is_smaller(self) -> bool:
        """Whether the two factors hold fewer numbers than the dense ``[d_in, d_out]`` delta."""
        d_in, d_out = self.left.shape[0], self.right.shape[1]
        return self.rank * (d_in + d_out) < d_in * d_out

    def dense(self) -> torch.Tensor:
        """``S [d_in, d_out]``."""
        return self.left @ self.right

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """Value changes ``keys [..., d_in] @ S -> [..., d_out]`` without forming ``S``."""
        return (keys @ self.left) @ self.right

    def native(self, fan_in_fan_out: bool, factored: bool | None = None):
        """The delta in the weight's native layout, for ``set_deltas`` / ``override_deltas``.

        ``[in, out]`` for ``Conv1D`` (``fan_in_fan_out``), ``[out, in]`` for ``nn.Linear``. Returns a
        pair ``(A, B)`` with ``delta = A @ B`` when ``factored`` (default: when that is smaller).
        """
        factored = self.factored_is_smaller if factored is None else factored
        if factored:
            return (self.left, self.right) if fan_in_fan_out else (self.right.T, self.left.T)
        dense = self.dense()
        return dense if fan_in_fan_out else dense.T


@dataclass(frozen=True)
class RidgeSolution:
    """A solved ridge problem: the delta plus what its backward pass needs."""

    delta: RidgeDelta
    keys: torch.Tensor
    """``U [N, d_in]``."""
    cholesky: torch.Tensor
    """Lower Cholesky factor of ``U^T U + lambda I`` (primal) or ``U U^T + lambda I`` (dual)."""
    form: Literal["primal", "dual"]

    def backward(self, delta_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dL/dS [d_in, d_out]`` -> ``(dL/dD [N, d_out], dL/dlambda [])``.

        Primal: ``dD = U M^-1 G``, ``dlambda = -<M^-1 G, S>`` with ``M = U^T U + lambda I``.
        Dual:   ``dD = K^-1 U G``, ``dlambda = -<dD, K^-1 D>`` with ``K = U U^T + lambda I``.
        """
        delta_grad = delta_grad.to(torch.float32)
        if self.form == "primal":
            solved_grad = torch.cholesky_solve(delta_grad, self.cholesky)  # M^-1 G  [d_in, d_out]
            return self.keys @ solved_grad, -(solved_grad * self.delta.dense()).sum()
        value_change_grad = torch.cholesky_solve(self.keys @ delta_grad, self.cholesky)  # [N, d_out]
        return value_change_grad, -(value_change_grad * self.delta.right).sum()


def choose_form(n_rows: int, key_size: int) -> Literal["primal", "dual"]:
    """The smaller linear system: dual (``N x N``) when ``N < d_in``, else primal."""
    return "dual" if n_rows < key_size else "primal"


def solve_ridge(
    keys: torch.Tensor, value_changes: torch.Tensor, ridge: float | torch.Tensor, form: Form = "auto"
) -> RidgeSolution:
    """Solve ``argmin_S ||U S - D||^2 + lambda ||S||^2`` in float32 (no autograd through it).

    ``keys [N, d_in]``, ``value_changes [N, d_out]``, ``ridge`` the positive scalar ``lambda``.
    """
    if keys.ndim != 2 or value_changes.ndim != 2 or keys.shape[0] != value_changes.shape[0]:
        raise ValueError(f"Need keys [N, d_in] and value changes [N, d_out]; got {tuple(keys.shape)} "
                         f"and {tuple(value_changes.shape)}")
    if keys.shape[0] == 0:
        raise ValueError("Cannot solve for a delta from zero cached tokens")
    with torch.no_grad():
        keys = keys.detach().to(torch.float32)
        value_changes = value_changes.detach().to(torch.float32)
        ridge = torch.as_tensor(ridge, dtype=torch.float32, device=keys.device).detach()
        form = choose_form(*keys.shape) if form == "auto" else form
        gram = keys @ keys.T if form == "dual" else keys.T @ keys
        gram.diagonal().add_(ridge)
        cholesky, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            raise FloatingPointError(
                f"The ridge system is not positive definite (lambda={float(ridge):.3g}); "
                "the cached keys are probably not finite"
            )
        if form == "dual":
            delta = RidgeDelta(keys.T, torch.cholesky_solve(value_changes, cholesky))
        else:
            eye = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
            delta = RidgeDelta(torch.cholesky_solve(eye, cholesky), keys.T @ value_changes)
    return RidgeSolution(delta, keys, cholesky, form)

"""The ridge solve that turns value changes into a weight delta, and its exact backward pass.

For one layer with cached keys ``U [N, d_in]`` and value changes ``D [N, d_out]`` (one row per scored
token) MALMEN's delta is

    S = argmin_S ||U S - D||^2 + lambda ||S||^2
      = (U^T U + lambda I)^-1 U^T D          (primal, a d_in x d_in system)
      = U^T (U U^T + lambda I)^-1 D          (dual, an N x N system; push-through identity)

``S [d_in, d_out]`` maps keys to value changes (``v' = v + u S``). Real keys (SwiGLU products entering
a Llama ``down_proj``) have Gram diagonals up to ~1e7 and exact duplicate rows (every BOS, shared
prefixes), so in float32 ``lambda ~ 1`` vanishes next to the Gram and the Cholesky fails or loses
~1e-3. We therefore solve the smaller system in float64: the Gram is formed from float64 keys,
Cholesky-factorised and solved in float64, and the factor and the solved system stay float64 for the
backward. The delta is returned as a float32 product ``S = left @ right`` (rank ``N`` for the dual,
``d_in`` for the primal) of well-conditioned factors, so rounding them costs ~2e-7 relative: with
``L L^T = U U^T + lambda I`` the dual keeps ``left = U^T L^-T`` (whitened keys, spectral norm < 1)
and ``right = L^-1 D``; the primal keeps ``left = I`` and ``right = S``. (The plain dual factors
``U^T`` and ``(U U^T + lambda I)^-1 D`` lose ~1e-3 at ``lambda = 1`` to float32 rounding alone:
duplicate keys give ``right`` large rows that cancel in the product.) ``S`` is never formed unless
asked. For the meta-gradient, :meth:`RidgeSolution.backward` maps ``dL/dS`` to ``dL/dD`` and ``dL/dlambda``
in closed form (MALMEN, Tan et al. 2024, Sec. 4.2), so the hyper-network can be recomputed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..distributed import SINGLE, Processes

Form = Literal["auto", "primal", "dual"]


@dataclass(frozen=True)
class RidgeDelta:
    """A delta ``S = left @ right`` in key -> value layout ``[d_in, d_out]``, stored factored (float32)."""

    left: torch.Tensor
    """``[d_in, r]``: ``U^T L^-T`` with ``L L^T = U U^T + lambda I`` (dual, ``r = N``) or ``I`` (primal)."""
    right: torch.Tensor
    """``[r, d_out]``: ``L^-1 D`` (dual) or ``S`` (primal)."""

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        """``S [d_in, d_out]``."""
        return self.left @ self.right

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """Value changes ``keys [..., d_in] @ S -> [..., d_out]`` without forming ``S``."""
        return (keys @ self.left) @ self.right


@dataclass(frozen=True)
class RidgeSolution:
    """A solved ridge problem: the delta plus what its backward pass needs."""

    delta: RidgeDelta
    keys: torch.Tensor
    """``U [N, d_in]`` (float32)."""
    cholesky: torch.Tensor
    """float64 lower Cholesky factor of ``U^T U + lambda I`` (primal) or ``U U^T + lambda I`` (dual)."""
    form: Literal["primal", "dual"]
    solved: torch.Tensor
    """float64 ``S [d_in, d_out]`` (primal) or ``(U U^T + lambda I)^-1 D [N, d_out]`` (dual)."""
    rows: slice | None = None
    """A dual solved across processes: this process's rows among ``keys`` (all rows); None otherwise."""

    def backward(self, delta_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dL/dS [d_in, d_out]`` -> float32 ``(dL/dD [N, d_out], dL/dlambda [])``, computed in float64.

        Primal: ``dD = U M^-1 G``, ``dlambda = -<M^-1 G, S>`` with ``M = U^T U + lambda I``.
        Dual:   ``dD = K^-1 U G``, ``dlambda = -<dD, K^-1 D>`` with ``K = U U^T + lambda I``.
        """
        keys = self.keys.to(torch.float64)
        delta_grad = delta_grad.to(device=keys.device, dtype=torch.float64)
        if self.form == "primal":
            solved_grad = torch.cholesky_solve(delta_grad, self.cholesky)  # M^-1 G  [d_in, d_out]
            change_grad = keys @ solved_grad
            ridge_grad = -(solved_grad * self.solved).sum()
        else:
            change_grad = torch.cholesky_solve(keys @ delta_grad, self.cholesky)  # [N, d_out]
            ridge_grad = -(change_grad * self.solved).sum()
        return change_grad.to(torch.float32), ridge_grad.to(torch.float32)


def choose_form(n_rows: int, key_size: int) -> Literal["primal", "dual"]:
    """The smaller linear system: dual (``N x N``) when ``N < d_in``, else primal."""
    return "dual" if n_rows < key_size else "primal"


def _not_positive_definite(keys: torch.Tensor, gram: torch.Tensor, ridge: torch.Tensor, minor: int) -> str:
    """Why the Cholesky of ``gram`` (``lambda`` already on its diagonal) failed at leading minor ``minor``."""
    size = f"{gram.shape[0]} x {gram.shape[0]}"
    bad = int((~torch.isfinite(keys)).sum())
    if bad:
        return f"The ridge system ({size}) is not positive definite: the cached keys hold {bad} non-finite values"
    largest = float(gram.diagonal().max()) - float(ridge)
    return (f"The ridge system ({size}) is not positive definite: the Cholesky failed at leading minor {minor}; "
            f"lambda={float(ridge):.3g} is {float(ridge) / max(largest, 1e-300):.2g} of the Gram's largest "
            f"diagonal {largest:.3g} (float64 resolves ~1e-16 of it)")


def solve_ridge(
    keys: torch.Tensor, value_changes: torch.Tensor, ridge: float | torch.Tensor, form: Form = "auto",
    processes: Processes = SINGLE,
) -> RidgeSolution:
    """Solve ``argmin_S ||U S - D||^2 + lambda ||S||^2`` in float64 (no autograd through it).

    Args:
        keys: ``U [N, d_in]``: all rows, or this process's rows when ``processes`` holds several.
        value_changes: ``D [N, d_out]``, the same rows.
        ridge: The positive scalar ``lambda``.
        form: ``"dual"`` (an ``N x N`` system), ``"primal"`` (``d_in x d_in``) or ``"auto"`` (the smaller, for the
            total ``N`` over the processes).
        processes: The processes whose rows together make the system (``biasedit_peft.distributed``): the primal's
            ``U^T U`` and ``U^T D`` are summed across them, the dual's ``U`` and ``D`` gathered, so every process
            gets the solution one process would compute from all rows (additions in another order).

    Returns:
        A :class:`RidgeSolution` (the same on every process); its delta's factors are float32, on the keys'
        device. Its ``keys`` are this process's rows (primal) or all rows (dual).

    Raises:
        ValueError: Shapes that do not fit, or no rows.
        FloatingPointError: The system is not positive definite (the message says why).
    """
    if keys.ndim != 2 or value_changes.ndim != 2 or keys.shape[0] != value_changes.shape[0]:
        raise ValueError(f"Need keys [N, d_in] and value changes [N, d_out]; got {tuple(keys.shape)} "
                         f"and {tuple(value_changes.shape)}")
    n_rows = processes.sum_int(keys.shape[0])
    if n_rows == 0:
        raise ValueError("Cannot solve for a delta from zero cached tokens")
    with torch.no_grad():
        keys = keys.detach().to(torch.float32)
        value_changes = value_changes.detach().to(device=keys.device, dtype=torch.float32)
        form = choose_form(n_rows, keys.shape[1]) if form == "auto" else form
        rows = None
        if form == "dual" and processes.distributed:  # U U^T couples all rows: gather them
            sizes = processes.gather_objects(keys.shape[0])
            start = sum(sizes[: processes.rank])
            rows = slice(start, start + keys.shape[0])
            keys, value_changes = processes.gather_rows(keys), processes.gather_rows(value_changes)
        keys64 = keys.to(torch.float64)
        changes64 = value_changes.to(torch.float64)
        ridge = torch.as_tensor(ridge, dtype=torch.float64, device=keys.device).detach()
        summed = processes.sum if processes.distributed and form == "primal" else (lambda tensor: tensor)
        gram = keys64 @ keys64.T if form == "dual" else summed(keys64.T @ keys64)
        gram.diagonal().add_(ridge)
        cholesky, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            raise FloatingPointError(_not_positive_definite(keys, gram, ridge, int(info)))
        if form == "dual":
            whitened = torch.linalg.solve_triangular(cholesky, torch.cat((keys64, changes64), 1), upper=False)
            white_keys, white_changes = whitened.split([keys.shape[1], changes64.shape[1]], 1)  # L^-1 U, L^-1 D
            solved = torch.linalg.solve_triangular(cholesky.T, white_changes, upper=True)  # K^-1 D  [N, d_out]
            delta = RidgeDelta(white_keys.T.to(torch.float32), white_changes.to(torch.float32))
        else:
            solved = torch.cholesky_solve(summed(keys64.T @ changes64), cholesky)  # S  [d_in, d_out]
            eye = torch.eye(keys.shape[1], dtype=torch.float32, device=keys.device)
            delta = RidgeDelta(eye, solved.to(torch.float32))
    return RidgeSolution(delta, keys, cholesky, form, solved, rows)


@dataclass(frozen=True)
class RidgeSystem:
    """The normal equations of one layer's ridge problem, diagonalised once, so that any ``lambda`` solves cheaply.

    With ``U^T U = Q diag(e) Q^T`` (float64), ``S(lambda) = Q diag(1 / (e + lambda)) Q^T U^T D``. A joint delta pools
    thousands of tokens (``N >> d_in``), where the ``lambda`` an editor learned on ~10^3-token edits is negligible
    next to the Gram: :meth:`ridge_for` turns a multiple of the Gram's mean eigenvalue ``tr(U^T U + C) / d_in``
    into the absolute ``lambda`` that :meth:`solve` takes, so one number means the same for every layer and data
    size.
    """

    eigenvalues: torch.Tensor
    """``e [d_in]`` float64, ascending, the eigenvalues of ``U^T U`` (clamped at 0)."""
    eigenvectors: torch.Tensor
    """``Q [d_in, d_in]`` float64, orthonormal columns."""
    projected: torch.Tensor
    """``Q^T U^T D [d_in, d_out]`` float64."""
    n_rows: int
    """``N``, the token rows over every process."""
    edit_gram: torch.Tensor | None = None
    """``Q^T U^T U Q [d_in, d_in]`` float64 when a preserved Gram was added (``e`` then diagonalises ``U^T U + C``),
    else None (``U^T U = Q diag(e) Q^T``)."""

    @classmethod
    def from_rows(cls, keys: torch.Tensor, value_changes: torch.Tensor, processes: Processes = SINGLE,
                  preserved_gram: torch.Tensor | None = None) -> "RidgeSystem":
        """The system of rows ``keys [N, d_in]`` and ``value_changes [N, d_out]`` (this process's rows; the normal
        equations are summed over ``processes``); ``preserved_gram`` as in :meth:`from_normal_equations`."""
        if keys.ndim != 2 or value_changes.ndim != 2 or keys.shape[0] != value_changes.shape[0]:
            raise ValueError(f"Need keys [N, d_in] and value changes [N, d_out]; got {tuple(keys.shape)} "
                             f"and {tuple(value_changes.shape)}")
        with torch.no_grad():
            keys64 = keys.detach().to(torch.float64)
            changes64 = value_changes.detach().to(device=keys.device, dtype=torch.float64)
            gram, moment = processes.sum(keys64.T @ keys64), processes.sum(keys64.T @ changes64)
        return cls.from_normal_equations(gram, moment, processes.sum_int(keys.shape[0]), preserved_gram)

    @classmethod
    def from_normal_equations(cls, gram: torch.Tensor, moment: torch.Tensor, n_rows: int,
                              preserved_gram: torch.Tensor | None = None) -> "RidgeSystem":
        """The system with ``U^T U = gram [d_in, d_in]`` and ``U^T D = moment [d_in, d_out]`` over ``n_rows`` rows.

        ``preserved_gram``: ``C [d_in, d_in]`` (e.g. ``w U_r^T U_r`` of keys whose values must not change) added to
        ``U^T U``, so the delta solves ``argmin ||U S - D||^2 + w ||U_r S||^2 + lambda ||S||^2`` (MEMIT's
        preservation term)."""
        if n_rows == 0:
            raise ValueError("Cannot solve for a delta from zero cached tokens")
        with torch.no_grad():
            gram, moment = gram.to(torch.float64), moment.to(device=gram.device, dtype=torch.float64)
            system = gram if preserved_gram is None else gram + preserved_gram.to(gram.device, torch.float64)
            eigenvalues, eigenvectors = torch.linalg.eigh(system)
            edit_gram = None if preserved_gram is None else eigenvectors.T @ gram @ eigenvectors
        return cls(eigenvalues.clamp(min=0), eigenvectors, eigenvectors.T @ moment, n_rows, edit_gram)

    @property
    def mean_eigenvalue(self) -> float:
        """``tr(U^T U + C) / d_in`` (``C`` the preserved Gram, if any): the mean squared key entry times ``N``."""
        return float(self.eigenvalues.mean())

    def ridge_for(self, relative: float) -> float:
        """``lambda = relative x tr(U^T U + C) / d_in`` (``C`` the preserved Gram, if any)."""
        return relative * self.mean_eigenvalue

    def solve(self, ridge: float) -> RidgeDelta:
        """``S(lambda)`` as float32 factors ``Q`` and ``diag(1 / (e + lambda)) Q^T U^T D`` (well conditioned: ``Q`` is
        orthonormal)."""
        if not ridge > 0:
            raise ValueError(f"lambda must be positive, got {ridge}")
        right = self.projected / (self.eigenvalues + ridge).unsqueeze(1)
        return RidgeDelta(self.eigenvectors.to(torch.float32), right.to(torch.float32))

    def fitted_norm(self, ridge: float) -> float:
        """``||U S(lambda)||_F``: how large the value changes the delta makes on the system's own keys are."""
        if self.edit_gram is None:
            weights = self.eigenvalues / (self.eigenvalues + ridge) ** 2
            return float((weights.unsqueeze(1) * self.projected**2).sum().sqrt())
        rotated = self.projected / (self.eigenvalues + ridge).unsqueeze(1)  # Q^T S
        return float(((self.edit_gram @ rotated) * rotated).sum().clamp(min=0).sqrt())

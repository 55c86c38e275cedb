"""The closed-form ridge edit of a linear map, shared by UCE, RECE and MACE.

Given a linear map ``W0`` (a cross-attention key or value projection, ``out x d``), inputs ``c_i`` (text token
embeddings, ``d``), targets ``v_i`` (``out``) and weights ``w_i >= 0``, the edited map minimises

    L(W) = sum_i w_i ||W c_i - v_i||^2 + lam ||W - W0||_F^2,

whose normal equations ``W (sum_i w_i c_i c_i^T + lam I) = sum_i w_i v_i c_i^T + lam W0`` give

    W = (sum_i w_i v_i c_i^T + lam W0) (sum_i w_i c_i c_i^T + lam I)^-1.

UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024, arXiv 2308.14761, Eq. 7 with
the ``lambda`` term of the official code) takes erase rows ``(c_i, v_i* = W0 c_anchor)`` weighted by the erase
scale and preserve rows ``(c_j, W0 c_j)`` weighted by the preserve scale ``lambda_p``:

    W = (sum_E v* c^T + lambda_p sum_P W0 c c^T + lam W0) (sum_E c c^T + lambda_p sum_P c c^T + lam I)^-1.

The Gram matrix depends only on the inputs, so :class:`RidgeSolver` factors it once (float64 LU) and solves for
every projection that shares the inputs; the inverse is never formed. With fewer inputs than dimensions
(``n < d``, the usual case: a few hundred token embeddings of width 768-2048) it solves in the low-rank form

    W = W0 + (sum_i w_i (v_i - W0 c_i) c_i^T) A^-1,

which follows from ``lam A^-1 = I - A^-1 sum_i w_i c_i c_i^T``; ``A^-1 C^T`` (``d x n``) is computed once, so
each map costs two ``n x d x out`` products instead of a ``d x d x out`` triangular solve.

**Kept rows.** Preservation rows have the targets a fixed map gives them, ``v_j = M c_j`` (``M = W0`` in UCE
and RECE; the original map in MACE's fusion, whose ridge anchor is another). Their part of the right-hand side is
``sum_K w_j M c_j c_j^T = M G_K`` with ``G_K = sum_K w_j c_j c_j^T`` formed once, so :class:`RidgeSolver` takes
them apart (``kept``) and never multiplies them by a map: with ``M = W0`` their residual ``v_j - W0 c_j`` is zero
and the low-rank form above runs over the other rows alone. A preserve set of 200 prompts at all 77 positions
(RECE's) is 15,400 rows; each of SD 1.4's 32 maps then costs two ``n x d x out`` products over the few erase rows
instead of over 15,400.

RECE (Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models", ECCV 2024, Eq. 5 and
its "regzero" regulariser) uses the same ridge with the roles swapped: the unknown is a text embedding ``c'`` and
the rows are the edited maps ``W'_l`` (every key and value projection of every layer, stacked),

    c' = argmin sum_l ||W'_l c' - W_l c||^2 + lam_reg ||c'||^2 = (sum_l W'_l^T W'_l + lam_reg I)^-1 sum_l W'_l^T W_l c,

the embedding that makes the *edited* model's keys and values equal the *original* model's for ``c``
(:func:`adversarial_embeddings`). Its Gram matrix is :class:`RidgeSolver`'s with the stacked rows of ``W'`` as
inputs, and its right-hand side goes through the ``d x d`` matrix ``sum_l W'_l^T W_l`` rather than the targets
``W_l c`` of every row (RECE's word embeddings are 77 rows per concept).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RidgeSolver", "adversarial_embeddings", "ridge_objective", "ridge_solution"]


def _solver_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


def _weights(inputs: Tensor, weights: Tensor | float | None) -> Tensor:
    count = inputs.shape[0]
    if weights is None:
        return torch.ones(count, dtype=torch.float64, device=inputs.device)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=inputs.device)
    if weights.ndim == 0:
        weights = weights.expand(count)
    if weights.shape != (count,):
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({count},), one per input.")
    if (weights < 0).any():
        raise ValueError("Ridge weights must be non-negative.")
    return weights


class RidgeSolver:
    """Factor ``A = sum_i w_i c_i c_i^T + G_K + lam I`` once; solve ``W A = sum_i w_i v_i c_i^T + M G_K + lam W0``.

    Args:
        inputs: ``[n, d]`` inputs ``c_i`` whose targets each solve gives.
        weights: ``[n]`` non-negative weights ``w_i`` (or one number for all; ``None``: ones).
        lam: Ridge strength ``lam >= 0`` pulling ``W`` towards ``W0``.
        kept: ``[m, d]`` kept rows ``c_j`` (module docstring): their target is ``M c_j`` for the map ``M`` given to
            :meth:`solve` (``W0`` unless named), so they need no targets; ``G_K = sum_j w_j c_j c_j^T``.
        kept_weights: ``[m]`` non-negative weights of the kept rows (or one number; ``None``: ones).

    Raises:
        ValueError: If ``A`` is singular (``lam = 0`` with fewer independent rows than ``d``), or on bad shapes.
    """

    def __init__(
        self,
        inputs: Tensor,
        weights: Tensor | float | None = None,
        lam: float = 0.5,
        *,
        kept: Tensor | None = None,
        kept_weights: Tensor | float | None = None,
    ) -> None:
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be [n, d], got shape {tuple(inputs.shape)}.")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}.")
        device = _solver_device(inputs.device)
        self.inputs = inputs.detach().to(device, torch.float64)
        self.weights = _weights(self.inputs, weights)
        self.lam = float(lam)
        dim = self.inputs.shape[1]
        kept = self.inputs.new_zeros((0, dim)) if kept is None else kept.detach().to(device, torch.float64)
        if kept.ndim != 2 or kept.shape[1] != dim:
            raise ValueError(f"kept must be [m, {dim}] like the inputs, got shape {tuple(kept.shape)}.")
        self.kept = kept
        self.kept_weights = _weights(kept, kept_weights)
        kept_gram = (kept * self.kept_weights[:, None]).T @ kept
        self._kept_gram = (kept_gram + kept_gram.T) / 2  # G_K
        weighted = self.inputs * self.weights[:, None]
        gram = (
            weighted.T @ self.inputs + self._kept_gram + self.lam * torch.eye(dim, dtype=torch.float64, device=device)
        )
        self.gram = (gram + gram.T) / 2  # exactly symmetric
        self._lu, self._pivots, info = torch.linalg.lu_factor_ex(self.gram)
        pivots = self._lu.diagonal().abs()
        # rank deficiency shows as a pivot at rounding level relative to the largest one
        tiny = pivots.min() <= dim * torch.finfo(torch.float64).eps * pivots.max()
        if int(info) != 0 or not torch.isfinite(self._lu).all() or tiny:
            rows = self.inputs.shape[0] + kept.shape[0]
            raise ValueError(
                f"The ridge system is singular (lam={lam}, {rows} inputs of dimension {dim}); use lam > 0."
            )
        # A^-1 C^T, for the low-rank form of solve() when there are fewer inputs than dimensions
        self._gain = torch.linalg.lu_solve(self._lu, self._pivots, self.inputs.T) if len(self.inputs) < dim else None

    def solve_gram(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` for a ``[d, k]`` right-hand side (float64), with the factorisation made once."""
        if rhs.ndim != 2 or rhs.shape[0] != self.inputs.shape[1]:
            raise ValueError(f"rhs has shape {tuple(rhs.shape)}; expected [{self.inputs.shape[1]}, k].")
        return torch.linalg.lu_solve(self._lu, self._pivots, rhs.detach().to(self.inputs.device, torch.float64))

    def solve(self, w0: Tensor, targets: Tensor, kept_map: Tensor | None = None) -> Tensor:
        """The minimiser ``W`` of ``sum_i w_i ||W c_i - v_i||^2 + sum_j w_j ||(W - M) c_j||^2 + lam ||W - W0||^2``.

        Args:
            w0: ``[out, d]`` original map (the ridge anchor).
            targets: ``[n, out]`` targets ``v_i``, one row per input (none for the kept rows).
            kept_map: ``M``, the ``[out, d]`` map whose outputs the kept rows keep; ``None``: ``w0``.

        Returns:
            ``[out, d]`` in ``w0``'s dtype and device.
        """
        if w0.ndim != 2 or w0.shape[1] != self.inputs.shape[1]:
            raise ValueError(f"w0 has shape {tuple(w0.shape)}; expected [out, {self.inputs.shape[1]}].")
        if targets.shape != (self.inputs.shape[0], w0.shape[0]):
            raise ValueError(
                f"targets has shape {tuple(targets.shape)}; expected ({self.inputs.shape[0]}, {w0.shape[0]})."
            )
        if kept_map is not None and kept_map.shape != w0.shape:
            raise ValueError(f"kept_map has shape {tuple(kept_map.shape)}; expected {tuple(w0.shape)} like w0.")
        device = self.inputs.device
        w0_64 = w0.detach().to(device, torch.float64)
        targets_64 = targets.detach().to(device, torch.float64)
        if self._gain is not None and kept_map is None:  # W^T = W0^T + A^-1 C^T D (V - C W0^T); kept residuals 0
            residual = (targets_64 - self.inputs @ w0_64.T) * self.weights[:, None]  # [n, out]
            solution = w0_64 + (self._gain @ residual).T
            return solution.to(w0.device, w0.dtype)
        kept_64 = w0_64 if kept_map is None else kept_map.detach().to(device, torch.float64)
        rhs = (targets_64 * self.weights[:, None]).T @ self.inputs + self.lam * w0_64  # [out, d]
        if len(self.kept):
            rhs = rhs + kept_64 @ self._kept_gram  # sum_K w_j (M c_j) c_j^T = M G_K
        # W A = rhs with A symmetric  <=>  A W^T = rhs^T
        solution = torch.linalg.lu_solve(self._lu, self._pivots, rhs.T).T
        return solution.to(w0.device, w0.dtype)


def ridge_solution(
    w0: Tensor, inputs: Tensor, targets: Tensor, weights: Tensor | float | None = None, lam: float = 0.5
) -> Tensor:
    """One-off :meth:`RidgeSolver.solve`: ``W = (sum w v c^T + lam W0)(sum w c c^T + lam I)^-1``."""
    return RidgeSolver(inputs, weights, lam).solve(w0, targets)


def ridge_objective(
    w: Tensor, w0: Tensor, inputs: Tensor, targets: Tensor, weights: Tensor | float | None = None, lam: float = 0.5
) -> float:
    """``sum_i w_i ||W c_i - v_i||^2 + lam ||W - W0||_F^2`` in float64."""
    inputs_64 = inputs.detach().double()
    residual = inputs_64 @ w.detach().double().T - targets.detach().double()
    fit = (_weights(inputs_64, weights) * residual.pow(2).sum(dim=1)).sum()
    return float(fit + lam * (w.detach().double() - w0.detach().double()).pow(2).sum())


def adversarial_embeddings(
    edited: list[Tensor], original: list[Tensor], embeddings: Tensor, regularisation: float
) -> Tensor:
    """RECE's closed-form adversarial embeddings: ``c' = (sum W'^T W' + lam_reg I)^-1 sum W'^T W c`` per row ``c``.

    Args:
        edited: The edited maps ``W'_l``, each ``[out_l, d]`` (output widths may differ between maps).
        original: The original maps ``W_l``, in the same order and shapes.
        embeddings: ``[n, d]`` token embeddings ``c`` of the erased concept.
        regularisation: ``lam_reg > 0``, pulling ``c'`` towards zero (RECE's "regzero").

    Returns:
        ``[n, d]`` float64 embeddings ``c'``: through the edited maps they give (in the least-squares sense) the
        keys and values the original maps gave ``c``.

    Raises:
        ValueError: On mismatched maps or a singular system.
    """
    if len(edited) != len(original) or not edited:
        raise ValueError(f"got {len(edited)} edited and {len(original)} original maps; give the same, non-zero number")
    for new, old in zip(edited, original, strict=True):
        if new.shape != old.shape or new.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"maps of shape {tuple(new.shape)} / {tuple(old.shape)} do not fit embeddings of width "
                f"{embeddings.shape[1]}."
            )
    rows = torch.cat([w.detach().to(torch.float64) for w in edited])  # [sum out_l, d]: the "inputs" of the ridge
    device = _solver_device(rows.device)
    rows = rows.to(device)
    embeddings_64 = embeddings.detach().to(device, torch.float64)
    solver = RidgeSolver(rows, None, regularisation)  # A = sum_l W'_l^T W'_l + lam_reg I
    # sum_l W'_l^T W_l c, through the d x d matrix B = sum_l W'_l^T W_l: never the n x sum(out_l) targets W_l c
    cross = sum(new.detach().to(device, torch.float64).T @ old.detach().to(device, torch.float64)
                for new, old in zip(edited, original, strict=True))  # fmt: skip
    return solver.solve_gram(cross @ embeddings_64.T).T  # c' = A^-1 B c, one column per embedding

"""The weight update of one layer [design note section 7]: AlphaEdit's null-space solve with MEMIT's
spreading, NMKE's neuron mask (exact restricted solve or reference post-mask), and MEMIT itself."""

from __future__ import annotations

import torch

from ...stats import nullspace_basis
from .config import EditConfig


def _project(basis: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``P m`` with ``P = basis basis^T`` (never forming P)."""
    return basis @ (basis.T @ m)


def solve_layer(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    *,
    config: EditConfig,
    c0: torch.Tensor,
    c_past: torch.Tensor,
    basis: torch.Tensor | None,
    selected: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve for the value-vector changes of one layer.

    Args:
        keys: ``[D, u]`` keys of the requests at this layer (one column per request).
        residuals: ``[d, u]`` the residual each request still needs at this layer (``R``).
        c0: ``[D, D]`` key second moment of preserved text; ``c_past``: ``[D, D]`` past edits' ``K K^T``.
        basis: ``[D, r]`` null-space basis of ``c0`` (AlphaEdit / post-mask), or None.
        selected: neuron indices the sparse method may change (None = all).

    Returns:
        ``(rows, X, kept_dim)``: neuron indices, their changes ``[len(rows), d]`` (``X = Delta^T``), and the
        dimension of the null space used.
    """
    k = keys.float()
    r = residuals.float()
    dim = k.shape[0]
    lam = config.lambda_reg * float(torch.diagonal(c0).mean())
    if config.method == "memit":
        a = config.memit_lambda * c0 + k @ k.T
        x = torch.linalg.solve(a, k @ r.T)
        return torch.arange(dim), x, dim
    if config.method == "nmke" and config.masked_solve == "exact":
        assert selected is not None
        s = selected.to(torch.long)
        ks = k[s]
        sub_basis = nullspace_basis(c0[s][:, s], config.projector_energy)
        lhs = _project(sub_basis, ks @ ks.T + c_past[s][:, s]) + lam * torch.eye(len(s))
        x = torch.linalg.solve(lhs, _project(sub_basis, ks @ r.T))
        return s, x, int(sub_basis.shape[1])
    assert basis is not None
    lhs = _project(basis, k @ k.T + c_past) + lam * torch.eye(dim)
    x = torch.linalg.solve(lhs, _project(basis, k @ r.T))
    if config.method == "nmke":  # reference post-mask: zero the rows of unselected neurons
        assert selected is not None
        s = selected.to(torch.long)
        return s, x[s], int(basis.shape[1])
    return torch.arange(dim), x, int(basis.shape[1])

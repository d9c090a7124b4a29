"""The weight update of one layer [design note section 7]: AlphaEdit's null-space solve with MEMIT's
spreading, NMKE's neuron mask (soft or null-space solve on the selected neurons, or the reference post-mask),
and MEMIT itself."""

from __future__ import annotations

import math

import torch

from ...stats import nullspace_basis
from .config import EditConfig


def _project(basis: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``P m`` with ``P = basis basis^T`` (never forming P)."""
    return basis @ (basis.T @ m)


def _landing(keys: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of each request's residual that ``X = (K K^T + B)^-1 K R^T`` realises (``diag G(I+G)^-1``,
    ``G = K^T B^-1 K``)."""
    g = keys.T @ torch.linalg.solve(b, keys)
    u = g.shape[0]
    realised = torch.linalg.solve(torch.eye(u, dtype=g.dtype) + g, g)
    return float(torch.diagonal(realised).mean())


def _soft_restricted_solve(
    ks: torch.Tensor,
    r: torch.Tensor,
    c0s: torch.Tensor,
    c_past_s: torch.Tensor,
    landing: float,
    min_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Least output change on preserved text, on the selected neurons, that still lands the edit.

    Minimises ``||X^T K - R||^2 + ||X^T K_past||^2 + mu tr(X^T C0 X)`` over the selected neurons, with the
    preservation weight ``mu`` as large as possible (bisection in log space) while the edit still realises
    ``landing`` of its residual, but never below ``min_weight`` (then the edit lands less).
    ``tr(X^T C0 X)`` is the expected squared change of this layer's output on preserved text, so ``mu``
    trades the edit against exactly the drift it causes.
    """
    k, c0d, cpd = ks.double(), c0s.double(), c_past_s.double()
    ridge = 1e-6 * float(torch.diagonal(c0d).mean()) * torch.eye(len(k), dtype=torch.float64)
    c0d = (c0d + c0d.T) / 2

    def b(log_mu: float) -> torch.Tensor:
        return cpd + (10.0**log_mu) * c0d + ridge

    lo, hi = -6.0, 8.0
    if _landing(k, b(lo)) < landing:
        hi = lo
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if _landing(k, b(mid)) >= landing:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:
                break
    log_mu = max(lo, math.log10(min_weight)) if min_weight > 0 else lo  # drift cap: land less instead
    x = torch.linalg.solve(k @ k.T + b(log_mu), k @ r.double().T)
    return x.float(), 10.0**log_mu


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
    if config.method == "nmke" and config.masked_solve == "soft":
        assert selected is not None
        s = selected.to(torch.long)
        ks = k[s]
        x, _mu = _soft_restricted_solve(
            ks, r, c0[s][:, s], c_past[s][:, s], config.landing, config.min_preservation
        )
        return s, x, len(s)
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

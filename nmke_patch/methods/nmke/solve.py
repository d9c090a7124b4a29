"""The weight update of one layer (docs/method.md): AlphaEdit's null-space solve with MEMIT's
spreading, NMKE's neuron mask (soft or null-space solve on the selected neurons, or the reference post-mask),
and MEMIT itself."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ...stats import nullspace_basis
from .config import EditConfig


def _project(basis: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``P m`` with ``P = basis basis^T`` (never forming P)."""
    return basis @ (basis.T @ m)


def _landing(keys: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor) -> float:
    """Weighted mean share of each column's residual that ``X = (K K^T + B)^-1 K R^T`` realises.

    ``X^T K = R M`` with ``M = G (I + G)^-1``, ``G = K^T B^-1 K``; column ``c`` realises
    ``(R^T R M)_cc / (R^T R)_cc`` of its residual (``gram = R^T R``), counting what the other columns'
    residuals contribute along it.
    """
    g = keys.T @ torch.linalg.solve(b, keys)
    u = g.shape[0]
    m = torch.linalg.solve(torch.eye(u, dtype=g.dtype) + g, g)
    shares = torch.diagonal(gram @ m) / torch.diagonal(gram).clamp_min(1e-30)
    return float((weights * shares).sum() / weights.sum())


class LayerUpdate(NamedTuple):
    """One layer's solve: neuron indices, their changes ``[len(rows), d]`` (``X = Delta^T``) and the
    dimension of the null space used."""

    rows: torch.Tensor
    x: torch.Tensor
    kept_dim: int


def _soft_restricted_solve(
    ks: torch.Tensor,
    r: torch.Tensor,
    c0s: torch.Tensor,
    c_past_s: torch.Tensor,
    landing: float,
    min_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Least output change on preserved text, on the selected neurons, that still lands the edit.

    Minimises ``||X^T K - R||^2 + ||X^T K_past||^2 + mu tr(X^T C0 X)`` over the selected neurons, with the
    preservation weight ``mu`` as large as possible (bisection in log space) while the edit still realises
    ``landing`` of its residual, but never below ``min_weight`` (then the edit lands less).
    ``tr(X^T C0 X)`` is the expected squared change of this layer's output on preserved text, so ``mu``
    trades the edit against exactly the drift it causes. ``weights`` (per column, default equal) weight
    the columns' shares in the landing.
    """
    k, c0d, cpd = ks.double(), c0s.double(), c_past_s.double()
    rd = r.double()
    gram = rd.T @ rd
    w = torch.ones(k.shape[1], dtype=torch.float64) if weights is None else weights.double()
    ridge = 1e-6 * float(torch.diagonal(c0d).mean()) * torch.eye(len(k), dtype=torch.float64)
    c0d = (c0d + c0d.T) / 2

    def b(log_mu: float) -> torch.Tensor:
        return cpd + (10.0**log_mu) * c0d + ridge

    lo, hi = -6.0, 8.0
    if _landing(k, b(lo), gram, w) < landing:
        hi = lo
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if _landing(k, b(mid), gram, w) >= landing:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:
                break
    log_mu = max(lo, math.log10(min_weight)) if min_weight > 0 else lo  # drift cap: land less instead
    x = torch.linalg.solve(k @ k.T + b(log_mu), k @ rd.T)
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
    weights: torch.Tensor | None = None,
) -> LayerUpdate:
    """Solve for the value-vector changes of one layer.

    Args:
        keys: ``[D, u]`` keys of the requests at this layer (one or two columns per request).
        residuals: ``[d, u]`` the residual each column still needs at this layer (``R``).
        c0: ``[D, D]`` key second moment of preserved text; ``c_past``: ``[D, D]`` past edits' ``K K^T``.
        basis: ``[D, r]`` null-space basis of ``c0`` (AlphaEdit / post-mask), or None.
        selected: neuron indices the sparse method may change (None = all).
        weights: ``[u]`` weight of each column in the soft solve's landing (None = equal).

    Returns:
        The :class:`LayerUpdate`.
    """
    k = keys.float()
    r = residuals.float()
    dim = k.shape[0]
    lam = config.lambda_reg * float(torch.diagonal(c0).mean())
    if config.method == "memit":
        a = config.memit_lambda * c0 + k @ k.T
        x = torch.linalg.solve(a, k @ r.T)
        return LayerUpdate(torch.arange(dim), x, dim)
    if config.method == "nmke" and config.masked_solve == "soft":
        assert selected is not None
        s = selected.to(torch.long)
        ks = k[s]
        x, _mu = _soft_restricted_solve(
            ks, r, c0[s][:, s], c_past[s][:, s], config.landing, config.min_preservation, weights
        )
        return LayerUpdate(s, x, len(s))
    if config.method == "nmke" and config.masked_solve == "exact":
        assert selected is not None
        s = selected.to(torch.long)
        ks = k[s]
        sub_basis = nullspace_basis(c0[s][:, s], config.projector_energy)
        lhs = _project(sub_basis, ks @ ks.T + c_past[s][:, s]) + lam * torch.eye(len(s))
        x = torch.linalg.solve(lhs, _project(sub_basis, ks @ r.T))
        return LayerUpdate(s, x, int(sub_basis.shape[1]))
    assert basis is not None
    lhs = _project(basis, k @ k.T + c_past) + lam * torch.eye(dim)
    x = torch.linalg.solve(lhs, _project(basis, k @ r.T))
    if config.method == "nmke":  # reference post-mask: zero the rows of unselected neurons
        assert selected is not None
        s = selected.to(torch.long)
        return LayerUpdate(s, x[s], int(basis.shape[1]))
    return LayerUpdate(torch.arange(dim), x, int(basis.shape[1]))

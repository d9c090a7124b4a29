"""Entropy-guided mask ratios and the hybrid neuron mask (NMKE; docs/method.md), plus the budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskRatios:
    general: float
    specific: float
    h_general: float
    h_specific: float


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * torch.log(q.clamp_min(1e-30))).sum(dim=-1)


def mask_ratios(scores: torch.Tensor, *, temperature: float, low: float, high: float) -> MaskRatios:
    """Knowledge-general and knowledge-specific mask ratios from the attribution scores ``[P, D]``."""
    d = scores.shape[1]
    log_d = math.log(d)
    q = torch.softmax(temperature * (scores - scores.max(dim=1, keepdim=True).values), dim=1)
    h_ge = float(_entropy(q).mean()) / log_d
    rho_ge = low + (high - low) * min(max(h_ge, 0.0), 1.0) ** 3
    m = scores.max(dim=0).values.clamp_min(0)
    total = float(m.sum())
    if total <= 1e-12:
        h_sp, rho_sp = 0.0, low
    else:
        h_sp = float(_entropy(m / total)) / log_d
        rho_sp = low + (high - low) * h_sp**2
    return MaskRatios(rho_ge, rho_sp, h_ge, h_sp)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry scaled to [0, 1) (0 = smallest)."""
    return torch.argsort(torch.argsort(x)).float() / len(x)


def hybrid_mask(scores: torch.Tensor, ratios: MaskRatios) -> tuple[torch.Tensor, torch.Tensor]:
    """The published hybrid mask ``[D]`` (bool) and a priority ``[D]`` (higher = more strongly selected).

    Knowledge-general score: in how many prompts a neuron's z-scored attribution is positive;
    knowledge-specific score: its best attribution over prompts. A neuron is kept if it is in the top
    ``rho_ge`` of the first or the top ``rho_sp`` of the second.
    """
    z = (scores - scores.mean(dim=1, keepdim=True)) / scores.std(dim=1, keepdim=True).clamp_min(1e-12)
    r_ge = (z > 0).sum(dim=0).float()
    r_sp = scores.max(dim=0).values
    mask = (r_ge >= torch.quantile(r_ge, 1 - ratios.general)) | (
        r_sp >= torch.quantile(r_sp, 1 - ratios.specific)
    )
    return mask, torch.maximum(ranks(r_ge), ranks(r_sp))


def ranked_candidates(mask: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Indices of the masked neurons, highest ``priority`` first."""
    candidates = torch.nonzero(mask).flatten()
    return candidates[torch.argsort(priority[candidates], descending=True, stable=True)]


def apply_budget(ranked: Sequence[torch.Tensor], budget: int) -> torch.Tensor:
    """The union (sorted) of each request's ``budget`` best candidates (:func:`ranked_candidates`)."""
    return torch.unique(torch.cat([r[:budget] for r in ranked]))

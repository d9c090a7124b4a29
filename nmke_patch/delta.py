"""A neuron-masked weight delta: which MLP neurons of one weight change, by how much, and from what.

Values are always held neuron-major (``[k, d_model]``: one row per touched neuron, its value-vector
change), whatever the orientation of the weight. :func:`gather_neurons` / :func:`scatter_neurons` convert
between that form and a weight whose neuron axis is given by the architecture table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # tensors have no truth value: compared by identity
class TensorDelta:
    """The change a patch makes to one weight tensor.

    Attributes:
        name: parameter name in the model, e.g. ``model.layers.4.mlp.down_proj.weight``.
        shape: full shape of the weight.
        neuron_axis: axis of the weight that indexes MLP neurons (from the architecture table).
        indices: int32 ``[k]``, strictly ascending neuron indices.
        delta: float32 ``[k, d]``, new-minus-old value vectors of those neurons.
        original: ``[k, d]`` in the weight's dtype at creation: the values the patch was made on.
        fingerprint: ``sha256:...`` of the whole weight in the state the patch was made on, if known.
    """

    name: str
    shape: tuple[int, int]
    neuron_axis: int
    indices: torch.Tensor
    delta: torch.Tensor
    original: torch.Tensor
    fingerprint: str | None = None

    @property
    def num_neurons(self) -> int:
        return int(self.indices.numel())

    @property
    def value_dim(self) -> int:
        """Length of one neuron's value vector (``d_model``)."""
        return int(self.shape[1 - self.neuron_axis])

    @property
    def nbytes(self) -> int:
        """Bytes this delta occupies on disk (indices, deltas, originals)."""
        return sum(t.numel() * t.element_size() for t in (self.indices, self.delta, self.original))


def gather_neurons(weight: torch.Tensor, neuron_axis: int, indices: torch.Tensor) -> torch.Tensor:
    """Value vectors of ``indices`` as ``[k, d]`` (a copy), in the weight's dtype and device."""
    idx = indices.to(device=weight.device, dtype=torch.long)
    rows = weight.index_select(neuron_axis, idx)
    return rows if neuron_axis == 0 else rows.t().contiguous()


@torch.no_grad()
def scatter_neurons(
    weight: torch.Tensor, neuron_axis: int, indices: torch.Tensor, values: torch.Tensor
) -> None:
    """Write ``[k, d]`` value vectors into ``weight`` at ``indices``, in place."""
    idx = indices.to(device=weight.device, dtype=torch.long)
    vals = values.to(device=weight.device, dtype=weight.dtype)
    weight.index_copy_(neuron_axis, idx, vals if neuron_axis == 0 else vals.t())


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, by one float64 sum: finite float32/16 values cannot overflow it, and a
    NaN or an infinity makes it non-finite. Several times faster on a CPU than ``isfinite().all()``, which
    builds a mask first; checks of every patch tensor on every apply made that most of an apply's time."""
    if values.device.type == "mps":  # no float64 there
        return bool(torch.isfinite(values).all())
    return math.isfinite(float(torch.sum(values, dtype=torch.float64)))


def finite_where(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether ``new`` is finite wherever ``old`` is (a weight already non-finite may stay so)."""
    return all_finite(new) or bool((torch.isfinite(new) | ~torch.isfinite(old)).all())


def add_delta(values: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``values + delta`` computed in float32 and rounded once to ``values``' dtype.

    This is the one definition of "applying" a delta; every code path uses it so that replaying the
    same deltas in the same order gives bit-identical weights.
    """
    return (values.to(torch.float32) + delta.to(device=values.device, dtype=torch.float32)).to(values.dtype)


def make_delta(
    name: str,
    weight: torch.Tensor,
    neuron_axis: int,
    indices: torch.Tensor,
    delta: torch.Tensor,
    fingerprint: str | None = None,
) -> TensorDelta:
    """Build a :class:`TensorDelta` for ``weight`` (its current values become the originals).

    Indices are sorted (rows of ``delta`` move with them) and de-duplicated (duplicate rows are summed).
    """
    idx = indices.to(torch.long).cpu()
    d = delta.detach().to(device="cpu", dtype=torch.float32)
    unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    d = torch.zeros(unique.numel(), d.shape[1], dtype=torch.float32).index_add_(0, inverse, d)
    original = gather_neurons(weight.detach(), neuron_axis, unique).cpu()
    return TensorDelta(
        name=name,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        neuron_axis=neuron_axis,
        indices=unique.to(torch.int32),
        delta=d.contiguous(),
        original=original.contiguous(),
        fingerprint=fingerprint,
    )

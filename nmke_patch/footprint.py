"""The footprint of patches: neurons touched per tensor (united across patches), parameters and bytes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from .delta import TensorDelta
from .patch import Patch
from .sources import PatchSource, resolve_patches


def footprint(items: Iterable[PatchSource | TensorDelta] | PatchSource | TensorDelta) -> dict[str, Any]:
    """Neurons, parameters and bytes that patches (or tensor deltas) change, neurons united per tensor;
    patches may be given as anything :func:`~nmke_patch.sources.resolve_patches` takes, one alone or several.

    Returns:
        ``{"tensors": {name: {"neurons", "of_neurons", "share"}}, "union_neurons", "mean_share",
        "max_share", "parameters_changed", "patch_bytes", "dense_bytes"}``; ``patch_bytes`` is the payload
        (indices, deltas, originals) summed over the patches, ``dense_bytes`` what the same tensors would take
        with every neuron stored.
    """
    union: dict[str, set[int]] = {}
    meta: dict[str, TensorDelta] = {}
    patch_bytes = 0
    if items is None:
        raise TypeError("footprint: None is not a patch (expected paths, Patch objects or TensorDeltas)")
    if isinstance(items, (str, os.PathLike, Patch, TensorDelta)):
        items = [items]
    for item in items:
        if item is None:
            raise TypeError("footprint: None is not a patch (expected paths, Patch objects or TensorDeltas)")
        if isinstance(item, TensorDelta):
            deltas: tuple[TensorDelta, ...] = (item,)
        else:
            deltas = tuple(d for p in resolve_patches(item) for d in p.deltas)
        for d in deltas:
            union.setdefault(d.name, set()).update(d.indices.tolist())
            meta[d.name] = d
            patch_bytes += d.nbytes
    tensors = {}
    params = 0
    dense = 0
    for name in sorted(union, key=_layer_order):
        d = meta[name]
        total = int(d.shape[d.neuron_axis])
        k = len(union[name])
        tensors[name] = {"neurons": k, "of_neurons": total, "share": k / total}
        params += k * d.value_dim
        per_neuron = d.indices.element_size() + d.value_dim * (
            d.delta.element_size() + d.original.element_size()
        )
        dense += total * per_neuron
    shares = [t["share"] for t in tensors.values()]
    return {
        "tensors": tensors,
        "union_neurons": sum(t["neurons"] for t in tensors.values()),
        "mean_share": sum(shares) / len(shares) if shares else 0.0,
        "max_share": max(shares, default=0.0),
        "parameters_changed": params,
        "patch_bytes": patch_bytes,
        "dense_bytes": dense,
    }


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a parameter name (``model.layers.3.mlp.down_proj.weight`` -> 3)."""
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[0]) if numbers else None


def _layer_order(name: str) -> tuple[int, str]:
    index = layer_index(name)
    return (-1 if index is None else index, name)

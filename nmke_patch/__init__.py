"""nmke-patch: sparse, neuron-masked knowledge edits as portable, stackable, exactly revertible patches.

Quick start::

    from nmke_patch import load_model, PatchStack
    model, tokenizer = load_model(patches=["capitals.nmke"])   # embedded default model + one patch
    PatchStack.for_model(model).unload_all()                    # back to the base, bit for bit
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import NmkePatchError
from .patch import Patch, load_patch
from .sources import PatchSource, resolve_patches
from .stack import PatchStack, check_lineage
from .version import __version__

__all__ = ["NmkePatchError", "Patch", "PatchStack", "__version__", "load_model", "load_patch"]


def load_model(
    model: str | os.PathLike[str] | None = None,
    patches: Iterable[PatchSource] | PatchSource | None = (),
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a base model and apply ``patches`` in order.

    Args:
        model: ``None`` for the embedded default model, a local directory or a Hub model id.
        patches: patch directories, edit packs, ``hf://user/pack@rev`` references or :class:`Patch` objects
            (or one of them alone). All are read and validated before the model is loaded.
        device, dtype, device_map: where and how to load the model (see :func:`nmke_patch.models.load_base`).
        force: apply even where a patch's recorded originals differ from the model.

    Returns:
        ``(model, tokenizer)``; ``PatchStack.for_model(model)`` lists, unloads and adds patches.
    """
    from .merged import check_apply

    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"load_model(model=...) takes a model directory, a Hub id or None, not {type(model).__name__}; to"
            " patch a model already loaded, use PatchStack.for_model(model).apply(...)"
        )
    from .models import load_base

    resolved = resolve_patches(patches)
    held = check_apply(model, resolved)  # a model saved by `apply --out`: what it has merged
    if not force:
        check_lineage(resolved, [m.id for m in held])  # a broken chain fails before the model loads
    loaded, tokenizer, _ = load_base(model, device=device, dtype=dtype, device_map=device_map)
    stack = PatchStack.for_model(loaded)
    stack.declare_merged(held)  # children of its patches apply on top of them
    for patch in resolved:
        stack.apply(patch, force=force)
    return loaded, tokenizer

"""Differences between the transformers versions we support, in one place."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_argument(module: nn.Module) -> str:
    """The keyword a model's ``forward`` takes its KV cache under: transformers 5.x renamed
    ``past_key_values`` to ``cache`` (and deprecates the old name)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``output.cache``, or ``output.past_key_values`` before 5.x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)

"""Activation capture and editing with forward hooks (no forked modeling code)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture(
    model: nn.Module, inputs: dict[str, str] | None = None, outputs: dict[str, str] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first input (``inputs``) or output (``outputs``) of submodules during forward passes.

    Args:
        inputs / outputs: ``{key: dotted module path}``; the tensor lands in the yielded dict under ``key``.

    Example:
        >>> with capture(model, inputs={"k": "model.layers.4.mlp.down_proj"}) as seen:
        ...     model(**batch)
        >>> seen["k"].shape  # [batch, tokens, d_ff]
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for key, path in (inputs or {}).items():

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], key: str = key) -> None:
            seen[key] = args[0] if args else next(iter(kwargs.values()))

        handles.append(model.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
    for key, path in (outputs or {}).items():

        def post(_m: nn.Module, _args: Any, out: Any, key: str = key) -> None:
            seen[key] = _first(out)

        handles.append(model.get_submodule(path).register_forward_hook(post))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s (first) output by ``fn(output)`` while the context is open."""

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns ``fn(hidden_states)`` without running the layer."""

    def __init__(self, original: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        for attr in ("attention_type", "layer_type", "layer_idx"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(hidden_states)


@contextmanager
def replay_prefix(layers: nn.ModuleList, upto: int, output: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Skip decoder layers ``0..upto``: layer ``upto`` returns ``output()``, the ones before pass through.

    For repeated forward passes whose inputs up to layer ``upto`` never change (the target-value
    optimisation), this saves computing those layers every step. Decoder layers must return a tensor.
    """
    saved = [layers[i] for i in range(upto + 1)]
    try:
        for i in range(upto):
            layers[i] = _Replay(saved[i], lambda h: h)
        layers[upto] = _Replay(saved[upto], lambda _h: output())
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module


class _StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward pass early."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End forward passes right after ``module`` runs (what was captured up to there is kept)."""

    def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()

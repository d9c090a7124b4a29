"""Run a user's model for editing or evaluation as it is meant to run: eval mode, no gradients kept.

A model loaded by the user may be in train mode (dropout on: GPT-2's is 0.1, so edits and scores change
from run to run) and have ``requires_grad`` set (the z optimisation's backward pass would then fill its
parameters' ``.grad``). :func:`inference_state` switches both off for the duration and restores every
module's mode and every parameter's flag afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from torch import nn

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with ``requires_grad`` off on every parameter, both restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def in_inference_state(fn: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], R]:
    """``fn(model, ...)`` run within :func:`inference_state` of its first argument."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        with inference_state(model):
            return fn(model, *args, **kwargs)

    return wrapper

"""Thread control for small tensor ops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: on a busy 2-core machine, splitting them across OpenMP threads
    makes each op wait for a descheduled thread (measured 15 ms vs 0.1 ms per op, see BENCHMARKS.md)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

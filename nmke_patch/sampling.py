"""Seeded top-k sampling from a model whose random draws do not depend on the device it runs on.

``model.generate(do_sample=True)`` draws from the random generator of the model's device, so the same seed
gives different text on a GPU than on the CPU, and with it different key statistics and a different patch.
Here every draw comes from a CPU generator; the model only supplies the logits. On the CPU the result is
token for token what ``generate(do_sample=True, top_k=k, min_new_tokens=n)`` gives after
``torch.manual_seed(seed)`` (same scores, same filtering, same ``torch.multinomial`` call), so statistics
cached before this module existed stay valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from .compat import cache_argument, returned_cache


def end_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """The ids that end a generation (generation config, else the tokenizer's eos): never sampled here."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    start_ids: Sequence[int],
    new_tokens: int,
    *,
    top_k: int,
    generator: torch.Generator,
    banned: Sequence[int] = (),
    prefix_ids: Sequence[int] = (),
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """One row per start token: the start and ``new_tokens`` tokens sampled after it (top-k, temperature 1).

    Args:
        generator: a CPU generator; its state advances, so consecutive calls continue one random stream.
        banned: token ids never drawn (the end-of-text ids, so every row runs to full length).
        prefix_ids: tokens every row continues from (before its start token), left out of the result.
        on_step: called with the number of tokens drawn per row so far, after every step (for progress).
    """
    device = next(model.parameters()).device
    skip = len(prefix_ids)
    rows = torch.tensor([[*prefix_ids, s] for s in start_ids], dtype=torch.long)
    step = rows
    cache = None
    cache_arg = cache_argument(model)
    for drawn in range(1, new_tokens + 1):
        mask = torch.ones(rows.shape, dtype=torch.long, device=device)  # no padding: every token counts
        out = cast(Any, model)(
            input_ids=step.to(device),
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        cache = returned_cache(out)
        scores = out.logits[:, -1].to(device="cpu", dtype=torch.float32)
        if banned:
            scores[:, list(banned)] = -float("inf")
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
        step = torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator)
        rows = torch.cat([rows, step], dim=1)
        if on_step is not None:
            on_step(drawn)
    return cast(list[list[int]], rows[:, skip:].tolist())

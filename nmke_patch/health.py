"""Model health: fluency of free generations, perplexity on held-out text, and the packaged texts and
unrelated facts these and retention are measured on (definitions: ``docs/evaluation.md``)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import cache_argument, returned_cache
from .errors import InvalidRequestError
from .jsonio import read_user_text
from .lengths import context_length, windows
from .requests import Neighbor, parse_records
from .scoring import backbone, length_buckets, lm_head, pad_rows
from .tokens import MASKED_ID, text_ids

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+|[^\w\s]")


def load_heldout() -> list[str]:
    """The held-out paragraphs shipped with the package (``nmke_patch/_data/heldout.txt``, one per line)."""
    text = resources.files("nmke_patch").joinpath("_data/heldout.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_unrelated(path: str | None = None) -> list[Neighbor]:
    """Unrelated facts (``{"prompt", "target"}`` objects, JSONL or a JSON list): ``path``, or the packaged
    set (empty if absent)."""
    if path is None:
        source = resources.files("nmke_patch").joinpath("_data/unrelated_facts.jsonl")
        if not source.is_file():
            logger.warning("the packaged unrelated-fact set is missing; retention is not measured")
            return []
        text = source.read_text(encoding="utf-8")
    else:
        try:
            text = read_user_text(path, InvalidRequestError)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read the unrelated facts {path}: {exc.strerror or type(exc).__name__}"
            ) from exc
    name = path or "unrelated_facts.jsonl"
    records, lines = parse_records(text, Path(name))  # as facts files: a JSON list or JSONL
    facts = [
        _unrelated_fact(r, f"{name}: line {lines[i]}" if lines is not None else f"{name}: fact {i}")
        for i, r in enumerate(records)
    ]
    if path is not None and not facts:
        raise InvalidRequestError(f"{path} holds no facts (one JSON object per line: prompt, target)")
    return facts


def _unrelated_fact(record: Any, where: str) -> Neighbor:
    """One unrelated fact: a :class:`Neighbor`, or a ``{"prompt", "target"}`` object of non-empty strings."""
    if isinstance(record, Neighbor):
        return record
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), str) and record[k].strip() for k in ("prompt", "target")
    ):
        raise InvalidRequestError(f"{where} needs non-empty 'prompt' and 'target' strings")
    return Neighbor(record["prompt"], record["target"])


def as_unrelated(unrelated: str | os.PathLike[str] | Iterable[Any] | None) -> list[Neighbor]:
    """Unrelated facts as given to ``evaluate``: ``None`` for the packaged set, a JSONL file, or facts as
    :class:`Neighbor` or ``{"prompt", "target"}`` objects."""
    if unrelated is None:
        return load_unrelated()
    if isinstance(unrelated, str | os.PathLike):
        return load_unrelated(os.fspath(unrelated))
    facts = []
    for i, fact in enumerate(unrelated):
        if not isinstance(fact, (Neighbor, dict)):
            raise InvalidRequestError(
                f"unrelated[{i}]: expected Neighbor(prompt, target) or {{'prompt': ..., 'target': ...}}, not"
                f" {type(fact).__name__}"
            )
        facts.append(_unrelated_fact(fact, f"unrelated[{i}]"))
    return facts


def ngram_entropy(
    tokens: Sequence[Any], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Weighted n-gram entropy in bits (ROME's fluency): ``mean_n(w_n * H(n-gram frequencies))``.

    ``tokens`` are any hashable items (words here). A sequence too short for an n-gram contributes 0.
    """
    terms = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def words(text: str) -> list[str]:
    """Word and punctuation tokens (a dependency-free stand-in for ``nltk.word_tokenize``)."""
    return _WORD.findall(text)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch, KV cache; end-of-text does not stop). Within
    the model's context length: a prompt is cut from the left to leave room for the new tokens."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [text_ids(tokenizer, p) for p in prompts]
    limit = context_length(model)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - 1)
        encoded = [e[-(limit - max_new_tokens) :] for e in encoded]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), MASKED_ID, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    cache_arg = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    generated = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(dim=-1)
        generated.append(nxt)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        past = returned_cache(out)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: past},
        )
    tokens = torch.stack(generated, dim=1).cpu()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    paragraphs: Sequence[str],
    *,
    max_tokens: int | None = None,
    max_batch_tokens: int = 2048,
) -> tuple[float, int]:
    """``exp(mean NLL)`` over every predicted token of ``paragraphs`` (each its own sequence, cut into
    windows of the model's context length where longer).

    Whole paragraphs are taken in order until ``max_tokens`` tokens are reached (the last one is cut).

    Returns:
        ``(perplexity, number of predicted tokens)``.
    """
    rows: list[list[int]] = []
    total = 0
    limit = context_length(model)
    for text in paragraphs:
        ids = text_ids(tokenizer, text)
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if len(ids) >= 2:
            rows.extend(w for w in windows(ids, limit) if len(w) >= 2)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not rows:
        return float("nan"), 0
    device = next(model.parameters()).device
    pad = MASKED_ID
    unembed = lm_head(model)
    nll, count = 0.0, 0
    for batch in length_buckets(list(range(len(rows))), lambda r: len(rows[r]), max_batch_tokens):
        padded, mask = pad_rows([rows[r] for r in batch], pad)
        padded, mask = padded.to(device), mask.to(device)
        hidden = backbone(model)(input_ids=padded, attention_mask=mask, use_cache=False).last_hidden_state
        valid = mask[:, 1:].bool()
        h = hidden[:, :-1][valid]
        labels = padded[:, 1:][valid]
        for s in range(0, h.shape[0], 512):  # bound the [positions, vocab] logits
            logits = unembed(h[s : s + 512]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, labels[s : s + 512], reduction="sum"))
        count += int(valid.sum())
    return math.exp(nll / count), count

"""The model's context length, and the check that every text of the facts fits in it.

A model with learned absolute positions (GPT-2) fails with an ``IndexError`` deep inside its embedding on a
longer sequence; a rotary model runs but is outside what it was trained on. So facts are checked once,
before any work, with an error that names the record and field; free text (held-out paragraphs) is cut
into windows instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import InvalidRequestError
from .requests import EditRequest, Neighbor


def context_length(model: Any) -> int | None:
    """Positions the model takes (``n_positions`` or ``max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _scored_texts(request: EditRequest) -> list[tuple[str, str]]:
    """``(field, text)`` for every prompt of ``request`` with the longest answer it is scored with."""
    answers = [request.target_new] + ([request.target_true] if request.target_true else [])
    texts = [("prompt", f"{request.text} {a}") for a in answers]
    texts += [(f"paraphrases[{j}]", f"{p} {a}") for j, p in enumerate(request.paraphrases) for a in answers]
    texts += [(f"neighborhood[{j}]", f"{n.prompt} {n.target}") for j, n in enumerate(request.neighborhood)]
    texts += [
        (f"neighborhood[{j}]", f"{n.prompt} {request.target_new}") for j, n in enumerate(request.neighborhood)
    ]
    return texts


def check_fits(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    limit: int | None,
    *,
    reserve: int = 0,
    what: str = "the context prefixes",
) -> None:
    """Refuse the first record with a prompt that, with its answer and ``reserve`` more tokens (for
    ``what``), would be longer than ``limit`` tokens. No-op when ``limit`` is None."""
    if limit is None:
        return
    room = limit - reserve
    for i, request in enumerate(requests):
        texts = _scored_texts(request)
        lengths = [len(ids) for ids in tokenizer([t for _, t in texts]).input_ids]
        for (field, _), n in zip(texts, lengths, strict=True):
            if n > room:
                kept = f", {reserve} of them kept for {what}" if reserve else ""
                raise InvalidRequestError(
                    f"record {i}: field {field!r} with its answer is {n} tokens; the model takes {limit}{kept}"
                )


def check_facts_fit(facts: Sequence[Neighbor], tokenizer: Any, limit: int | None, where: str) -> None:
    """The same for ``{"prompt", "target"}`` facts (the unrelated-fact set), named by 1-based line order."""
    if limit is None or not facts:
        return
    lengths = [len(ids) for ids in tokenizer([f"{f.prompt} {f.target}" for f in facts]).input_ids]
    for i, n in enumerate(lengths):
        if n > limit:
            raise InvalidRequestError(
                f"{where}: fact {i + 1} is {n} tokens with its answer; the model takes {limit}"
            )


def windows(ids: list[int], limit: int | None) -> list[list[int]]:
    """``ids`` cut into consecutive windows of at most ``limit`` tokens (whole when ``limit`` is None)."""
    if limit is None or len(ids) <= limit:
        return [ids]
    return [ids[s : s + limit] for s in range(0, len(ids), limit)]

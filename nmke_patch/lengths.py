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


class TooLongError(InvalidRequestError):
    """A fact that does not fit the model's context; ``unrelated``: one of the unrelated-fact set, else a
    record of the facts (callers that know the file put its name in front)."""

    def __init__(self, message: str, *, unrelated: bool = False) -> None:
        super().__init__(message)
        self.unrelated = unrelated


def _texts(request: EditRequest, scored: bool) -> list[tuple[str, str, bool]]:
    """``(what, text, with_reserve)`` for the prompts of ``request`` fed with an answer: by ``create``
    (``scored`` False: the edit prompt, with context prefixes before it for the new target) or by
    ``eval`` (every prompt scored, with each answer it is scored with)."""
    answers = [request.target_new] + ([request.target_true] if request.target_true else [])
    if not scored:
        return [("its prompt", f"{request.text} {a}", k == 0) for k, a in enumerate(answers)]
    texts = [("its prompt", f"{request.text} {a}", False) for a in answers]
    texts += [
        (f"its paraphrase {j}", f"{p} {a}", False) for j, p in enumerate(request.paraphrases) for a in answers
    ]
    for j, n in enumerate(request.neighborhood):
        texts += [
            (f"its neighbourhood prompt {j}", f"{n.prompt} {a}", False)
            for a in (n.target, request.target_new)
        ]
    return texts


def check_fits(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    limit: int | None,
    *,
    scored: bool = True,
    reserve: int = 0,
    what: str = "context prefixes",
) -> None:
    """Refuse the first record with a prompt that, fed with its answer (all but the answer's last token)
    and, where ``create`` puts them, ``reserve`` more tokens for ``what``, needs more than ``limit``
    positions (no limit: None), or that the tokenizer turns into fewer than two tokens, one for the prompt
    and one for the answer (a tokenizer that does not know the text). ``scored``: every prompt ``eval``
    scores; else those ``create`` feeds."""
    if limit is not None and reserve >= limit:
        raise InvalidRequestError(
            f"{what} take {reserve} of the model's {limit} positions; make them shorter"
        )
    for i, request in enumerate(requests):
        texts = _texts(request, scored)
        lengths = [len(ids) - 1 for ids in tokenizer([t for _, t, _ in texts]).input_ids]
        for (name, text, with_reserve), n in zip(texts, lengths, strict=True):
            if n < 1:
                raise InvalidRequestError(
                    f"record {i}: the tokenizer turns {name} with its answer, {text!r}, into {n + 1} token(s);"
                    " a prompt and its answer need one each: is it this model's tokenizer?"
                )
            if limit is None:
                continue
            room = limit - reserve if with_reserve else limit
            if n > room:
                kept = f" ({reserve} of them kept for {what})" if with_reserve else ""
                raise TooLongError(
                    f"record {i}: {name}, with its answer, needs {n} positions; the model has {limit}{kept}"
                )


def _fact_lengths(facts: Sequence[Neighbor], tokenizer: Any) -> list[int]:
    return [len(ids) - 1 for ids in tokenizer([f"{f.prompt} {f.target}" for f in facts]).input_ids]


def check_facts_fit(facts: Sequence[Neighbor], tokenizer: Any, limit: int | None, where: str) -> None:
    """The same for ``{"prompt", "target"}`` facts (the unrelated-fact set), named by 1-based line order."""
    if limit is None or not facts:
        return
    for i, n in enumerate(_fact_lengths(facts, tokenizer)):
        if n > limit:
            raise TooLongError(
                f"{where}: fact {i + 1}, with its answer, needs {n} positions; the model has {limit}",
                unrelated=True,
            )


def fitting_facts(facts: Sequence[Neighbor], tokenizer: Any, limit: int | None) -> list[Neighbor]:
    """The facts that, with their answers, fit ``limit`` positions (all when there is no limit)."""
    if limit is None or not facts:
        return list(facts)
    return [f for f, n in zip(facts, _fact_lengths(facts, tokenizer), strict=True) if n <= limit]


def windows(ids: list[int], limit: int | None) -> list[list[int]]:
    """``ids`` cut into consecutive windows of at most ``limit`` tokens (whole when ``limit`` is None)."""
    if limit is None or len(ids) <= limit:
        return [ids]
    return [ids[s : s + limit] for s in range(0, len(ids), limit)]

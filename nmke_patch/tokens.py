"""Token ids of a text as the model reads it in running text: a tokenizer's leading special tokens (BOS)
kept, those it appends (the EOS of ``add_eos_token=True``) dropped, so a target, a prompt's last token or
a sampling start is never an end-of-text token."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

MASKED_ID = 0
"""What padded (masked) positions hold: every vocabulary has id 0, while a tokenizer's pad id may lie
outside the model's embedding (``add_special_tokens({"pad_token": ...})`` without resizing it). Masked
positions never change what the other positions compute."""

PROBE = "a"
"""The text whose encoding shows the special tokens a tokenizer adds around every text."""

_SPECIALS: weakref.WeakKeyDictionary[Any, tuple[list[int], int]] = weakref.WeakKeyDictionary()


def _specials(tokenizer: Any) -> tuple[list[int], int]:
    """``(leading special ids, number of appended special tokens)`` of ``tokenizer``, probed once."""
    with contextlib.suppress(KeyError, TypeError):
        return _SPECIALS[tokenizer]
    enc = tokenizer(PROBE, add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc.get("special_tokens_mask") or [])
    if len(special) != len(ids) or all(special):  # no mask, or a probe of specials only: says nothing
        found: tuple[list[int], int] = ([], 0)
    else:
        lead = next(i for i, s in enumerate(special) if not s)
        tail = next(i for i, s in enumerate(reversed(special)) if not s)
        found = (ids[:lead], tail)
    with contextlib.suppress(TypeError):  # an object without weak references: probed again next time
        _SPECIALS[tokenizer] = found
    return found


def leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer`` puts in front of every text (``[bos_id]`` for Llama 2/3 and
    Mistral, none for GPT-2, Qwen or SmolLM2)."""
    return list(_specials(tokenizer)[0])


def appended_specials(tokenizer: Any) -> int:
    """How many special tokens ``tokenizer`` appends after a text's own tokens (0 for most; 1 with
    ``add_eos_token=True``)."""
    return _specials(tokenizer)[1]


def without_appended(tokenizer: Any, values: list[Any]) -> list[Any]:
    """``values`` (ids, offsets, ...) of one encoding of ``tokenizer`` without the appended specials."""
    n = appended_specials(tokenizer)
    return values[: len(values) - n] if n else values


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids with the tokenizer's leading specials and without those it appends."""
    return without_appended(tokenizer, list(tokenizer(text).input_ids))


def last_text_id(tokenizer: Any, text: str) -> int:
    """The id of ``text``'s last token (not an appended end-of-text token)."""
    return text_ids(tokenizer, text)[-1]

"""Facts that contradict or overlap one another within one facts file.

Two records that edit the same prompt to different answers cannot both hold: ``create`` would write the
second over the first and every metric would count one as failed, so they are refused. A record repeated
word for word does no harm and is warned about. A neighbourhood prompt that is itself edited by the run,
or that names a subject the run edits, no longer measures whether the edits leave other facts alone (an
edit may change it legitimately), so it is warned about too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import InvalidRequestError

if TYPE_CHECKING:  # requests.py calls this module while reading
    from .requests import EditRequest

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+|[^\w\s]")
_SHOWN = 3


def _norm(text: str) -> str:
    """A prompt as compared: case and runs of white space ignored."""
    return " ".join(text.split()).casefold()


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text))


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def check_consistent(requests: Sequence[EditRequest], where: str) -> None:
    """Refuse records that edit one prompt to different answers; warn about repeated records and
    neighbourhood prompts about what the records edit. Indices are 0-based, as in every record error."""
    first: dict[str, int] = {}
    repeated: list[str] = []
    for i, r in enumerate(requests):
        key = _norm(r.text)
        j = first.setdefault(key, i)
        if j == i:
            continue
        ours, theirs = requests[j].target_new.strip(), r.target_new.strip()
        if ours != theirs:
            raise InvalidRequestError(
                f"{where}: records {j} and {i} edit the same prompt, {r.text!r}, to different answers "
                f"({ours!r} and {theirs!r}); one patch can hold only one of them: keep one record"
            )
        repeated.append(f"{i} repeats {j}")
    if repeated:
        logger.warning("%s: record(s) repeated (the repeat edits nothing new): %s", where, _listed(repeated))
    _warn_edited_neighbours(requests, first, where)


def _warn_edited_neighbours(requests: Sequence[EditRequest], edited: dict[str, int], where: str) -> None:
    """Warn about neighbourhood prompts that a record edits, or that name a subject some record edits (as
    whole words, case-sensitive)."""
    subjects: dict[tuple[str, ...], int] = {}
    for i, r in enumerate(requests):
        subjects.setdefault(_words(r.subject), i)
    lengths = sorted({len(s) for s in subjects}, reverse=True)  # longest first: "South Sudan", not "Sudan"
    named: dict[str, int | None] = {}  # per distinct prompt: records share neighbourhood prompts

    def subject_in(prompt: str) -> int | None:
        if prompt not in named:
            words = _words(prompt)
            spans = (words[s : s + m] for m in lengths for s in range(len(words) - m + 1))
            named[prompt] = next((subjects[w] for w in spans if w in subjects), None)
        return named[prompt]

    found: list[str] = []
    for i, r in enumerate(requests):
        for k, n in enumerate(r.neighborhood):
            j = edited.get(_norm(n.prompt))
            if j is not None:
                found.append(f"record {i}'s neighbourhood prompt {k} is record {j}'s edit prompt")
            elif (hit := subject_in(n.prompt)) is not None:
                found.append(
                    f"record {i}'s neighbourhood prompt {k} names record {hit}'s subject {requests[hit].subject!r}"
                )
    if found:
        logger.warning(
            "%s: %d neighbourhood prompt(s) are about facts these records edit, so an edit may change them "
            "legitimately and specificity and agreement count it against the patch: %s",
            where,
            len(found),
            _listed(found),
        )

"""Facts that contradict or overlap one another within one facts file.

Two records that edit the same prompt to different answers cannot both hold: ``create`` would write the
second over the first and efficacy would count one as failed, so ``create`` refuses them (``eval`` warns).
A record repeated word for word does no harm and is warned about. A neighbourhood prompt that is itself
edited by the run, or that names a subject the run edits, no longer measures whether the edits leave other
facts alone (an edit may change it legitimately), so it is warned about too.
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


def _first_edits(requests: Sequence[EditRequest]) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Each edited prompt's first record, and every later record ``i`` of a prompt as ``(first, i)``."""
    first: dict[str, int] = {}
    later: list[tuple[int, int]] = []
    for i, r in enumerate(requests):
        j = first.setdefault(_norm(r.text), i)
        if j != i:
            later.append((j, i))
    return first, later


def _differ(requests: Sequence[EditRequest], j: int, i: int) -> bool:
    return requests[j].target_new.strip() != requests[i].target_new.strip()


def conflicts(requests: Sequence[EditRequest]) -> list[str]:
    """Records that edit a prompt an earlier record edits, to a different answer, described."""
    return [
        f"records {j} and {i} edit {requests[i].text!r} to {requests[j].target_new.strip()!r} and "
        f"{requests[i].target_new.strip()!r}"
        for j, i in _first_edits(requests)[1]
        if _differ(requests, j, i)
    ]


def refuse_conflicts(requests: Sequence[EditRequest], where: str | None = None) -> None:
    """Refuse (``create``) records that edit one prompt to different answers: a patch holds one."""
    found = conflicts(requests)
    if found:
        raise InvalidRequestError(
            f"{where + ': ' if where else ''}{len(found)} pair(s) of records edit one prompt to different "
            f"answers (0-based): {_listed(found)}; one patch holds one answer per prompt: keep one record of each"
        )


def warn_conflicts(requests: Sequence[EditRequest], where: str) -> None:
    """Warn (``eval``) about records that edit one prompt to different answers: one of them must fail."""
    found = conflicts(requests)
    if found:
        logger.warning(
            "%s: %d pair(s) of records edit one prompt to different answers (0-based): %s; no model gives "
            "both, so efficacy counts one of each pair as failed",
            where,
            len(found),
            _listed(found),
        )


def check_consistent(requests: Sequence[EditRequest], where: str) -> None:
    """Warn about repeated records (same prompt, same answer) and neighbourhood prompts about what the
    records edit. Indices are 0-based, as in every record error."""
    first, later = _first_edits(requests)
    repeated = [f"{i} repeats {j}" for j, i in later if not _differ(requests, j, i)]
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
                subject = requests[hit].subject
                found.append(
                    f"record {i}'s neighbourhood prompt {k} names record {hit}'s subject {subject!r}"
                )
    if found:
        logger.warning(
            "%s: %d neighbourhood prompt(s) are about facts these records edit, so an edit may change them "
            "legitimately and specificity and agreement count it against the patch: %s",
            where,
            len(found),
            _listed(found),
        )

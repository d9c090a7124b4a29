"""Edit requests and the readers for our JSON/JSONL records, CounterFact and ZsRE.

A bad record stops reading with :class:`InvalidRequestError` naming the record's index and field, before
any computation starts.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .consistency import check_consistent
from .errors import InvalidRequestError
from .jsonio import load_json_text, read_user_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    """A prompt about another fact whose answer should not change."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    id: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def subject_last(self) -> bool:
        """Whether the prompt ends with its subject (the answer is then predicted at the subject)."""
        return self.prompt.rstrip().endswith("{}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["paraphrases"] = list(self.paraphrases)
        data["neighborhood"] = [asdict(n) for n in self.neighborhood]
        return {k: v for k, v in data.items() if v not in (None, [], ())}


def _str(
    record: dict[str, Any],
    key: str,
    index: int,
    *,
    required: bool = True,
    field: str | None = None,
) -> str | None:
    """``record[key]`` as a non-empty string; errors name ``field`` (the user's name for it), else ``key``."""
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"record {index}: field {field or key!r} must be a non-empty string")
    return value


def _from_native(record: dict[str, Any], index: int, names: dict[str, str] | None = None) -> EditRequest:
    """A native record as a request. ``names``: the field each native field came from in the user's record
    (a CounterFact or ZsRE one), so that errors name what the user wrote."""

    def name(key: str) -> str:
        return (names or {}).get(key, key)

    prompt = _str(record, "prompt", index, field=name("prompt"))
    assert prompt is not None
    if prompt.count("{}") != 1:
        written = record.get("subject")
        written = written.strip() if isinstance(written, str) else ""
        hint = ""
        if "{}" not in prompt and written and written in prompt:
            at = prompt.rfind(written)  # the edit is keyed at the subject's last occurrence
            hint = f"; the subject occurs in it: write it as {prompt[:at] + '{}' + prompt[at + len(written) :]!r}"
        raise InvalidRequestError(
            f"record {index}: field {name('prompt')!r} must contain exactly one '{{}}' where the subject goes"
            f" (got {prompt!r}){hint}"
        )
    subject = _str(record, "subject", index, field=name("subject"))
    assert subject is not None
    filled = prompt.replace("{}", subject.strip())
    if filled.rfind(subject.strip()) != prompt.index("{}"):  # also where it overlaps the text after '{}'
        raise InvalidRequestError(
            f"record {index}: field {name('subject')!r} ({subject.strip()!r}) also occurs after '{{}}' in the "
            "prompt; the edit is keyed at the subject's last occurrence, so put '{}' there or rephrase"
        )
    target_new = _str(record, "target_new", index, field=name("target_new"))
    target_true = _str(record, "target_true", index, required=False, field=name("target_true"))
    paraphrases = record.get("paraphrases", [])
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise InvalidRequestError(
            f"record {index}: field {name('paraphrases')!r} must be a list of non-empty strings"
        )
    templated = [j for j, p in enumerate(paraphrases) if "{}" in p]
    if templated:
        raise InvalidRequestError(
            f"record {index}: field {name('paraphrases')!r}[{templated[0]}] contains '{{}}'; paraphrases are "
            "whole prompts with the subject written in"
        )
    neighborhood = []
    raw_neighbors = record.get("neighborhood", [])
    if not isinstance(raw_neighbors, list):
        raise InvalidRequestError(f"record {index}: field {name('neighborhood')!r} must be a list")
    for j, n in enumerate(raw_neighbors):
        if not isinstance(n, dict) or not all(
            isinstance(n.get(k), str) and n[k].strip() for k in ("prompt", "target")
        ):
            raise InvalidRequestError(
                f"record {index}: field 'neighborhood[{j}]' must be an object with 'prompt' and 'target' strings"
            )
        neighborhood.append(Neighbor(n["prompt"].rstrip(), n["target"].strip()))
    rid = record.get("id", record.get("case_id"))
    return EditRequest(  # prompts end right before the answer, which is scored with a leading space
        prompt=prompt.rstrip(),
        subject=subject.strip(),
        target_new=target_new.strip(),  # type: ignore[union-attr]
        target_true=target_true.strip() if target_true else None,
        paraphrases=tuple(p.rstrip() for p in paraphrases),
        neighborhood=tuple(neighborhood),
        id=None if rid is None else str(rid),
    )


def _from_counterfact(record: dict[str, Any], index: int) -> EditRequest:
    rw = record["requested_rewrite"]
    if not isinstance(rw, dict):
        raise InvalidRequestError(f"record {index}: field 'requested_rewrite' must be an object")

    def target(key: str) -> str | None:
        """``{"str": ...}`` as CounterFact writes it, or a plain string as some of its variants do."""
        value = rw.get(key)
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("str"), str):
            raise InvalidRequestError(
                f"record {index}: field 'requested_rewrite.{key}' must be an object with a 'str' string "
                "(or a string)"
            )
        return value["str"]

    def name(key: str) -> str:
        return f"requested_rewrite.{key}" + (".str" if isinstance(rw.get(key), dict) else "")

    true = target("target_true")
    prompts = record.get("neighborhood_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InvalidRequestError(
            f"record {index}: field 'neighborhood_prompts' must be a list of non-empty strings (each scored "
            "against requested_rewrite.target_true)"
        )
    native = {
        "prompt": rw.get("prompt"),
        "subject": rw.get("subject"),
        "target_new": target("target_new"),
        "target_true": true,
        "paraphrases": record.get("paraphrase_prompts", []),
        "neighborhood": [{"prompt": p, "target": true} for p in prompts] if true else [],
        "id": record.get("case_id"),
    }
    names = {
        "prompt": "requested_rewrite.prompt",
        "subject": "requested_rewrite.subject",
        "target_new": name("target_new"),
        "target_true": name("target_true"),
        "paraphrases": "paraphrase_prompts",
        "neighborhood": "neighborhood_prompts",
    }
    return _from_native(native, index, names)


def _zsre_strings(record: dict[str, Any], key: str, index: int) -> list[str]:
    """A ZsRE field that holds one string or a list of them (``answers``, ``rephrase``); absent: ``[]``."""
    value = record.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise InvalidRequestError(
            f"record {index}: ZsRE field {key!r} must be a non-empty string or a list of non-empty strings"
        )
    return items


def _from_zsre(record: dict[str, Any], index: int) -> EditRequest:
    subject = record.get("subject")
    src = record.get("src")
    if not isinstance(src, str) or not isinstance(subject, str) or not subject.strip() or subject not in src:
        raise InvalidRequestError(
            f"record {index}: ZsRE field 'subject' must be a non-empty string that occurs in 'src'"
        )
    alt = record.get("alt")
    if not isinstance(alt, str) or not alt.strip():
        raise InvalidRequestError(
            f"record {index}: ZsRE field 'alt' (the new answer) must be a non-empty string"
        )
    answers = _zsre_strings(record, "answers", index)
    neighborhood = []
    if record.get("loc") is not None or record.get("loc_ans") is not None:
        loc, loc_ans = record.get("loc"), _zsre_strings(record, "loc_ans", index)
        if not isinstance(loc, str) or not loc.removeprefix("nq question: ").strip() or not loc_ans:
            raise InvalidRequestError(
                f"record {index}: ZsRE fields 'loc' (a question) and 'loc_ans' (its answer; of a list, the "
                "first is scored) come together"
            )
        neighborhood.append({"prompt": loc.removeprefix("nq question: "), "target": loc_ans[0]})
    native = {
        "prompt": "{}".join(src.rsplit(subject, 1)),  # the last occurrence, where encode() keys the subject
        "subject": subject,
        "target_new": alt,
        "target_true": answers[0] if answers else None,
        "paraphrases": _zsre_strings(record, "rephrase", index),
        "neighborhood": neighborhood,
        "id": record.get("case_id"),
    }
    names = {"prompt": "src", "target_new": "alt", "target_true": "answers", "paraphrases": "rephrase"}
    return _from_native(native, index, names)


NATIVE_FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood",
    "id",
    "case_id",
)


def _warn_unknown_fields(records: Sequence[Any], where: str) -> None:
    """A warning for each field of our own record format that looks like a misspelt one of ours (a typo
    such as ``target_ture`` would otherwise drop a metric silently). Other extra fields are metadata
    (``relation``, ``subject_id``, ``uid``, ...) and pass quietly; so does a field close to one the record
    already has. CounterFact and ZsRE records are not checked."""
    unknown: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        if isinstance(r, dict) and "requested_rewrite" not in r and not ("src" in r and "prompt" not in r):
            for key in r:
                if key in NATIVE_FIELDS:
                    continue
                same = [f for f in _SUGGESTED_FIELDS if f == str(key).lower()]  # "Target_New"
                missing = [f for f in _SUGGESTED_FIELDS if f not in r]
                close = same or difflib.get_close_matches(str(key).lower(), missing, n=1, cutoff=0.75)
                if close:
                    unknown.setdefault((str(key), close[0]), []).append(i)
    for (key, meant), indices in unknown.items():
        shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
        logger.warning(
            "%s: ignoring unknown field %r in record(s) %s; did you mean %r?%s",
            where,
            key,
            shown,
            meant,
            " (field names are lower case)" if key.lower() == meant else "",
        )


_SUGGESTED_FIELDS = tuple(f for f in NATIVE_FIELDS if f not in ("id", "case_id"))
"""The fields a misspelling of would lose something (an error or a metric); ``id``/``case_id`` are labels."""


def parse_request(record: Any, index: int) -> EditRequest:
    """One record (ours, CounterFact or ZsRE) as an :class:`EditRequest`."""
    if not isinstance(record, dict):
        raise InvalidRequestError(f"record {index}: must be a JSON object")
    if "requested_rewrite" in record:
        return _from_counterfact(record, index)
    if "src" in record and "prompt" not in record:
        return _from_zsre(record, index)
    return _from_native(record, index)


def parse_records(text: str, file: Path) -> tuple[list[Any], list[int] | None]:
    """The records of a facts file (or of unrelated facts): a JSON list, JSONL (one record per line) or one
    JSON object; and, for JSONL, the line of each record."""
    if text.lstrip().startswith("["):
        records = load_json_text(text, str(file), InvalidRequestError)
        assert isinstance(records, list)
        return records, None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return [], None
    try:
        first = load_json_text(lines[0][1], f"{file}: line {lines[0][0]}", InvalidRequestError)
    except InvalidRequestError:
        if len(lines) == 1 or not lines[0][1].lstrip().startswith("{"):
            raise
        # not JSONL: one (pretty-printed) object
        try:
            return [load_json_text(text, str(file), InvalidRequestError)], None
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                f"{exc} (expected a JSON list of records, JSONL with one record per line, or one JSON object)"
            ) from exc
    rest = [load_json_text(line, f"{file}: line {n}", InvalidRequestError) for n, line in lines[1:]]
    return [first, *rest], [n for n, _ in lines]


def read_requests(path: str | os.PathLike[str], limit: int | None = None) -> list[EditRequest]:
    """Read a facts file (a JSON list, JSONL, or one JSON object; UTF-8, a byte-order mark is allowed);
    every record is validated before returning. ``limit``: only the first ``limit`` records are taken
    (validated and warned about); the file must still be valid JSON throughout."""
    if limit is not None and limit < 1:
        raise InvalidRequestError(f"limit must be at least 1, not {limit}")
    file = Path(path)
    if not file.exists():
        hint = " (a prompt? give one record as a dict, or a list of them)" if "{}" in str(path) else ""
        raise InvalidRequestError(f"{file}: no such facts file{hint}")
    text = read_user_text(file, InvalidRequestError)
    records, lines = parse_records(text, file)
    if not records:
        raise InvalidRequestError(f"{file}: no records")
    records = records[:limit]
    _warn_unknown_fields(records, str(file))
    parsed = []
    for i, r in enumerate(records):
        try:
            parsed.append(parse_request(r, i))
        except InvalidRequestError as exc:  # name the file (eval reads several) and, in JSONL, the line
            where = f" (line {lines[i]})" if lines is not None else ""
            raise InvalidRequestError(f"{file}: {exc}{where}") from None
    _warn_no_change(parsed, str(file))
    check_consistent(parsed, str(file))
    return parsed


def _warn_no_change(
    requests: Sequence[EditRequest], where: str, indices: Sequence[int] | None = None
) -> None:
    """A warning for records whose new target is their true one: nothing to edit, and P(new) > P(true)
    (efficacy, generalization) can never hold for them. ``indices``: the records' own (0-based) indices."""
    numbers = list(range(len(requests))) if indices is None else list(indices)
    same = [
        numbers[i]
        for i, r in enumerate(requests)
        if r.target_true is not None and r.target_new.strip() == r.target_true.strip()
    ]
    if same:
        shown = ", ".join(map(str, same[:5])) + (", ..." if len(same) > 5 else "")
        logger.warning(
            "%s: record(s) %s (0-based) ask for the answer they already name as true (target_new == target_true): "
            "nothing to edit, and efficacy counts them as failed",
            where,
            shown,
        )


RequestsLike = str | os.PathLike[str] | EditRequest | dict[str, Any] | Sequence[EditRequest | dict[str, Any]]
"""What the Python entry points take as facts: a facts file, one request or record, or a list of them."""


def as_requests(requests: RequestsLike) -> list[EditRequest]:
    """``requests`` as a validated list of :class:`EditRequest`: a path is read with :func:`read_requests`,
    records (dicts) are parsed as a facts file's would be (ours, CounterFact or ZsRE)."""
    if isinstance(requests, (str, os.PathLike)):
        return read_requests(requests)
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    if not isinstance(requests, Sequence):
        raise InvalidRequestError(
            f"requests must be a facts file path, a record or a list of records, not {type(requests).__name__}"
        )
    _warn_unknown_fields(requests, "requests")
    # an EditRequest built in Python has not been checked: it goes through the same reader as a record
    parsed = [
        parse_request(r.to_json() if isinstance(r, EditRequest) else r, i) for i, r in enumerate(requests)
    ]
    records = [i for i, r in enumerate(requests) if not isinstance(r, EditRequest)]  # warned about once
    _warn_no_change([parsed[i] for i in records], "requests", records)
    if records:  # requests already parsed were checked together when read
        check_consistent(parsed, "requests")
    return parsed

"""One strict reader for JSON that comes from strangers: manifests, ``pack.json`` and facts files.

Python's ``json`` accepts ``NaN`` and ``Infinity``, raises ``RecursionError`` on deep nesting and
``ValueError`` on integers of more than 4300 digits. :func:`load_json_text` refuses all of these with the
caller's error type and one line naming the file, so no traceback escapes and nothing downstream ever
sees a non-finite number, an absurd integer or a structure too deep to walk.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import InvalidPatchError, NmkePatchError

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted."""
MAX_INT_DIGITS = 64
"""Longest integer literal accepted (digits, sign excluded)."""


class _Refused(ValueError):
    """A literal the strict reader does not accept (raised from the parse hooks)."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:20]} is out of range for a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, refused if a key repeats: readers disagree on which value wins, so a file that says two
    things (by mistake, or to show a reviewer one and a loader the other) is not read at all."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"the key {key[:50]!r} appears twice in one object")
        obj[key] = value
    return obj


def _problem(value: Any) -> str | None:
    """What is wrong with a parsed value, walked iteratively (no recursion): nesting deeper than
    :data:`MAX_DEPTH`, or a string holding a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 text,
    terminal or tokenizer can take."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string with a lone surrogate escape such as \\ud800"
            continue
        children = (
            [*item.keys(), *item.values()]
            if isinstance(item, dict)
            else item
            if isinstance(item, list)
            else None
        )
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def load_json_text(text: str, what: str, error: type[NmkePatchError] = InvalidPatchError) -> Any:
    """Parse ``text`` as strict JSON, or raise ``error("{what} is not valid JSON (reason)")``.

    Strict: no ``NaN``/``Infinity`` (nor floats that overflow to it), integers of at most
    :data:`MAX_INT_DIGITS` digits, nesting at most :data:`MAX_DEPTH` levels, no lone surrogates, no key
    twice in one object.
    """
    try:
        value = json.loads(
            text,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from exc
    except _Refused as exc:
        raise error(f"{what} is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{what} is not valid JSON (nested more than {MAX_DEPTH} levels deep)") from exc
    except ValueError as exc:  # e.g. a float literal Python cannot convert
        raise error(f"{what} is not valid JSON ({exc})") from exc
    problem = _problem(value)
    if problem:
        raise error(f"{what} is not valid JSON ({problem})")
    return value


MAX_TEXT_BYTES = 1 << 30
"""Largest text file read (facts, held-out text, unrelated facts, a stats corpus): 1 GiB."""


def read_user_text(path: str | os.PathLike[str], error: type[NmkePatchError] = InvalidPatchError) -> str:
    """A user's text file (facts, held-out text, a stats corpus) as UTF-8, a leading byte-order mark
    dropped; ``error("{path}: ...")`` if it is a device, larger than :data:`MAX_TEXT_BYTES` (a pipe is read
    that far, no further), not UTF-8 or holds NUL characters. Other OS errors pass through."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except OSError:
        mode = 0  # open() below names the problem
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise error(f"{path}: a device, not a text file")
    with open(file, "rb") as fh:
        data = fh.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise error(f"{path}: larger than {MAX_TEXT_BYTES:,} bytes; split it or give less text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after each ASCII letter
        raise error(
            f"{path}: not UTF-8 text (it holds NUL characters: UTF-16 without a byte-order mark, or binary?)"
        )
    return text


def read_json_file(
    file: Path, where: str, max_bytes: int, error: type[NmkePatchError] = InvalidPatchError
) -> Any:
    """A JSON file from a stranger (a manifest, ``pack.json``): at most ``max_bytes``, UTF-8, read by
    :func:`load_json_text`; ``error("{where}: {file name} ...")`` otherwise."""
    if file.stat().st_size > max_bytes:
        raise error(f"{where}: {file.name} is larger than {max_bytes} bytes")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: {file.name} is not valid JSON ({exc})") from exc
    return load_json_text(text, f"{where}: {file.name}", error)

"""The record a saved merged model keeps of the patches merged into it (``nmke_patches.json``).

``apply --out`` writes it, ``revert --out`` rewrites it with what is left. It lets both commands refuse,
before loading anything, to merge a patch twice or to revert patches other than the last ones merged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, PatchMismatchError
from .jsonio import load_json_text
from .patch import Patch

RECORD_FILE = "nmke_patches.json"
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class MergedPatch:
    """One patch merged into a saved model, oldest first in a record."""

    name: str
    id: str

    @classmethod
    def of(cls, patch: Patch) -> MergedPatch:
        return cls(patch.name, patch.id)


def read_record(model_dir: str | os.PathLike[str] | None) -> list[MergedPatch] | None:
    """The patches ``model_dir`` says are merged into it, oldest first; ``None`` where it keeps no record
    (a Hub id, a plain base model, the default model). A record that is not one is an error, not ignored."""
    if model_dir is None:
        return None
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ModelLoadError(
            f"{path} is larger than {MAX_RECORD_BYTES} bytes; not a record of merged patches"
        )
    data = load_json_text(path.read_text(encoding="utf-8", errors="replace"), str(path), ModelLoadError)
    entries = data.get("applied") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("id"), str)
        for e in entries
    ):
        raise ModelLoadError(
            f'{path} is not a record of merged patches (needs {{"applied": [{{"name": ..., "id": ...}}]}}); '
            "fix or remove it"
        )
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids):
        twice = sorted({e["name"] for e in entries if ids.count(e["id"]) > 1})
        raise ModelLoadError(
            f"{path} lists {', '.join(twice)} more than once; a patch is merged at most once: fix or remove it"
        )
    return [MergedPatch(e["name"], e["id"]) for e in entries]


def write_record(out_dir: Path, merged: list[MergedPatch]) -> None:
    """Write ``out_dir``'s record: ``merged``, oldest first."""
    payload = {"applied": [{"name": m.name, "id": m.id} for m in merged]}
    (out_dir / RECORD_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def names(merged: list[MergedPatch]) -> str:
    return ", ".join(m.name for m in merged) if merged else "no patches"


def check_apply(model_dir: str | os.PathLike[str] | None, patches: list[Patch]) -> list[MergedPatch]:
    """What ``model_dir`` holds already (empty without a record); refuses a patch it holds already."""
    held = read_record(model_dir) or []
    ids = {m.id for m in held}
    twice = [p.name for p in patches if p.id in ids]
    if twice:
        raise PatchMismatchError(
            f"{model_dir} already has {', '.join(twice)} merged ({RECORD_FILE}: {names(held)}); apply to the "
            "base model, or revert it first"
        )
    return held


def check_revert(model_dir: str | Path, patches: list[Patch]) -> list[MergedPatch] | None:
    """What stays merged once ``patches`` are reverted from ``model_dir``: ``None`` when it keeps no record.
    Refuses patches that are not the last ones its record lists, in that order."""
    held = read_record(model_dir)
    if held is None:
        return None
    ids = [p.id for p in patches]
    if len(ids) > len(held) or [m.id for m in held[len(held) - len(ids) :]] != ids:
        last = held[-1].name if held else None
        hint = (
            f"give the last ones merged, in the order they were applied (e.g. {last}, or all of them: "
            f"{names(held)})"
            if last
            else "there is nothing to revert"
        )
        raise PatchMismatchError(f"{model_dir} has {names(held)} merged ({RECORD_FILE}); {hint}")
    return held[: len(held) - len(ids)]

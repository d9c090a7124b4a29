"""Resolve what users pass as a patch: a directory, a pack directory, an ``hf://`` reference, or a Patch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidPatchError
from .patch import MANIFEST_FILE, Patch, load_patch

PACK_FILE = "pack.json"
HF_PREFIX = "hf://"

PatchSource = str | os.PathLike[str] | Patch


def pack_patch_dirs(pack_dir: Path) -> list[Path]:
    """Patch directories of an edit pack, in the order ``pack.json`` lists them (paths are validated)."""
    try:
        data = json.loads((pack_dir / PACK_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidPatchError(f"{pack_dir}: {PACK_FILE} is unreadable ({exc})") from exc
    entries = data.get("patches") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidPatchError(f"{pack_dir}: {PACK_FILE} must list at least one patch under 'patches'")
    root = pack_dir.resolve()
    dirs = []
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(rel, str):
            raise InvalidPatchError(f"{pack_dir}: each entry of {PACK_FILE} must name a patch path")
        path = (pack_dir / rel).resolve()
        if root not in path.parents:
            raise InvalidPatchError(f"{pack_dir}: {PACK_FILE} entry {rel!r} points outside the pack")
        dirs.append(path)
    return dirs


def resolve_patches(sources: Iterable[PatchSource]) -> list[Patch]:
    """Load and validate every patch named by ``sources``, in order (packs expand to their patches)."""
    patches: list[Patch] = []
    for source in sources:
        if isinstance(source, Patch):
            patches.append(source)
            continue
        text = os.fspath(source)
        if text.startswith(HF_PREFIX):
            from .hub import pull_pack

            path = pull_pack(text)
        else:
            path = Path(text)
        if (path / PACK_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
            patches.extend(load_patch(p) for p in pack_patch_dirs(path))
        else:
            patches.append(load_patch(path))
    return patches

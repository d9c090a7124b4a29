"""Resolve what users pass as a patch: a directory, a pack directory, an ``hf://`` reference, or a Patch."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .patch import MANIFEST_FILE, Patch, load_patch

PACK_FILE = "pack.json"
HF_PREFIX = "hf://"

PatchSource = str | os.PathLike[str] | Patch


def resolve_patches(sources: Iterable[PatchSource] | PatchSource) -> list[Patch]:
    """Load and validate every patch named by ``sources``, in order (packs expand to their patches, each
    checked against the id ``pack.json`` gives). One source alone (a path, a reference or a patch) is
    taken as a list of one, not as the characters of a path."""
    if isinstance(sources, (str, os.PathLike, Patch)):
        sources = [sources]
    patches: list[Patch] = []
    for source in sources:
        if isinstance(source, Patch):
            patches.append(source)
            continue
        text = os.fspath(source)
        if text.startswith(HF_PREFIX):
            from .hub import pull_verified

            patches.extend(pull_verified(text)[1])
            continue
        path = Path(text)
        if (path / PACK_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
            from .hub import verify_pack  # a local pack is as untrusted as a pulled one

            patches.extend(verify_pack(path))
        else:
            patches.append(load_patch(path))
    return patches

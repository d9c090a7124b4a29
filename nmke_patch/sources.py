"""Resolve what users pass as a patch: a directory, a pack directory, an ``hf://`` reference, or a Patch."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidPatchError, InvalidRequestError, NmkePatchError
from .merged import RECORD_FILE, names, read_record
from .patch import MANIFEST_FILE, Patch, load_patch

PACK_FILE = "pack.json"
HF_PREFIX = "hf://"

PatchSource = str | os.PathLike[str] | Patch


def resolve_patches(sources: Iterable[PatchSource] | PatchSource | None) -> list[Patch]:
    """Load and validate every patch named by ``sources``, in order (packs expand to their patches, each
    checked against the id ``pack.json`` gives). One source alone (a path, a reference or a patch) is
    taken as a list of one, not as the characters of a path."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, Patch)):
        sources = [sources]
    if isinstance(sources, (dict, set, frozenset)):
        raise TypeError(f"patches are applied in order: give a list, not a {type(sources).__name__}")
    if isinstance(sources, (bytes, bytearray)) or not isinstance(sources, Iterable):
        raise TypeError(
            f"patches: expected paths, hf:// references or Patch objects, not {type(sources).__name__}"
        )
    patches: list[Patch] = []
    for source in sources:
        if isinstance(source, Patch):
            patches.append(source)
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"patches: expected paths, hf:// references or Patch objects, not {type(source).__name__}"
            )
        if not os.fspath(source):
            raise InvalidRequestError("patches: an empty path (it would mean the current folder)")
        text = os.fspath(source)
        if text.startswith(HF_PREFIX):
            from .hub import pull_verified

            patches.extend(pull_verified(text)[1])
            continue
        path = Path(text)
        if is_pack(path):
            from .pack import cache_repo_root, verify_pack  # a local pack is as untrusted as a pulled one

            # the folder `pull` prints is a cache snapshot: its files are links into the repository's blobs/
            patches.extend(verify_pack(path, trusted_root=cache_repo_root(path)))
        elif (path / RECORD_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
            try:
                held = f"{names(read_record(path) or [])} merged into it"
            except NmkePatchError:  # an unreadable record: the refusal stands without the list
                held = f"{RECORD_FILE} names the patches merged into it"
            raise InvalidPatchError(
                f"{path} is a merged model ({held}), not a patch or a pack: give it as --model, and the patches "
                "themselves here"
            )
        else:
            patches.append(load_patch(path))
    return patches


def is_pack(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names an edit pack: an ``hf://`` reference, or a folder with ``pack.json`` and no
    patch manifest (what :func:`resolve_patches` expands into several patches)."""
    text = os.fspath(source)
    path = Path(text)
    return text.startswith(HF_PREFIX) or (
        (path / PACK_FILE).is_file() and not (path / MANIFEST_FILE).is_file()
    )


def resolve_one(source: PatchSource) -> Patch:
    """The one patch ``source`` names (a :class:`Patch`, a patch directory, or a pack of one patch)."""
    if isinstance(source, Patch):
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"expected one patch (a Patch or a patch directory), not {type(source).__name__}; apply several one "
            "by one, in order, or pass them all to load_model(patches=...)"
        )
    patches = resolve_patches(source)
    if len(patches) != 1:
        raise InvalidRequestError(
            f"{os.fspath(source)} holds {len(patches)} patches where one is expected; apply them one by one, "
            "in order, or pass them all to load_model(patches=...)"
        )
    return patches[0]

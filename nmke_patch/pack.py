"""Edit packs as folders: build one from patches (with its model card) and verify one as untrusted input.

A pack is laid out as::

    pack.json                  {"format": "nmke-pack", "format_version": 1, "patches": [{path, name, id}, ...]}
    README.md                  model card (base model, facts edited, measured metrics)
    patches/NAME.nmke/         one patch directory per patch, in application order
    peft/                      optional LoRA adapter of the whole pack (``push --with-peft``)

:func:`verify_pack` checks ``pack.json``, every path it lists (inside the pack, no ``..``, no absolute
paths, no links leading out) and loads every patch with :func:`nmke_patch.patch.load_patch` (schema and
sha256). :mod:`nmke_patch.hub` moves packs to and from the Hub. See ``docs/hub.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .card import filled_prompt, fmt_probability, p_new_with_patch, patch_card
from .errors import InvalidPatchError, PatchMismatchError
from .hub_refs import LIBRARY_NAME, looks_like_hub_id
from .jsonio import read_json_file
from .patch import (
    CARD_FILE,
    DELTAS_FILE,
    MANIFEST_FILE,
    MAX_NAME_CHARS,
    PATCH_SUFFIX,
    STATE_FILE,
    Patch,
    base_model_differences,
    load_patch,
    read_manifest,
)
from .paths import move_into_place, new_folder_has_content, staging_dir
from .sources import PACK_FILE, PatchSource, resolve_patches
from .stack import check_lineage

logger = logging.getLogger(__name__)

PACK_FORMAT = "nmke-pack"
PACK_FORMAT_VERSION = 1
PATCHES_DIR = "patches"
PEFT_DIR = "peft"
TAGS = ["knowledge-editing", "model-patching", "nmke-patch"]
MAX_PACK_JSON_BYTES = 4 * 1024 * 1024
_ID_RE = re.compile(r"[0-9a-f]{64}")


# -- building ----------------------------------------------------------------------------------------


def _dir_name(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64] or "patch"
    candidate, n = stem, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate.lower())
    return candidate + PATCH_SUFFIX


def _write_patch(patch: Patch, target: Path) -> Patch:
    """Copy a saved patch's checked files verbatim (its id is the hash of those bytes), else save it.

    Only what :func:`load_patch` validates is copied (the manifest, the deltas and the state the manifest
    declares, each read through any link, as a pulled pack's files are links into the Hub cache) and then
    checked again; the card is written anew from the manifest. A stranger's patch folder cannot carry other
    files into a pack.
    """
    if patch.path is None:
        return patch.save(target)
    root = Path(patch.path)
    files = [MANIFEST_FILE, DELTAS_FILE] + ([STATE_FILE] if "state_sha256" in read_manifest(root) else [])
    target.mkdir(parents=True)
    for fname in files:
        shutil.copyfile(root / fname, target / fname)
    copied = load_patch(target)
    if copied.id != patch.id:
        raise InvalidPatchError(f"{patch.path}: changed on disk while building the pack")
    (target / CARD_FILE).write_text(patch_card(copied), encoding="utf-8")
    return copied


def _base_names(patches: Sequence[Patch]) -> list[str]:
    names: list[str] = []
    for p in patches:
        name = str(p.manifest.base_model.get("name_or_path") or "?")
        if name not in names:
            names.append(name)
    return names


def _cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def pack_card(patches: Sequence[Patch], *, repo_id: str | None = None, with_peft: bool = False) -> str:
    """The model card (``README.md``) of a pack: Hub metadata, usage, patches and the facts edited."""
    from huggingface_hub import ModelCard, ModelCardData

    bases = _base_names(patches)
    hub_bases = [b for b in bases if looks_like_hub_id(b)]
    declared = hub_bases[0] if len(hub_bases) == 1 == len(bases) else (hub_bases or None)
    card_data = ModelCardData(base_model=declared, library_name=LIBRARY_NAME, tags=list(TAGS))
    ref = f"hf://{repo_id}" if repo_id else "hf://USER/PACK"
    base_text = ", ".join(f"`{_cell(b)}`" for b in bases)
    model_arg = f'"{bases[0]}"' if len(hub_bases) == 1 == len(bases) else "BASE_MODEL"
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else 'nmke-patch edit pack'}",
        "",
        f"An edit pack of {len(patches)} [nmke-patch](https://pypi.org/project/nmke-patch/) knowledge-editing"
        f" patch(es) for {base_text}. Each patch is a sparse, neuron-masked weight delta: apply the patches in"
        " order, unload any of them, or revert to the base weights bit for bit.",
        "",
    ]
    if not declared or len(hub_bases) != len(bases):
        lines += [
            f"The base model ({base_text}) is not a Hugging Face Hub model id, so no `base_model` is declared"
            " in this card's metadata. The patches fit only the exact weights they were made on (every edited"
            " tensor is fingerprinted in the patch manifests).",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```bash",
        f"nmke-patch apply {ref} --out merged-model/"
        + ("" if model_arg == "BASE_MODEL" else f" --model {bases[0]}"),
        "```",
        "",
        "```python",
        "from nmke_patch import load_model",
        "",
        f'model, tokenizer = load_model({model_arg}, patches=["{ref}"])',
        "```",
        "",
        "Pulled packs are verified before anything touches a model: `pack.json` and every path it lists,"
        " and each patch's manifest and sha256.",
        "",
    ]
    if with_peft:
        lines += [
            f"`{PEFT_DIR}/` holds the whole pack as one LoRA adapter for PEFT: "
            f'`PeftModel.from_pretrained(model, "{repo_id or "USER/PACK"}", subfolder="{PEFT_DIR}")`.',
            "",
        ]
    lines += [
        "## Patches (applied in this order)",
        "",
        "| # | patch | id | method | tensors | neurons | parents |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(patches):
        parents = ", ".join(_cell(x.name) for x in p.manifest.parents) or "none"
        method = _cell(p.manifest.method.get("name", "?"))
        lines.append(
            f"| {i} | {_cell(p.name)} | `{p.id[:12]}` | {method} | {len(p.deltas)} | {p.num_neurons} | {parents} |"
        )
    lines += [
        "",
        "## Facts edited",
        "",
        "| patch | # | prompt | new target | P(new) before | P(new) with the patch |",
        "|---|---|---|---|---|---|",
    ]
    for p in patches:
        metrics: dict[int, dict[str, Any]] = {}
        for i, m in enumerate(p.manifest.metrics):
            if isinstance(m, dict):
                index = m.get("index", i)
                metrics[int(index) if isinstance(index, int) else i] = m
        for i, r in enumerate(p.manifest.requests):
            r = r if isinstance(r, dict) else {}
            prompt = filled_prompt(r)
            mx = metrics.get(i, {})
            lines.append(
                f"| {_cell(p.name)} | {i} | {_cell(prompt)} | {_cell(r.get('target_new', ''))} |"
                f" {fmt_probability(mx.get('p_new_before'))} | {fmt_probability(p_new_with_patch(mx))} |"
            )
    body = "\n".join(lines)
    template = "---\n{{ card_data }}\n---\n\n{{ body }}\n"
    return str(ModelCard.from_template(card_data, template_str=template, body=body))


def build_pack(
    patches: Iterable[PatchSource] | PatchSource,
    folder: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    with_peft: bool = False,
) -> Path:
    """Lay out a pack folder: ``patches/NAME.nmke/`` per patch (in order), ``pack.json``, ``README.md``.

    Saved patches are copied byte for byte (their ids stay the same). ``with_peft`` adds ``peft/``, a LoRA
    adapter of the whole pack (:func:`nmke_patch.export.peft.export_peft`). ``folder`` must not exist or
    be an empty directory; the pack is built next to it and renamed into place, so a failed build leaves
    nothing. ``patches``: ``Patch`` objects, patch or pack folders, ``hf://`` references, or one alone.
    """
    patches = resolve_patches(patches)
    if not patches:
        raise InvalidPatchError("a pack needs at least one patch")
    ids = [p.id for p in patches]
    dupes = {p.describe() for p in patches if ids.count(p.id) > 1}
    if dupes:
        raise InvalidPatchError(f"patch listed more than once: {', '.join(sorted(dupes))}")
    check_lineage(patches)  # a pack is applied in its order: every chain whole, oldest first
    for p in patches[1:]:
        for key in base_model_differences(patches[0], p):
            ours, theirs = patches[0].manifest.base_model.get(key), p.manifest.base_model.get(key)
            differ = f"patches {patches[0].describe()} and {p.describe()} were made on different base models"
            if key in ("model_type", "architecture"):
                raise PatchMismatchError(
                    f"{differ} ({key} {ours!r} vs {theirs!r}); a pack holds one base model's"
                )
            # the same weights can be reached by two paths or names: said, not refused (apply checks weights)
            logger.warning(
                "%s (%s %r vs %r), or on one model named two ways; packed as asked", differ, key, ours, theirs
            )
    target = Path(folder)
    if new_folder_has_content(target, "build a pack into a new folder"):
        raise FileExistsError(f"{target} is not empty; build a pack into a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    root = staging_dir(target)  # built aside and renamed in: a failed build leaves no half-built pack
    try:
        _lay_out_pack(patches, root, repo_id=repo_id, with_peft=with_peft)
        move_into_place(root, target, replace=False)  # an empty folder is replaced, nothing else
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return target


def _lay_out_pack(patches: Sequence[Patch], root: Path, *, repo_id: str | None, with_peft: bool) -> None:
    (root / PATCHES_DIR).mkdir()
    taken: set[str] = set()
    entries, written = [], []
    for patch in patches:
        rel = f"{PATCHES_DIR}/{_dir_name(patch.name, taken)}"
        saved = _write_patch(patch, root / rel)
        written.append(saved)
        entries.append({"path": rel, "name": saved.name, "id": saved.id})
    pack = {"format": PACK_FORMAT, "format_version": PACK_FORMAT_VERSION, "patches": entries}
    (root / PACK_FILE).write_text(json.dumps(pack, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if with_peft:
        from .export.peft import export_peft

        bases = _base_names(written)
        hub_base = bases[0] if len(bases) == 1 and looks_like_hub_id(bases[0]) else None
        export_peft(written, root / PEFT_DIR, fmt="lora", base_model_name_or_path=hub_base)
    card = pack_card(written, repo_id=repo_id, with_peft=with_peft)
    (root / CARD_FILE).write_text(card, encoding="utf-8")


# -- verifying ---------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _link_target(path: Path, where: str, shown: Path | str) -> Path:
    """Where the link ``path`` leads; a link that loops is refused (``shown``: its name in the message)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13 raises on a loop
        raise InvalidPatchError(f"{where}: {shown} is a link that loops or cannot be followed") from exc


def safe_rel(rel: Any, where: str) -> str:
    """``rel`` if it is a plain relative path inside a pack (no ``..``, ``.``, absolute path, ``~``,
    backslash, drive letter or NUL), else :class:`InvalidPatchError`."""
    if not isinstance(rel, str) or not rel:
        raise InvalidPatchError(f"{where}: each {PACK_FILE} entry needs a non-empty 'path' string")
    if len(rel) > 1024:
        raise InvalidPatchError(f"{where}: a {PACK_FILE} path is {len(rel):,} characters long; at most 1024")
    parts = PurePosixPath(rel).parts
    if (
        rel.startswith(("/", "~"))
        or "\\" in rel
        or ":" in rel
        or "\0" in rel
        or any(part in ("..", ".") for part in parts)
        or rel != "/".join(parts)
    ):
        raise InvalidPatchError(
            f"{where}: {PACK_FILE} path {rel!r} is not a plain relative path inside the pack"
        )
    return rel


def read_pack_json(pack_dir: Path, *, where: str | None = None) -> list[dict[str, str]]:
    """Read and validate ``pack.json``: format, version and ``{path, name, id}`` entries with safe paths."""
    where = where or str(pack_dir)
    file = pack_dir / PACK_FILE
    if not file.is_file():
        raise InvalidPatchError(f"{where}: not an nmke-patch pack ({PACK_FILE} is missing)")
    data = read_json_file(file, where, MAX_PACK_JSON_BYTES)
    if not isinstance(data, dict) or data.get("format") != PACK_FORMAT:
        raise InvalidPatchError(
            f"{where}: {PACK_FILE} is not an nmke-patch pack (format must be {PACK_FORMAT!r})"
        )
    version = data.get("format_version")
    if type(version) is not int or version != PACK_FORMAT_VERSION:  # not True, not 1.0
        raise InvalidPatchError(
            f"{where}: pack format version {version!r} is not supported (reads v{PACK_FORMAT_VERSION});"
            " upgrade nmke-patch"
        )
    entries = data.get("patches")
    if not isinstance(entries, list) or not entries:
        raise InvalidPatchError(f"{where}: {PACK_FILE} must list at least one patch under 'patches'")
    out: list[dict[str, str]] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidPatchError(f"{where}: each {PACK_FILE} entry must be an object")
        rel = safe_rel(entry.get("path"), where)
        name, pid = entry.get("name"), entry.get("id")
        if not isinstance(name, str) or not isinstance(pid, str) or not _ID_RE.fullmatch(pid):
            raise InvalidPatchError(
                f"{where}: {PACK_FILE} entry {rel!r} needs a 'name' and an 'id' (a sha256 in 64 lowercase hex digits)"
            )
        if len(name) > MAX_NAME_CHARS:
            raise InvalidPatchError(
                f"{where}: {PACK_FILE} entry {rel!r} has a name of {len(name):,} characters; at most {MAX_NAME_CHARS}"
            )
        out.append({"path": rel, "name": name, "id": pid})
    paths = [e["path"] for e in out]
    if len(set(paths)) != len(paths) or len({e["id"] for e in out}) != len(out):
        raise InvalidPatchError(f"{where}: {PACK_FILE} lists the same patch path or id twice")
    return out


def cache_repo_root(folder: str | os.PathLike[str]) -> Path | None:
    """The Hugging Face cache folder of the repository whose snapshot ``folder`` is
    (``.../models--user--pack`` for ``.../models--user--pack/snapshots/<commit>``), else ``None``. Files of a
    snapshot are links into that folder's ``blobs/``."""
    path = Path(folder).resolve()
    repo = path.parent.parent
    cached = path.parent.name == "snapshots" and (repo / "blobs").is_dir()
    return repo if cached and repo.name.startswith(("models--", "datasets--", "spaces--")) else None


def verify_pack(
    folder: str | os.PathLike[str],
    *,
    trusted_root: str | os.PathLike[str] | None = None,
    where: str | None = None,
) -> list[Patch]:
    """Verify a pack folder as untrusted input and return its patches, in order.

    Every file under the pack must be a regular file, or a symlink resolving inside ``trusted_root``
    (default: the pack itself; the Hub cache keeps files as symlinks into its ``blobs/`` folder). Every
    listed patch must load with :func:`~nmke_patch.patch.load_patch` and hash to the id ``pack.json`` gives.

    Raises:
        InvalidPatchError: naming the first problem found.
    """
    pack_dir = Path(folder)
    where = where or str(pack_dir)
    root = pack_dir.resolve()
    trusted = Path(trusted_root).resolve() if trusted_root is not None else root
    for dirpath, dirnames, filenames in os.walk(pack_dir):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(
                _link_target(path, where, path.relative_to(pack_dir)), trusted
            ):
                raise InvalidPatchError(
                    f"{where}: {path.relative_to(pack_dir)} is a link leading out of the pack"
                )
    entries = read_pack_json(pack_dir, where=where)
    patches: list[Patch] = []
    for entry in entries:
        patch_dir = pack_dir / entry["path"]
        if patch_dir.is_symlink():  # one name per patch directory: pack.json names real folders
            raise InvalidPatchError(f"{where}: {entry['path']} is a link; pack.json must name a real folder")
        if not patch_dir.is_dir() or not _inside(_link_target(patch_dir, where, entry["path"]), root):
            raise InvalidPatchError(f"{where}: {entry['path']} is not a patch directory inside the pack")
        try:
            patch = load_patch(patch_dir)
        except InvalidPatchError as exc:  # the same kind of error (a damaged file stays one), placed
            raise type(exc)(f"{where}: {entry['path']}: {exc}") from exc
        if patch.id != entry["id"]:
            raise InvalidPatchError(
                f"{where}: {entry['path']} hashes to {patch.id[:16]}… but {PACK_FILE} lists {entry['id'][:16]}…"
                " (the pack was modified)"
            )
        if patch.name != entry["name"]:
            raise InvalidPatchError(
                f"{where}: {entry['path']} is named {patch.name!r} but {PACK_FILE} calls it {entry['name']!r}"
            )
        patches.append(patch)
    return patches

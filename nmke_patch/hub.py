"""Share edit packs on the Hugging Face Hub: build a pack folder, push it, pull it back (verified).

A pack is a Hub model repository laid out as::

    pack.json                  {"format": "nmke-pack", "format_version": 1, "patches": [{path, name, id}, ...]}
    README.md                  model card (base model, facts edited, measured metrics)
    patches/NAME.nmke/         one patch directory per patch, in application order
    peft/                      optional LoRA adapter of the whole pack (``push --with-peft``)

Whatever comes from the Hub is untrusted: :func:`pull_pack` checks ``pack.json``, every path it lists
(inside the pack, no ``..``, no absolute paths, no symlinks leading out), and loads every patch with
:func:`nmke_patch.patch.load_patch` (schema and sha256) before returning. See ``docs/hub.md``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from .card import fmt_probability, p_new_with_patch, patch_card
from .errors import HubError, InvalidPatchError, PatchMismatchError
from .jsonio import load_json_text
from .patch import (
    CARD_FILE,
    DELTAS_FILE,
    MANIFEST_FILE,
    MAX_NAME_CHARS,
    PATCH_FILES,
    PATCH_SUFFIX,
    STATE_FILE,
    Patch,
    base_model_differences,
    load_patch,
    read_manifest,
)
from .paths import move_into_place, new_folder_has_content, staging_dir
from .sources import HF_PREFIX, PACK_FILE, PatchSource, resolve_patches
from .stack import check_lineage

logger = logging.getLogger(__name__)

PACK_FORMAT = "nmke-pack"
PACK_FORMAT_VERSION = 1
PATCHES_DIR = "patches"
PEFT_DIR = "peft"
LIBRARY_NAME = "nmke-patch"
TAGS = ["knowledge-editing", "model-patching", "nmke-patch"]
MAX_PACK_JSON_BYTES = 4 * 1024 * 1024
_REPO_TYPE = "model"
_ID_RE = re.compile(r"[0-9a-f]{64}")
# packs live in a user's or an organisation's namespace: "user/pack" (never a bare, legacy "name")
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_MODEL_RE = re.compile(f"{_HUB_PART}/{_HUB_PART}")
"""``user/name`` as the Hub accepts it: ASCII letters, digits, ``_.-``, not ending in ``.`` or ``-``."""
_TRUE = {"1", "ON", "YES", "TRUE"}


# -- configuration read at call time ------------------------------------------------------------------


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint: ``endpoint``, else ``$NMKE_PATCH_HF_ENDPOINT``, else ``$HF_ENDPOINT``, else the default.

    Read at call time (``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import).
    """
    from huggingface_hub import constants

    value = endpoint or os.environ.get("NMKE_PATCH_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT")
    value = (value or constants.ENDPOINT).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise HubError(f"invalid Hub endpoint {value!r}: expected an http:// or https:// URL")
    return value


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _cache_dir() -> str | None:
    """``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` as set now (None: huggingface_hub's import-time default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _cached_commit(repo_id: str, short: str) -> str | None:
    """The one commit in the Hugging Face cache of ``repo_id`` whose id starts with ``short`` (hex), if any:
    offline, huggingface_hub finds a pinned commit by its full id only."""
    from huggingface_hub import constants

    folder = (
        Path(_cache_dir() or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    )
    found = [p.name for p in folder.glob(f"{short}*")] if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def parse_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf://user/pack@rev``, ``hf://user/pack`` or ``user/pack`` -> ``(repo_id, revision)``."""
    if not isinstance(ref, str) or not (revision is None or isinstance(revision, str)):
        raise TypeError(f"a pack's repository is a string such as 'user/pack', not {type(ref).__name__}")
    text = ref.removeprefix(HF_PREFIX)
    repo_id, sep, rev = text.partition("@")
    repo_id = repo_id.strip("/")
    if sep and not rev:
        raise HubError(f"{ref!r}: empty revision after '@'; use hf://user/pack@REVISION")
    if not _is_hub_id(repo_id):
        raise HubError(
            f"{ref!r} is not an edit pack's repository id; expected user/pack (or hf://user/pack[@revision])"
        )
    if rev and revision and rev != revision:
        raise HubError(f"{ref!r} names revision {rev!r} but {revision!r} was also given; pass only one")
    return repo_id, rev or revision


def looks_like_hub_id(name: str) -> bool:
    """Whether a base model's ``name_or_path`` reads as a Hub model id (``org/name``), not a local path."""
    return _is_hub_id(name) and not os.path.exists(name)


def _is_hub_id(name: str) -> bool:
    """The Hub's own rules for a repository id, so that no id passes here that huggingface_hub refuses."""
    return (
        bool(_HUB_MODEL_RE.fullmatch(name))
        and ".." not in name
        and "--" not in name
        and not name.endswith(".git")
    )


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
            prompt = str(r.get("prompt", "")).replace("{}", str(r.get("subject", "")))
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
        move_into_place(root, target)  # an empty target folder is replaced
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


def _safe_rel(rel: Any, where: str) -> str:
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
    if file.stat().st_size > MAX_PACK_JSON_BYTES:
        raise InvalidPatchError(f"{where}: {PACK_FILE} is larger than {MAX_PACK_JSON_BYTES} bytes")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPatchError(f"{where}: {PACK_FILE} is not valid JSON ({exc})") from exc
    data = load_json_text(text, f"{where}: {PACK_FILE}")
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
        rel = _safe_rel(entry.get("path"), where)
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
        except InvalidPatchError as exc:
            raise InvalidPatchError(f"{where}: {entry['path']}: {exc}") from exc
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


# -- Hub I/O -----------------------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's own errors (timeouts, refused connections, redirect loops, ...)."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


HUB_TIMEOUT_ENV = "NMKE_PATCH_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT_S = 60.0
"""How long a Hub request may wait for the server (connect, each read or write), in seconds."""
_MAX_HUB_TIMEOUT_S = 86400.0


def hub_timeout_s() -> float:
    """``$NMKE_PATCH_HUB_TIMEOUT`` (seconds, > 0), else :data:`DEFAULT_HUB_TIMEOUT_S`."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= _MAX_HUB_TIMEOUT_S):
        raise HubError(
            f"{HUB_TIMEOUT_ENV}={text!r}: give a number of seconds greater than 0 and at most {_MAX_HUB_TIMEOUT_S:g}"
        )
    return value


def _checked_token(token: str | None) -> str | None:
    """``token`` without surrounding whitespace (``$(cat token.txt)`` ends in a newline); an empty one or
    one a token cannot be (non-ASCII, spaces inside) is refused, as is such an ``HF_TOKEN``."""
    for value, name in ((token, "the token"), (os.environ.get("HF_TOKEN"), "HF_TOKEN")):
        if value is None or (name == "HF_TOKEN" and token is not None):
            continue
        stripped = value.strip()
        if not stripped and name == "the token":
            raise HubError(
                "the token is empty: give one, or leave --token out to use HF_TOKEN or the stored login"
            )
        if stripped and not (stripped.isascii() and stripped.isprintable() and " " not in stripped):
            raise HubError(
                f"{name} holds characters no Hub token has (non-ASCII, spaces or control characters)"
            )
    return token.strip() if token is not None else None


@contextmanager
def _bounded_requests() -> Iterator[None]:
    """huggingface_hub asks many API requests to wait for an answer forever (``timeout=None``; its file
    downloads do not): a server that accepts the connection and never answers would hang a pull or a
    push. Within this block every request of its shared client that would wait forever waits at most
    :func:`hub_timeout_s` (per connect, read or write); requests with a timeout of their own keep it."""
    from huggingface_hub.utils import get_session

    seconds = hub_timeout_s()

    def bound(request: Any) -> None:
        timeout = request.extensions.get("timeout")
        if not timeout or all(v is None for v in timeout.values()):
            request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), seconds)

    hooks = get_session().event_hooks["request"]
    hooks.append(bound)
    try:
        yield
    finally:
        hooks.remove(bound)


def _malformed(exc: BaseException) -> bool:
    """A huggingface_hub call that failed on the server's answer itself (not JSON, fields missing): an
    endpoint that is not the Hub API, or a proxy in the way."""
    return (
        isinstance(exc, (json.JSONDecodeError, KeyError, TypeError))
        or type(exc).__name__ == "HFValidationError"
    )


@contextmanager
def _hub_calls(*, push: bool, repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Hub requests with a bounded wait, their failures as one :class:`HubError` line."""
    try:
        with _bounded_requests():
            yield
    except HubError:
        raise
    except Exception as exc:
        if _is_hub_failure(exc) or _malformed(exc):
            raise _hub_error(exc, push=push, repo_id=repo_id, revision=revision, endpoint=endpoint) from exc
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):  # huggingface_hub's words
            raise HubError(
                f"a download from {endpoint} was cut short (a file's size is not the one the Hub announced):"
                " pull again"
            ) from exc
        raise


_CHECK_ENDPOINT = "check the network or the endpoint (NMKE_PATCH_HF_ENDPOINT, else HF_ENDPOINT)"
_TOKEN_SOURCES = "HF_TOKEN, `hf auth login`, or --token with push and pull"
_OFFLINE_HINT = "a pack pulled before is served from the cache with HF_HUB_OFFLINE=1"


def _hub_error(
    exc: BaseException, *, push: bool, repo_id: str, revision: str | None, endpoint: str
) -> HubError:
    """One actionable line for a huggingface_hub / network failure."""
    from huggingface_hub import errors as hf

    where = repo_id + (f"@{revision}" if revision else "")
    access = "write" if push else "read"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.GatedRepoError):
        msg = f"{where} is gated: accept its conditions on the Hub page, then give a token ({_TOKEN_SOURCES})"
    elif isinstance(exc, hf.RepositoryNotFoundError):
        msg = (
            f"{where} was not found on {endpoint}, or it is private and no valid token was given:"
            f" check the name, or give a token ({_TOKEN_SOURCES})"
        )
    elif isinstance(exc, hf.RevisionNotFoundError):
        msg = f"revision {revision or 'main'!r} does not exist in {repo_id}: check the branch, tag or commit"
    elif (isinstance(exc, hf.EntryNotFoundError) and not isinstance(exc, hf.LocalEntryNotFoundError)) or (
        isinstance(exc, hf.LocalEntryNotFoundError) and _http_status(exc) == 404
    ):
        url = next(
            (
                getattr(getattr(getattr(c, "response", None), "request", None), "url", None)
                for c in _causes(exc)
                if getattr(c, "response", None) is not None
            ),
            None,
        )
        named = f" ({str(url).split('/resolve/', 1)[-1]})" if url is not None else ""
        msg = (
            f"a file of {where}{named} is listed but could not be downloaded (HTTP 404; the repository changed"
            " during the pull?): pull again, and if it persists, tell the pack's owner"
        )
    elif _malformed(exc):
        msg = (
            f"the server at {endpoint} did not answer as the Hugging Face Hub API does ({type(exc).__name__}):"
            f" {_CHECK_ENDPOINT}"
        )
    elif status == 429 or _http_status(exc) == 429:
        msg = f"the Hub at {endpoint} is limiting requests (HTTP 429): wait a minute, then try again"
    elif isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) and _offline():
        msg = f"{where} is not in the local Hugging Face cache and offline mode is on: pull it once with HF_HUB_OFFLINE unset"
    elif any(isinstance(c, hf.FileMetadataError) for c in _causes(exc)):
        msg = (
            f"the server at {endpoint} answered without the headers the Hub sends with a file (ETag,"
            f" X-Repo-Commit, Content-Length): a proxy in the way? {_CHECK_ENDPOINT}"
        )
    elif isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) and _http_status(exc):
        msg = (
            f"the Hub at {endpoint} answered HTTP {_http_status(exc)} while {where} was downloaded, and it"
            f" is not in the local Hugging Face cache: try again later; {_OFFLINE_HINT}"
        )
    elif isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        cause = _transport_cause(exc)
        msg = (
            f"could not reach the Hub at {endpoint}{f' ({cause})' if cause else ''} and {where} is not in the"
            f" local Hugging Face cache: {_CHECK_ENDPOINT}"
        )
    elif isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        msg = (
            f"not authorized to {'push to' if push else 'pull'} {where} (HTTP {status}): pass a token with"
            f" {access} access ({_TOKEN_SOURCES})"
        )
    elif isinstance(exc, hf.HfHubHTTPError):
        detail = (str(exc).strip().splitlines() or [""])[0]
        msg = f"{'push to' if push else 'pull of'} {where} failed: {detail}"
        if not push and isinstance(status, int) and status >= 500:
            msg += f"; {_OFFLINE_HINT}"
    else:
        msg = f"could not reach the Hub at {endpoint} ({type(exc).__name__}): {_CHECK_ENDPOINT}"
        if not push:
            msg += f"; {_OFFLINE_HINT}"
        elif "Timeout" in type(exc).__name__:
            msg += "; the upload may have landed all the same: push again (it says 'already holds this pack' if so)"
    return HubError(msg)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, in turn."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transport_cause(exc: BaseException) -> str | None:
    """The name of the network error (a timeout, a refused connection) behind ``exc``, if any."""
    errors = _transport_errors()
    return next((type(c).__name__ for c in _causes(exc) if isinstance(c, errors)), None)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of the first error with a response in ``exc``'s chain of causes, if any."""
    for cause in _causes(exc):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _is_hub_failure(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf

    return isinstance(
        exc, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, *_transport_errors())
    )


class _DropEmptyCommitNotice(logging.Filter):
    """Drops huggingface_hub's "No files have been modified" warning: push reports that case itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files have been modified")


@contextmanager
def _without_empty_commit_notice() -> Iterator[None]:
    quiet = _DropEmptyCommitNotice()
    loggers = [logging.getLogger(n) for n in ("huggingface_hub.hf_api", "huggingface_hub._upload_pipeline")]
    for each in loggers:
        each.addFilter(quiet)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(quiet)


class PushResult(str):
    """The URL of the commit that holds a pushed pack (a ``str``), and whether the push made it."""

    changed: bool
    """False when the branch already held exactly this pack: no commit was made, the URL is the existing one."""

    def __new__(cls, url: str, *, changed: bool) -> PushResult:
        result = super().__new__(cls, url)
        result.changed = changed
        return result

    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, bool]]:  # copy and pickle
        return (str(self),), {"changed": self.changed}


def push_pack(
    sources: Iterable[PatchSource],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    with_peft: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Build a pack from patch directories, packs or :class:`Patch` objects and upload it to ``repo_id``.

    Creates the repository (kept if it exists) and the branch ``revision`` (from ``main``) if missing.
    Files of earlier pushes under ``patches/`` and ``peft/`` are removed in the same commit.

    Returns:
        The URL of the commit, a ``str`` whose ``changed`` is False when the branch already held this pack
        (no commit made; the URL is the existing commit's).

    Raises:
        InvalidPatchError: a source is not a valid patch.
        HubError: the Hub refused or could not be reached (one line saying what to do).
    """
    from huggingface_hub import HfApi

    repo_id, revision = parse_ref(repo_id, revision)
    token = _checked_token(token)
    if revision is not None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
        raise HubError(
            f"push --revision {revision!r} looks like a commit id; a push goes to a branch, and a branch of that "
            "name would shadow the commit for everyone who pinned it: name the branch otherwise"
        )
    patches = resolve_patches(sources)  # validate everything before any network call
    url = hub_endpoint(endpoint)
    if _offline():
        raise HubError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push to the Hub")
    api = HfApi(endpoint=url, token=token, library_name=LIBRARY_NAME)
    with tempfile.TemporaryDirectory(prefix="nmke-pack-") as tmp:
        folder = build_pack(patches, Path(tmp) / "pack", repo_id=repo_id, with_peft=with_peft)
        with _hub_calls(push=True, repo_id=repo_id, revision=revision, endpoint=url):
            api.create_repo(repo_id, repo_type=_REPO_TYPE, private=True if private else None, exist_ok=True)
            if private and not api.repo_info(repo_id, repo_type=_REPO_TYPE).private:
                raise HubError(
                    f"{repo_id} already exists and is public; make it private on the Hub or pick a new name"
                )
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type=_REPO_TYPE, exist_ok=True)
            head = api.repo_info(repo_id, repo_type=_REPO_TYPE, revision=revision).sha
            present = api.list_repo_files(repo_id, repo_type=_REPO_TYPE, revision=revision)
            theirs = sorted(f for f in present if f != ".gitattributes")
            if PACK_FILE not in present and theirs:
                raise HubError(  # a model or data repository: its card and files are not ours to replace
                    f"{repo_id} holds files ({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}) "
                    "and is not an edit pack (no pack.json); push to a new repository"
                )
            with _without_empty_commit_notice():
                info = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    repo_type=_REPO_TYPE,
                    revision=revision,
                    commit_message=f"Upload nmke-patch pack ({len(patches)} patch{'es' if len(patches) != 1 else ''})",
                    delete_patterns=[f"{PATCHES_DIR}/**", f"{PEFT_DIR}/**"],
                )
    changed = info.oid != head
    if changed:
        logger.info("pushed %d patch(es) to %s: %s", len(patches), repo_id, info.commit_url)
    else:
        logger.info("%s already holds this pack (%s): nothing pushed", repo_id, info.commit_url)
    return PushResult(str(info.commit_url or info.oid), changed=changed)


def pull_verified(
    ref: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, list[Patch]]:
    """:func:`pull_pack`, also returning the verified patches in pack order (loaded once).

    Raises:
        HubError: the repository, revision or a token is missing, or the Hub cannot be reached.
        InvalidPatchError: the pack failed verification (nothing in it should be used).
    """
    repo_id, revision = parse_ref(ref, revision)
    token = _checked_token(token)
    where = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    if local_dir is None:
        folder = _download(repo_id, revision, token, endpoint)
        _check_holds_pack(folder, repo_id, revision, token, endpoint, where)
        return folder, _verify_cached(folder, where)
    target = Path(local_dir)
    _check_pull_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)  # downloaded and verified aside: a refused pack leaves nothing behind
    try:  # through the cache: a second pull of the same revision downloads nothing
        cached = _download(repo_id, revision, token, endpoint)
        _check_holds_pack(cached, repo_id, revision, token, endpoint, where)
        _verify_cached(cached, where)  # links checked first
        _copy_pack(cached, staging)
        marker = staging / _PULL_MARKER
        marker.mkdir(parents=True, exist_ok=True)
        (marker / ".gitignore").write_text("*\n", encoding="utf-8")
        patches = verify_pack(staging, trusted_root=staging, where=where)
        move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    moved = [replace(p, path=target / p.path.relative_to(staging)) if p.path else p for p in patches]
    return target, moved


_DAMAGE_WORDS = ("sha256", "hashes to", "could not be read", "truncated")
"""Words of the refusals a download damaged on the way gives (the content, not what the pack says)."""


def _copy_pack(src: Path, dst: Path) -> None:
    """Copy a verified pack's own files (``pack.json``, its card, the listed patches' files, ``peft/``),
    following the cache's links; nothing else the download holds."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (PACK_FILE, CARD_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    for entry in read_pack_json(src):
        (dst / entry["path"]).mkdir(parents=True, exist_ok=True)
        for name in PATCH_FILES:
            if (src / entry["path"] / name).is_file():
                shutil.copyfile(src / entry["path"] / name, dst / entry["path"] / name)
    if (src / PEFT_DIR).is_dir():
        shutil.copytree(src / PEFT_DIR, dst / PEFT_DIR, symlinks=False, dirs_exist_ok=True)


def _verify_cached(folder: Path, where: str) -> list[Patch]:
    """:func:`verify_pack` of a pack in the Hugging Face cache, whose files are links into its ``blobs/``
    (they may lead there, nowhere else). A refusal names the cached copy: a damaged download stays there
    and is served again until it is removed."""
    root = cache_repo_root(folder)
    try:
        return verify_pack(folder, trusted_root=root or folder, where=where)
    except InvalidPatchError as exc:
        if root is None or not any(w in str(exc) for w in _DAMAGE_WORDS):
            raise
        raise InvalidPatchError(
            f"{exc} (checked in the Hugging Face cache; if the Hub's copy is intact, this copy was damaged on"
            f" the way: delete {root} and pull again)"
        ) from exc


def _check_holds_pack(
    folder: Path, repo_id: str, revision: str | None, token: str | None, endpoint: str | None, where: str
) -> None:
    """Refuse a download without ``pack.json``, naming the repository's other branches when ``main`` (the
    revision pulled by default) has none: ``push --revision`` leaves ``main`` as it was."""
    if (folder / PACK_FILE).is_file() or folder.joinpath(PACK_FILE).is_symlink():
        return  # present (a link is the cache's way; verify_pack checks where it leads)
    hint = ""
    if revision is None and not _offline():
        from huggingface_hub import HfApi

        try:
            with _bounded_requests():
                refs = HfApi(
                    endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME
                ).list_repo_refs(repo_id, repo_type=_REPO_TYPE)
            others = [r.name for r in [*refs.branches, *refs.tags] if r.name != "main"]
        except Exception as exc:  # only a hint: the refusal below stands without it
            logger.debug("listing the branches of %s failed: %s", repo_id, exc)
            others = []
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            hint = f"; it has other branches or tags ({shown}): pull {repo_id}@{others[0]} for one of them"
    raise InvalidPatchError(f"{where}: not an nmke-patch pack ({PACK_FILE} is missing){hint}")


_PULL_MARKER = Path(".cache", "huggingface")
"""The folder a pull into a folder leaves beside the pack (where huggingface_hub keeps a local_dir's
metadata; ignored by git)."""


def _check_pull_target(target: Path) -> None:
    """Refuse a ``local_dir`` that is a file or a link, or a folder with files of its own: it must be new,
    empty, or the folder of an earlier pull (it holds ``pack.json``), which the new pack replaces whole."""
    if new_folder_has_content(target, "pull into a new folder") and not _pulled_here(target):
        raise FileExistsError(
            f"{target} is not empty and is not the folder of an earlier pull; pull into a new or empty folder "
            "(the folder of an earlier pull is replaced whole)"
        )
    outer = next((p for p in Path(os.path.abspath(target)).parents if _pulled_here(p)), None)
    if outer is not None:  # the next pull into that folder would replace it whole, this pack included
        raise FileExistsError(
            f"{target} is inside {outer}, the folder of an earlier pull, which a pull replaces whole; pull into "
            "a folder outside it"
        )


def _pulled_here(folder: Path) -> bool:
    """Whether ``folder`` is what a pull into a folder leaves: a pack plus :data:`_PULL_MARKER`; a pack
    built by `pack`, or a clone, has no such folder."""
    return (folder / PACK_FILE).is_file() and (folder / _PULL_MARKER).is_dir()


def _check_read_access(repo_id: str, revision: str | None, token: str | None, endpoint: str) -> None:
    """Ask for the pack file's metadata, as a download would: a gated repository answers its metadata
    (``repo_info``) to anyone, but its files only to those granted access, so without this a pull whose
    access was revoked would be served from the cache. A repository without a pack file passes here and
    is refused by the verification, which says what is missing."""
    from huggingface_hub import errors as hf
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, PACK_FILE, repo_type=_REPO_TYPE, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, token=token, library_name=LIBRARY_NAME, endpoint=endpoint)
    except hf.EntryNotFoundError:
        return


_PACK_PATTERNS = [PACK_FILE, "README.md", f"{PATCHES_DIR}/**", f"{PEFT_DIR}/**"]
"""What a pull downloads: a pack's own files, nothing else the repository holds."""


def _download(repo_id: str, revision: str | None, token: str | None, endpoint: str | None) -> Path:
    """``snapshot_download`` of the pack into the Hugging Face cache (from it only when offline); one-line
    errors.

    Online, the Hub is asked first: ``snapshot_download`` alone would answer a refusal (401, 404) or an
    outage with a copy cached earlier, so a revoked token or a deleted pack would go unnoticed. Offline
    (``HF_HUB_OFFLINE``), the cache is the intended source."""
    from huggingface_hub import HfApi, snapshot_download

    url = hub_endpoint(endpoint)
    if _offline() and revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):
        revision = _cached_commit(repo_id, revision) or revision
    with _hub_calls(push=False, repo_id=repo_id, revision=revision, endpoint=url):
        head = None
        if not _offline():
            head = (
                HfApi(endpoint=url, token=token, library_name=LIBRARY_NAME)
                .repo_info(repo_id, repo_type=_REPO_TYPE, revision=revision)
                .sha
            )
            _check_read_access(repo_id, revision, token, url)
        folder = Path(
            snapshot_download(
                repo_id,
                repo_type=_REPO_TYPE,
                revision=revision,
                cache_dir=_cache_dir(),
                token=token,
                endpoint=url,
                local_files_only=_offline(),
                library_name=LIBRARY_NAME,
                allow_patterns=_PACK_PATTERNS,
            )
        )
    if head is not None and folder.name != head:  # it answered a failed request with an older copy
        raise HubError(
            f"the Hub at {url} holds commit {head[:12]} of {repo_id}{'@' + revision if revision else ''} but"
            f" served {folder.name[:12]} (a request failed on the way, or the pack changed during the pull): try"
            " again"
        )
    return folder


def pull_pack(
    ref: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download a pack (``hf://user/pack@rev``, ``hf://user/pack`` or ``user/pack``) and verify it.

    Uses the Hugging Face cache (``$HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` it is served from the cache
    alone. ``local_dir``: also copy the pack from the cache into that folder (new, empty, or an earlier
    pull's, which is replaced whole) and return it.

    Returns:
        The verified pack folder.

    Raises:
        HubError: the repository, revision or a token is missing, or the Hub cannot be reached.
        InvalidPatchError: the pack failed verification (nothing in it should be used).
    """
    folder, _ = pull_verified(ref, revision=revision, local_dir=local_dir, token=token, endpoint=endpoint)
    return folder

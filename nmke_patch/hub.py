"""Share edit packs on the Hugging Face Hub: push a pack, pull it back (verified).

Whatever comes from the Hub is untrusted: :func:`pull_pack` verifies the pack
(:func:`nmke_patch.pack.verify_pack`) before returning it. Building and verifying pack folders lives in
:mod:`nmke_patch.pack`, references and the endpoint in :mod:`nmke_patch.hub_refs`, error handling in
:mod:`nmke_patch.hub_errors`; their public names are importable from here too. See ``docs/hub.md``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .errors import DamagedFileError, HubError, InvalidPatchError
from .hub_errors import bounded_requests, checked_token, hub_calls, hub_timeout_s
from .hub_refs import (
    LIBRARY_NAME,
    REPO_TYPE,
    cached_commit,
    hub_cache_dir,
    hub_endpoint,
    looks_like_hub_id,
    offline_mode,
    parse_ref,
)
from .pack import (
    PACK_FORMAT,
    PACK_FORMAT_VERSION,
    PATCHES_DIR,
    PEFT_DIR,
    build_pack,
    cache_repo_root,
    pack_card,
    read_pack_json,
    safe_rel,
    verify_pack,
)
from .patch import CARD_FILE, PATCH_FILES, Patch
from .paths import move_into_place, new_folder_has_content, staging_dir
from .sources import HF_PREFIX, PACK_FILE, PatchSource, resolve_patches

__all__ = [
    "PACK_FORMAT",
    "PACK_FORMAT_VERSION",
    "PushResult",
    "build_pack",
    "cache_repo_root",
    "hub_endpoint",
    "hub_timeout_s",
    "looks_like_hub_id",
    "pack_card",
    "parse_ref",
    "pull_pack",
    "pull_verified",
    "push_pack",
    "read_pack_json",
    "verify_pack",
]

logger = logging.getLogger(__name__)


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
    token = checked_token(token)
    if revision is not None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
        raise HubError(
            f"push --revision {revision!r} looks like a commit id; a push goes to a branch, and a branch of that "
            "name would shadow the commit for everyone who pinned it: name the branch otherwise"
        )
    patches = resolve_patches(sources)  # validate everything before any network call
    url = hub_endpoint(endpoint)
    if offline_mode():
        raise HubError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push to the Hub")
    api = HfApi(endpoint=url, token=token, library_name=LIBRARY_NAME)
    with tempfile.TemporaryDirectory(prefix="nmke-pack-") as tmp:
        folder = build_pack(patches, Path(tmp) / "pack", repo_id=repo_id, with_peft=with_peft)
        with hub_calls(push=True, repo_id=repo_id, revision=revision, endpoint=url):
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
            if private and not api.repo_info(repo_id, repo_type=REPO_TYPE).private:
                raise HubError(
                    f"{repo_id} already exists and is public; make it private on the Hub or pick a new name"
                )
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
            head = api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision).sha
            present = api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=revision)
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
                    repo_type=REPO_TYPE,
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
    token = checked_token(token)
    where = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    if local_dir is None:
        folder = _download(repo_id, revision, token, endpoint)
        _check_holds_pack(folder, repo_id, revision, token, endpoint, where)
        return folder, _verify_cached(folder, where)
    target = Path(local_dir)
    _check_pull_target(target)
    replacing = target.exists() and _pulled_here(target)  # an earlier pull's folder is replaced whole
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
        move_into_place(staging, target, replace=replacing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    moved = [replace(p, path=target / p.path.relative_to(staging)) if p.path else p for p in patches]
    return target, moved


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
    except DamagedFileError as exc:  # a file's bytes, not what the pack says
        if root is None:
            raise
        raise DamagedFileError(
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
    if revision is None and not offline_mode():
        from huggingface_hub import HfApi

        try:
            with bounded_requests():
                refs = HfApi(
                    endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME
                ).list_repo_refs(repo_id, repo_type=REPO_TYPE)
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

    url = hf_hub_url(repo_id, PACK_FILE, repo_type=REPO_TYPE, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, token=token, library_name=LIBRARY_NAME, endpoint=endpoint)
    except hf.EntryNotFoundError:
        return


_PACK_PATTERNS = [PACK_FILE, "README.md", f"{PATCHES_DIR}/**", f"{PEFT_DIR}/**"]
"""What a pull downloads: a pack's own files, nothing else the repository holds."""


def _refuse_unsafe_names(names: list[str], where: str) -> None:
    """Refuse a repository whose pack files (those a pull downloads: :data:`_PACK_PATTERNS`, matched as
    ``snapshot_download`` matches them) include a name that is not a plain relative path (``..``, absolute,
    backslashes): a stranger's pack, refused before anything is written."""
    from huggingface_hub.utils import filter_repo_objects

    for name in filter_repo_objects(names, allow_patterns=_PACK_PATTERNS):
        try:
            safe_rel(name, where)
        except InvalidPatchError as exc:
            raise InvalidPatchError(
                f"{where} holds a file whose name is not a plain path inside the pack ({name!r}); it is not"
                " pulled"
            ) from exc


def _download(repo_id: str, revision: str | None, token: str | None, endpoint: str | None) -> Path:
    """``snapshot_download`` of the pack into the Hugging Face cache (from it only when offline); one-line
    errors.

    Online, the Hub is asked first: ``snapshot_download`` alone would answer a refusal (401, 404) or an
    outage with a copy cached earlier, so a revoked token or a deleted pack would go unnoticed. Offline
    (``HF_HUB_OFFLINE``), the cache is the intended source."""
    from huggingface_hub import HfApi, snapshot_download

    url = hub_endpoint(endpoint)
    if offline_mode() and revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):
        revision = cached_commit(repo_id, revision) or revision
    where = f"pack {repo_id}{'@' + revision if revision else ''} on {url}"
    with hub_calls(push=False, repo_id=repo_id, revision=revision, endpoint=url):
        head = None
        if not offline_mode():
            info = HfApi(endpoint=url, token=token, library_name=LIBRARY_NAME).repo_info(
                repo_id, repo_type=REPO_TYPE, revision=revision
            )
            head = info.sha
            siblings = getattr(info, "siblings", None) or []  # every repo kind but kernels lists them
            _refuse_unsafe_names([s.rfilename for s in siblings], where)
            _check_read_access(repo_id, revision, token, url)
        try:
            folder = Path(
                snapshot_download(
                    repo_id,
                    repo_type=REPO_TYPE,
                    revision=revision,
                    cache_dir=hub_cache_dir(),
                    token=token,
                    endpoint=url,
                    local_files_only=offline_mode(),
                    library_name=LIBRARY_NAME,
                    allow_patterns=_PACK_PATTERNS,
                )
            )
        except ValueError as exc:  # huggingface_hub refuses a file name that would leave the cache folder
            if type(exc) is not ValueError:  # its subclasses (bad JSON, ids) are the Hub's answers: hub_calls
                raise
            raise InvalidPatchError(f"{where}: the download was refused: {exc}") from exc
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

"""Where the Hub is and how packs are named there: the endpoint, offline mode and cache location (read
when a command runs, not at import), ``hf://user/pack@rev`` references and repository ids."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError
from .sources import HF_PREFIX

REPO_TYPE = "model"
LIBRARY_NAME = "nmke-patch"
"""Who the Hub is told is asking (requests) and which library a pack is for (its card)."""
# packs live in a user's or an organisation's namespace: "user/pack" (never a bare, legacy "name")
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_MODEL_RE = re.compile(f"{_HUB_PART}/{_HUB_PART}")
"""``user/name`` as the Hub accepts it: ASCII letters, digits, ``_.-``, not ending in ``.`` or ``-``."""
_TRUE = {"1", "ON", "YES", "TRUE"}


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


def offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache_dir() -> str | None:
    """``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` as set now (None: huggingface_hub's import-time default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def cached_commit(repo_id: str, short: str) -> str | None:
    """The one commit in the Hugging Face cache of ``repo_id`` whose id starts with ``short`` (hex), if any:
    offline, huggingface_hub finds a pinned commit by its full id only."""
    from huggingface_hub import constants

    folder = (
        Path(hub_cache_dir() or constants.HF_HUB_CACHE)
        / f"models--{repo_id.replace('/', '--')}"
        / "snapshots"
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

"""Hub requests that end in one line: bounded waits, checked tokens, and huggingface_hub's and the network's
failures turned into a :class:`~nmke_patch.errors.HubError` that says what to do."""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import HubError
from .hub_refs import offline_mode


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


def checked_token(token: str | None) -> str | None:
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
def bounded_requests() -> Iterator[None]:
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
    return isinstance(exc, (json.JSONDecodeError, KeyError)) or type(exc).__name__ == "HFValidationError"


@contextmanager
def hub_calls(*, push: bool, repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Hub requests with a bounded wait, their failures as one :class:`HubError` line."""
    try:
        with bounded_requests():
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
    answered = _first_response(exc)  # an HTTP answer somewhere behind exc (a cache miss hides it)
    chained = getattr(answered, "status_code", None)
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
        isinstance(exc, hf.LocalEntryNotFoundError) and chained == 404
    ):
        url = getattr(getattr(answered, "request", None), "url", None)
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
    elif status == 429 or chained == 429:
        msg = f"the Hub at {endpoint} is limiting requests (HTTP 429): wait a minute, then try again"
    elif isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) and offline_mode():
        msg = f"{where} is not in the local Hugging Face cache and offline mode is on: pull it once with HF_HUB_OFFLINE unset"
    elif any(isinstance(c, hf.FileMetadataError) for c in _causes(exc)):
        msg = (
            f"the server at {endpoint} answered without the headers the Hub sends with a file (ETag,"
            f" X-Repo-Commit, Content-Length): a proxy in the way? {_CHECK_ENDPOINT}"
        )
    elif isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) and chained:
        msg = (
            f"the Hub at {endpoint} answered HTTP {chained} while {where} was downloaded, and it"
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


def _first_response(exc: BaseException) -> Any:
    """The HTTP response (with a status) of the first error in ``exc``'s chain of causes that has one."""
    for cause in _causes(exc):
        response = getattr(cause, "response", None)
        if isinstance(getattr(response, "status_code", None), int):
            return response
    return None


def _is_hub_failure(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf

    return isinstance(
        exc, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, *_transport_errors())
    )

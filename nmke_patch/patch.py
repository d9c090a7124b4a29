"""The patch artifact (format v1): ``NAME.nmke/`` with ``manifest.json``, ``deltas.safetensors``, ``README.md``
and, for a patch that carries editor state, ``state.safetensors``.

See ``docs/format.md`` for the specification. Reading validates everything before returning: a
:class:`Patch` that exists in memory is internally consistent (hash, keys, dtypes, shapes, index ranges).
Patches come from strangers: nothing here unpickles, and nothing touches a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save

from .delta import TensorDelta, all_finite
from .errors import DamagedFileError, InvalidPatchError
from .jsonio import read_json_file
from .paths import check_parents, move_into_place, staging_dir
from .threads import one_thread
from .version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "nmke-patch"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DELTAS_FILE = "deltas.safetensors"
STATE_FILE = "state.safetensors"
CARD_FILE = "README.md"
PATCH_SUFFIX = ".nmke"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME_CHARS = 256
"""Longest patch name accepted: a name is shown in every message about its patch."""
MAX_DIM = 2**20
"""Largest dimension a weight of a patch may declare (the largest real MLPs have ~2**16)."""
MAX_ELEMENTS = 2**32
"""Most elements a weight of a patch may declare."""
MAX_LAYER = 9999
_STATE_KEY_RE = re.compile(r"(keys|contrast)\.(0|[1-9][0-9]{0,3})")
_NUMERIC_METRICS = ("p_new_before", "p_new_after", "p_new_final", "p_true_final")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_KNOWN_KEYS = {
    "format",
    "format_version",
    "tool_version",
    "name",
    "created_at",
    "base_model",
    "tensors",
    "method",
    "requests",
    "metrics",
    "parents",
    "deltas_file",
    "deltas_sha256",
    "notes",
    "state_file",
    "state_sha256",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (only the dtypes a patch may hold)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise InvalidPatchError(
        f"unsupported weight dtype {dtype}; patches hold float32, bfloat16 or float16 weights"
    )


@dataclass(frozen=True)
class ParentRef:
    """A patch this one was created on top of (its originals include the parent's changes)."""

    name: str
    id: str


@dataclass(frozen=True)
class Manifest:
    """Everything in ``manifest.json`` except the per-tensor entries, which live on :class:`TensorDelta`."""

    name: str
    base_model: dict[str, Any]
    method: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    parents: list[ParentRef] = field(default_factory=list)
    created_at: str = ""
    tool_version: str = __version__
    notes: str = ""


def _tensor_key(name: str, part: str) -> str:
    return f"{name}::{part}"


@dataclass(frozen=True, eq=False)
class Patch:
    """A validated patch: a manifest and one :class:`TensorDelta` per edited weight.

    Two patches are equal when they are the same patch: the same id (the sha256 of its deltas) and name,
    however they were loaded (``load_patch(folder) in stack.applied``); they hash by id."""

    manifest: Manifest
    deltas: tuple[TensorDelta, ...]
    id: str = ""
    """sha256 (hex) of ``deltas.safetensors`` (computed from the tensors when not given). A copy with other
    deltas keeps the id it is given: ``dataclasses.replace(patch, deltas=..., id="")`` computes the new one."""
    path: Path | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Optional editing state that travels with the patch chain: ``keys.<layer>`` float32 ``[R, d_ff]``, the
    key columns of the edits (``R = 2T`` with the default ``key_columns="contexts"``), and (with
    ``contrast_keep``) ``contrast.<layer>`` ``[m, d_ff]``, rows whose ``F^T F`` is the contrast statistics
    the edits kept; later ``create --on`` runs start their past-key statistics
    from both."""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", hashlib.sha256(serialize_deltas(self.deltas)).hexdigest())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Patch):
            return NotImplemented
        return self is other or (self.id == other.id and self.name == other.name)

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def parent_ids(self) -> list[str]:
        return [p.id for p in self.manifest.parents]

    @property
    def num_neurons(self) -> int:
        return sum(d.num_neurons for d in self.deltas)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas)

    def describe(self) -> str:
        return f"{self.name} ({self.id[:12]})"

    # -- writing ---------------------------------------------------------------------------------

    def manifest_json(self, deltas_sha256: str, state_sha256: str | None = None) -> dict[str, Any]:
        """The manifest as written to disk (keys in a fixed order)."""
        m = self.manifest
        data = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": m.tool_version,
            "name": m.name,
            "created_at": m.created_at,
            "base_model": m.base_model,
            "tensors": [
                {
                    "name": d.name,
                    "shape": list(d.shape),
                    "neuron_axis": d.neuron_axis,
                    "dtype": dtype_name(d.original.dtype),
                    "num_neurons": d.num_neurons,
                    "fingerprint": d.fingerprint,
                }
                for d in self.deltas
            ],
            "method": m.method,
            "requests": m.requests,
            "metrics": m.metrics,
            "parents": [{"name": p.name, "id": p.id} for p in m.parents],
            "deltas_file": DELTAS_FILE,
            "deltas_sha256": deltas_sha256,
            "notes": m.notes,
        }
        if state_sha256 is not None:
            data["state_file"] = STATE_FILE
            data["state_sha256"] = state_sha256
        return data

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False, card: bool = True) -> Patch:
        """Write the patch directory atomically (a temporary directory renamed into place).

        Returns the saved patch, with ``id`` and ``path`` set.
        """
        target = Path(path)
        check_deltas(self.deltas, str(target))  # never write what load_patch would refuse
        check_patch_target(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(target)
        try:
            payload = serialize_deltas(self.deltas)
            with open(staging / DELTAS_FILE, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            sha = hashlib.sha256(payload).hexdigest()
            check_parents_of(self.manifest.parents, sha, str(target))
            state_sha = None
            if self.state:
                state_payload = save(
                    {k: v.to(torch.float32).contiguous() for k, v in sorted(self.state.items())}
                )
                (staging / STATE_FILE).write_bytes(state_payload)
                state_sha = hashlib.sha256(state_payload).hexdigest()
            manifest = self.manifest
            if not manifest.created_at:
                manifest = replace(
                    manifest, created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat()
                )
            saved = replace(self, manifest=manifest, id=sha, path=target)
            try:
                text = json.dumps(
                    saved.manifest_json(sha, state_sha), indent=2, ensure_ascii=False, allow_nan=False
                )
            except ValueError as exc:  # readers refuse NaN and Infinity: never write them
                raise InvalidPatchError(
                    f"{target}: the manifest holds NaN or Infinity (in method, requests or metrics); JSON"
                    " has no such numbers"
                ) from exc
            except TypeError as exc:  # a tensor, a path, a tuple key, ... in method, requests or metrics
                raise InvalidPatchError(
                    f"{target}: the manifest holds a value JSON cannot hold ({exc})"
                ) from exc
            text += "\n"
            _check_writable_manifest(text, target)
            (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
            try:  # what a reader would refuse is never written
                read_manifest(staging)
            except InvalidPatchError as exc:
                reason = str(exc).replace(str(staging), str(target)).removeprefix(f"{target}: ")
                raise InvalidPatchError(f"{target}: the manifest would not be readable: {reason}") from exc
            if card:
                from .card import patch_card

                (staging / CARD_FILE).write_text(patch_card(saved), encoding="utf-8")
            move_into_place(staging, target, replace=overwrite)
            return saved
        finally:
            shutil.rmtree(staging, ignore_errors=True)


BASE_MODEL_KEYS = ("model_type", "architecture", "name_or_path", "revision")


def _normalised_name(name: Any) -> Any:
    """``name_or_path`` as compared: a local path with ``./``, ``//`` and a trailing ``/`` removed."""
    if not isinstance(name, str) or not name or "://" in name:
        return name
    return os.path.normpath(name)


def base_model_differences(a: Patch, b: Patch) -> list[str]:
    """The keys of :data:`BASE_MODEL_KEYS` on which the base models ``a`` and ``b`` were made on differ
    (``name_or_path`` compared as a normalised path)."""
    ours, theirs = a.manifest.base_model, b.manifest.base_model

    def compared(key: str, value: Any) -> Any:
        return _normalised_name(value) if key == "name_or_path" else value

    return [k for k in BASE_MODEL_KEYS if compared(k, ours.get(k)) != compared(k, theirs.get(k))]


PATCH_FILES = frozenset({MANIFEST_FILE, DELTAS_FILE, STATE_FILE, CARD_FILE})


def check_patch_target(target: Path, *, overwrite: bool = False) -> None:
    """Refuse a place to write a patch directory that is not free: something is already there (without
    ``overwrite``); or, since overwriting deletes it, anything but a patch directory (a file, a link, a
    directory without a manifest or holding other files); or a part of its parent path is a file or a
    broken link."""
    check_parents(target)
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose another place, or overwrite it (--overwrite)")
    deletes = "overwriting would delete it: choose another place"
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} is not a patch directory; {deletes}")
    entries = list(target.iterdir())
    foreign = sorted(p.name for p in entries if p.name not in PATCH_FILES or not p.is_file())
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{target} holds files that are not a patch's ({listed}); {deletes}")
    if entries and not (target / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{target} has no {MANIFEST_FILE}, so it is not a patch; {deletes}")


def serialize_deltas(deltas: tuple[TensorDelta, ...]) -> bytes:
    """The exact bytes of ``deltas.safetensors`` for ``deltas``."""
    tensors: dict[str, torch.Tensor] = {}
    for d in deltas:
        tensors[_tensor_key(d.name, "indices")] = d.indices.to(torch.int32).contiguous()
        tensors[_tensor_key(d.name, "delta")] = d.delta.to(torch.float32).contiguous()
        tensors[_tensor_key(d.name, "original")] = d.original.contiguous()
    return save(tensors, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading -----------------------------------------------------------------------------------------


def _require(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, what: str = "manifest"
) -> Any:
    """``obj[key]`` if present and of type ``kind``; ``what`` names ``obj`` in the error (``tensors[0]``)."""
    if key not in obj:
        raise InvalidPatchError(f"{where}: {what} is missing required field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidPatchError(f"{where}: {what} field {key!r} has the wrong type ({type(value).__name__})")
    return value


def check_shape(shape: Any, what: str) -> tuple[int, int]:
    """A declared weight shape: two positive ints, each at most :data:`MAX_DIM`, at most
    :data:`MAX_ELEMENTS` in all (a lying shape must not make readers or exporters allocate)."""
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise InvalidPatchError(
            f"{what} has an invalid shape {list(shape) if isinstance(shape, tuple) else shape!r}"
        )
    if max(shape) > MAX_DIM or shape[0] * shape[1] > MAX_ELEMENTS:
        raise InvalidPatchError(
            f"{what} declares shape {list(shape)}: larger than any supported weight (each dimension at most "
            f"{MAX_DIM}, at most {MAX_ELEMENTS} elements)"
        )
    return shape[0], shape[1]


def is_finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _require_file(file: Path, where: str) -> None:
    """Refuse a patch file that is absent, or is not a regular file (a device, a pipe, a directory, or a link
    to one: reading ``/dev/zero`` would never end)."""
    if not file.is_file():
        what = "is not a regular file" if file.exists() or file.is_symlink() else "is missing"
        raise InvalidPatchError(f"{where}: {file.name} {what}")


def _check_writable_manifest(text: str, target: Path) -> None:
    """Refuse, before it is written, manifest text that cannot be written as UTF-8 (a lone surrogate) or
    is more than :data:`MAX_MANIFEST_BYTES`; the rest of what a reader refuses is found by reading the
    written file back (:meth:`Patch.save`)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidPatchError(
            f"{target}: the manifest holds a string with a lone surrogate (in method, requests or metrics);"
            " UTF-8 has no such characters"
        ) from exc
    if size > MAX_MANIFEST_BYTES:
        raise InvalidPatchError(
            f"{target}: the manifest would be {size} bytes, more than readers accept ({MAX_MANIFEST_BYTES})"
        )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and structurally validate ``manifest.json`` of a patch directory (no tensors are read)."""
    root = Path(path)
    file = root / MANIFEST_FILE
    if not root.is_dir():
        raise InvalidPatchError(
            f"{root}: not a patch directory (expected NAME{PATCH_SUFFIX}/ with {MANIFEST_FILE})"
        )
    if not file.exists() and (root / "pack.json").is_file():
        raise InvalidPatchError(
            f"{root}: an edit pack, not a patch: commands and load_model take a pack where patches go; in"
            f" Python, resolve_patches([{str(root)!r}]) gives its patches"
        )
    _require_file(file, str(root))
    data = read_json_file(file, str(root), MAX_MANIFEST_BYTES)
    where = str(root)
    if not isinstance(data, dict):
        raise InvalidPatchError(f"{where}: {MANIFEST_FILE} must hold a JSON object")
    if data.get("format") != FORMAT_NAME:
        shown = repr(data.get("format"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InvalidPatchError(f"{where}: not an nmke-patch manifest (format={shown})")
    version = _require(data, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise InvalidPatchError(
            f"{where}: format version {version} is not supported by nmke-patch {__version__} (reads v{FORMAT_VERSION});"
            " upgrade nmke-patch"
        )
    for key, kind in (
        ("name", str),
        ("base_model", dict),
        ("tensors", list),
        ("method", dict),
        ("deltas_sha256", str),
    ):
        _require(data, key, kind, where)
    if len(data["name"]) > MAX_NAME_CHARS:
        raise InvalidPatchError(
            f"{where}: the patch name is {len(data['name']):,} characters long; at most {MAX_NAME_CHARS}"
        )
    if "name" in data["method"]:  # optional in v1 (format.md section 12): typed when given
        _require(data["method"], "name", str, where, "method")
    for key in ("requests", "metrics", "parents"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(x, dict) for x in data[key])):
            raise InvalidPatchError(f"{where}: manifest field {key!r} must be a list of objects")
    for i, metric in enumerate(data.get("metrics", [])):
        index = metric.get("index", i)
        if not isinstance(index, int) or isinstance(index, bool):
            raise InvalidPatchError(f"{where}: metrics[{i}].index must be an integer")
        for key in _NUMERIC_METRICS:
            if metric.get(key) is not None and not is_finite_number(metric[key]):
                raise InvalidPatchError(f"{where}: metrics[{i}].{key} must be a finite number or null")
    if data.get("deltas_file", DELTAS_FILE) != DELTAS_FILE:
        raise InvalidPatchError(f"{where}: deltas_file must be {DELTAS_FILE!r}")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        logger.warning("%s: ignoring unknown manifest fields %s", where, sorted(unknown))
    return data


def _validate_tensor_entry(
    entry: Any, index: int, where: str
) -> tuple[str, tuple[int, int], int, torch.dtype, int]:
    if not isinstance(entry, dict):
        raise InvalidPatchError(f"{where}: each entry of 'tensors' must be an object")
    what = f"tensors[{index}]"
    name = _require(entry, "name", str, where, what)
    for key in ("shape", "neuron_axis", "dtype", "num_neurons", "fingerprint"):
        if key not in entry:
            raise InvalidPatchError(f"{where}: {what} ({name!r}) is missing required field {key!r}")
    shape = check_shape(entry["shape"], f"{where}: tensor {name!r}")
    axis = _require(entry, "neuron_axis", int, where, what)
    if axis not in (0, 1):
        raise InvalidPatchError(f"{where}: tensor {name!r} has neuron_axis {axis}, expected 0 or 1")
    dtype_str = _require(entry, "dtype", str, where, what)
    if dtype_str not in _DTYPES:
        raise InvalidPatchError(f"{where}: tensor {name!r} has unsupported dtype {dtype_str!r}")
    k = _require(entry, "num_neurons", int, where, what)
    if k < 0 or k > shape[axis]:
        raise InvalidPatchError(f"{where}: tensor {name!r} claims {k} neurons of {shape[axis]}")
    return name, shape, axis, _DTYPES[dtype_str], k


def load_patch(path: str | os.PathLike[str]) -> Patch:
    """Read and fully validate a patch directory.

    Raises:
        InvalidPatchError: naming what is wrong: a missing or malformed file, a hash mismatch (tampering
            or truncation), unexpected or missing tensors, wrong dtypes or shapes, indices out of range,
            unsorted or duplicated, or non-finite values.
    """
    if not os.fspath(path):
        raise InvalidPatchError("an empty patch path (it would mean the current folder)")
    root = Path(path)
    data = read_manifest(root)
    where = str(root)
    deltas_path = root / DELTAS_FILE
    _require_file(deltas_path, where)
    entries = [_validate_tensor_entry(e, i, where) for i, e in enumerate(data["tensors"])]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise InvalidPatchError(f"{where}: a tensor is listed twice in the manifest")
    # read once, into memory: the hash checks the very bytes the tensors come from, and a file changed or
    # truncated later cannot change (or, memory-mapped, crash) a patch already loaded
    blob = _read_bounded(deltas_path, _most_bytes(entries), where)
    sha = hashlib.sha256(blob).hexdigest()
    if sha != data["deltas_sha256"]:
        raise DamagedFileError(
            f"{where}: {DELTAS_FILE} does not match the manifest's sha256 (file tampered with or truncated)"
        )
    expected_keys = {_tensor_key(n, part) for n in names for part in ("indices", "delta", "original")}
    deltas: list[TensorDelta] = []
    try:
        with one_thread():
            tensors = safetensors_load(blob)
        del blob
        keys = set(tensors)
        if keys != expected_keys:
            extra, missing = sorted(keys - expected_keys), sorted(expected_keys - keys)
            raise InvalidPatchError(
                f"{where}: {DELTAS_FILE} tensors do not match the manifest (unexpected {extra[:3]}, missing {missing[:3]})"
            )
        for (name, shape, axis, dtype, k), entry in zip(entries, data["tensors"], strict=True):
            indices = tensors.pop(_tensor_key(name, "indices"))
            delta = tensors.pop(_tensor_key(name, "delta"))
            original = tensors.pop(_tensor_key(name, "original"))
            deltas.append(
                _check_tensors(
                    where, name, shape, axis, dtype, k, indices, delta, original, entry["fingerprint"]
                )
            )
    except InvalidPatchError:
        raise
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise InvalidPatchError(f"{where}: {DELTAS_FILE} could not be read ({exc})") from exc
    parents = []
    for p in data.get("parents", []):
        if not isinstance(p, dict) or not isinstance(p.get("id"), str) or not isinstance(p.get("name"), str):
            raise InvalidPatchError(f"{where}: each parent must be an object with 'name' and 'id' strings")
        parents.append(ParentRef(name=p["name"], id=p["id"]))
    check_parents_of(parents, sha, where)
    manifest = Manifest(
        name=data["name"],
        base_model=data["base_model"],
        method=data["method"],
        requests=list(data.get("requests", [])),
        metrics=list(data.get("metrics", [])),
        parents=parents,
        created_at=str(data.get("created_at", "")),
        tool_version=str(data.get("tool_version", "")),
        notes=str(data.get("notes", "")),
    )
    return Patch(manifest=manifest, deltas=tuple(deltas), id=sha, path=root, state=_load_state(root, data))


def _most_bytes(entries: Sequence[tuple[str, tuple[int, int], int, torch.dtype, int]]) -> int:
    """The most bytes a deltas file of these manifest entries can hold: each tensor's int32 indices, float32
    deltas and originals of at most 8 bytes per value, plus a generous header."""
    payload = sum(k * (4 + (4 + 8) * shape[1 - axis]) for _name, shape, axis, _dtype, k in entries)
    return payload + (1 << 20) + 4096 * len(entries)


def _read_bounded(path: Path, most: int, where: str) -> bytes:
    """``path``'s bytes, refused unread where it is larger than ``most`` (what its manifest allows)."""
    size = path.stat().st_size
    if size > most:
        raise InvalidPatchError(
            f"{where}: {path.name} holds {size:,} bytes, more than the {most:,} its manifest's tensors can take"
        )
    with open(path, "rb") as fh:
        data = fh.read(most + 1)
    if len(data) > most:  # grew since
        raise InvalidPatchError(
            f"{where}: {path.name} holds more than the {most:,} bytes its manifest allows"
        )
    return data


def _load_state(root: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optional ``state.safetensors``: hash-checked, only finite float32 ``[T, D]`` tensors named
    ``keys.<layer>`` or ``contrast.<layer>`` (``<layer>`` in ASCII digits, no leading zero, at most
    :data:`MAX_LAYER`)."""
    if "state_sha256" not in data:
        return {}
    where = str(root)
    if data.get("state_file") != STATE_FILE or not isinstance(data["state_sha256"], str):
        raise InvalidPatchError(f"{where}: state_file must be {STATE_FILE!r} with a state_sha256 string")
    path = root / STATE_FILE
    _require_file(path, where)
    if _sha256_file(path) != data["state_sha256"]:
        raise DamagedFileError(
            f"{where}: {STATE_FILE} does not match the manifest's sha256 (tampered or truncated)"
        )
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if not _STATE_KEY_RE.fullmatch(key):
                    raise InvalidPatchError(
                        f"{where}: unexpected tensor {key!r} in {STATE_FILE} (expected keys.<layer> or "
                        f"contrast.<layer>, layer 0-{MAX_LAYER})"
                    )
                t = fh.get_tensor(key).clone()  # its own memory, not the file's: later changes to it stay out
                if t.dtype != torch.float32 or t.dim() != 2 or not all_finite(t):
                    raise InvalidPatchError(
                        f"{where}: {STATE_FILE} tensor {key!r} must be finite float32 [T, D]"
                    )
                state[key] = t
    except InvalidPatchError:
        raise
    except Exception as exc:
        raise InvalidPatchError(f"{where}: {STATE_FILE} could not be read ({exc})") from exc
    return state


def _check_tensors(
    where: str,
    name: str,
    shape: tuple[int, int],
    axis: int,
    dtype: torch.dtype,
    k: int,
    indices: torch.Tensor,
    delta: torch.Tensor,
    original: torch.Tensor,
    fingerprint: Any,
) -> TensorDelta:
    """The tensors of one manifest entry as a checked :class:`TensorDelta` (they must agree with the entry's
    ``dtype`` and ``num_neurons``)."""
    what = f"{where}: tensor {name!r}"
    if indices.dtype != torch.int32 or indices.dim() != 1 or indices.numel() != k:
        raise InvalidPatchError(f"{what}: indices must be int32 of length {k}")
    if original.dtype != dtype:
        raise InvalidPatchError(
            f"{what}: original must be {dtype_name(dtype)} of shape [{k}, {shape[1 - axis]}]"
        )
    if fingerprint is not None and not (isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint)):
        raise InvalidPatchError(f"{what}: fingerprint must be null or 'sha256:' and 64 lowercase hex digits")
    result = TensorDelta(
        name=name,
        shape=shape,
        neuron_axis=axis,
        indices=indices,
        delta=delta,
        original=original,
        fingerprint=fingerprint,
    )
    check_delta(result, where)
    return result


def check_delta(d: TensorDelta, where: str) -> None:
    """Refuse a :class:`TensorDelta` that breaks the format (docs/format.md): what ``load_patch`` refuses in a
    file, ``save`` refuses to write and the stack refuses to apply.

    Raises:
        InvalidPatchError: naming the tensor and the rule it breaks.
    """
    what = f"{where}: tensor {d.name!r}"
    shape = check_shape(d.shape, what)
    if d.neuron_axis not in (0, 1) or isinstance(d.neuron_axis, bool):
        raise InvalidPatchError(f"{what} has neuron_axis {d.neuron_axis!r}, expected 0 or 1")
    k, width = d.num_neurons, shape[1 - d.neuron_axis]
    if d.indices.dtype not in (torch.int32, torch.int64) or d.indices.dim() != 1:
        raise InvalidPatchError(f"{what}: indices must be a 1-D integer tensor")
    if k and (int(d.indices.min()) < 0 or int(d.indices.max()) >= shape[d.neuron_axis]):
        raise InvalidPatchError(f"{what}: neuron indices out of range [0, {shape[d.neuron_axis]})")
    if k > 1 and not bool((d.indices[1:] > d.indices[:-1]).all()):
        raise InvalidPatchError(f"{what}: neuron indices must be strictly ascending")
    if d.delta.dtype != torch.float32 or tuple(d.delta.shape) != (k, width):
        raise InvalidPatchError(f"{what}: delta must be float32 of shape [{k}, {width}]")
    if d.original.dtype not in _DTYPES.values() or tuple(d.original.shape) != (k, width):
        raise InvalidPatchError(
            f"{what}: original must be float32, bfloat16 or float16 of shape [{k}, {width}]"
        )
    if not all_finite(d.delta) or not all_finite(d.original):
        raise InvalidPatchError(f"{what}: non-finite values")


def check_parents_of(parents: Sequence[ParentRef], patch_id: str, where: str) -> None:
    """Refuse a parent list that names the patch itself or one parent twice (such a patch never applies)."""
    ids = [p.id for p in parents]
    if patch_id in ids:
        raise InvalidPatchError(f"{where}: the patch lists itself as a parent")
    if len(set(ids)) != len(ids):
        raise InvalidPatchError(f"{where}: a parent is listed twice")


def check_deltas(deltas: Sequence[TensorDelta], where: str) -> None:
    """:func:`check_delta` for each, and no tensor twice."""
    names = [d.name for d in deltas]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidPatchError(f"{where}: tensor(s) listed twice: {', '.join(twice)}")
    for d in deltas:
        check_delta(d, where)

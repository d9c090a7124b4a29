"""Resumable editing runs: a run's identity and its checkpoint (editor state + progress), written atomically.

Used by :func:`nmke_patch.create.create_patch` (``--resume``) and by ``benchmarks/lifelong.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import InvalidRequestError
from .methods.nmke.config import EditConfig
from .methods.nmke.engine import Editor, EditRecord
from .patch import Patch
from .paths import move_into_place, staging_dir
from .requests import EditRequest


def run_key(
    requests: Sequence[EditRequest],
    config: EditConfig,
    parents: Sequence[Patch],
    model: str | None = None,
) -> str:
    """sha256 of everything that determines a run's result: its requests, settings, parents and (when
    given) the base model's fingerprint, so a checkpoint is never resumed on other weights or dtype."""
    identity: dict[str, object] = {
        "requests": [r.to_json() for r in requests],
        "config": config.identity(),
        "parents": [p.id for p in parents],
    }
    if model is not None:
        identity["model"] = model
    payload = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_checkpoint(folder: Path, editor: Editor, next_index: int, run_key: str) -> None:
    """Replace ``folder`` atomically with the editor's state and the index of the next request."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(folder)
    state = save(editor.state_tensors())
    (staging / "state.safetensors").write_bytes(state)
    (staging / "progress.json").write_text(
        json.dumps(
            {
                "run_key": run_key,
                "next_index": next_index,
                "records": [r.to_json() for r in editor.records],
                "state_sha256": hashlib.sha256(state).hexdigest(),  # binds the state to this progress
            }
        )
    )
    move_into_place(staging, folder)


def refuse_interrupted_run(folder: Path, run_key: str | None = None, total: int | None = None) -> None:
    """Refuse to start over on top of ``folder``'s checkpoint of an interrupted run: without ``resume`` it
    would be overwritten, and hours of edits with it. Given ``run_key`` and ``total``, the checkpoint of
    this same run, finished, is no loss and is let be."""
    progress = folder / "progress.json"
    if not progress.is_file():
        return
    try:
        data = json.loads(progress.read_text())
        done = f" ({int(data['next_index'])} edits done)"
        if run_key is not None and data["run_key"] == run_key and int(data["next_index"]) >= (total or 0):
            return
    except (ValueError, KeyError, TypeError, OSError):
        done = ""
    raise InvalidRequestError(
        f"{folder} holds the checkpoint of an interrupted run{done}: add --resume (resume=True) to continue "
        "it, or delete it to start over"
    )


def _different_run(folder: Path) -> InvalidRequestError:
    return InvalidRequestError(
        f"checkpoint {folder} belongs to a different run (facts, settings, parents or base model differ);"
        " delete it to start over"
    )


def check_run_key(folder: Path, run_key: str) -> None:
    """Refuse ``folder``'s checkpoint at once if it is another run's (cheap: before the statistics); one
    that cannot be read is left to :func:`load_checkpoint`, which names it damaged."""
    try:
        data = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and isinstance(data.get("run_key"), str) and data["run_key"] != run_key:
        raise _different_run(folder)


def load_checkpoint(
    folder: Path, run_key: str, total: int | None = None
) -> tuple[int, dict[str, torch.Tensor], list[EditRecord]] | None:
    """``(next_index, state tensors, records)`` of the checkpoint in ``folder``, or None if there is none.
    ``total``: the run's number of requests, which ``next_index`` may not exceed.

    Raises:
        InvalidRequestError: the checkpoint belongs to another run, or it is damaged.
    """
    progress = folder / "progress.json"
    if not progress.is_file():
        return None
    try:
        data = json.loads(progress.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("progress.json is not an object")
        if data.get("run_key") != run_key:
            raise _different_run(folder)
        records = [EditRecord.from_json(r) for r in data["records"]]
        next_index = data["next_index"]
        if not isinstance(next_index, int) or isinstance(next_index, bool) or next_index < 0:
            raise ValueError(f"next_index {next_index!r} is not a count")
        if total is not None and next_index > total:
            raise ValueError(f"next_index {next_index} is beyond the run's {total} requests")
        if len(records) != next_index:
            raise ValueError(f"{len(records)} edit records for {next_index} edits done")
        state = (folder / "state.safetensors").read_bytes()
        if hashlib.sha256(state).hexdigest() != data["state_sha256"]:
            raise ValueError("state.safetensors is not the state progress.json was saved with")
        tensors = load(state)
    except (ValueError, KeyError, TypeError, FileNotFoundError, SafetensorError) as exc:
        if isinstance(exc, InvalidRequestError):
            raise
        raise damaged_checkpoint(folder, exc) from exc  # JSON, fields, counts, state file: one clear line
    return next_index, tensors, records


def damaged_checkpoint(folder: Path, exc: BaseException) -> InvalidRequestError:
    """The error for a checkpoint that cannot be read back."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    reason = (text.strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, KeyError) and not reason.startswith("missing"):
        reason = f"missing {reason}"
    return InvalidRequestError(f"checkpoint {folder} is damaged ({reason}); delete it to start over")

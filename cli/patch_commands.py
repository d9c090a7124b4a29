"""``inspect``, ``apply``, ``revert`` and ``verify``: working with existing patches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from nmke_patch.errors import PatchMismatchError
from nmke_patch.merged import (
    RECORD_FILE,
    MergedPatch,
    check_apply,
    check_revert,
    names,
    read_record,
    write_record,
)
from nmke_patch.patch import Patch
from nmke_patch.paths import give_umask_permissions, move_into_place, staging_dir
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack

if TYPE_CHECKING:
    from nmke_patch.models import BaseModelInfo

from .common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PatchesArg,
    check_out_dir,
    console,
    err_console,
    labelled,
    shown,
)


def patch_summary(patch: Patch) -> dict[str, Any]:
    """What ``inspect --json`` prints for one patch."""
    m = patch.manifest
    return {
        "name": m.name,
        "id": patch.id,
        "path": str(patch.path) if patch.path else None,
        "created_at": m.created_at,
        "tool_version": m.tool_version,
        "base_model": m.base_model,
        "method": m.method,
        "parents": [{"name": p.name, "id": p.id} for p in m.parents],
        "tensors": [
            {
                "name": d.name,
                "neurons": d.num_neurons,
                "of_neurons": d.shape[d.neuron_axis],
                "share": d.num_neurons / d.shape[d.neuron_axis],
                "bytes": d.nbytes,
                "dtype": str(d.original.dtype).removeprefix("torch."),
            }
            for d in patch.deltas
        ],
        "total_neurons": patch.num_neurons,
        "payload_bytes": patch.nbytes,
        "requests": m.requests,
        "metrics": m.metrics,
    }


def _print_summary(patch: Patch) -> None:
    s = patch_summary(patch)
    console.print(
        labelled(
            shown(s["name"]),
            "bold",
            f" id {s['id'][:16]}  created {s['created_at']} (nmke-patch {s['tool_version']})",
        )
    )
    base = s["base_model"]
    console.print(
        shown(
            f"base: {base.get('name_or_path')} [{base.get('architecture')}]  method: {s['method'].get('name')}"
        )
    )
    if s["parents"]:
        console.print("parents: " + ", ".join(f"{shown(p['name'])} ({p['id'][:12]})" for p in s["parents"]))
    table = Table(title="edited tensors")
    for col in ("tensor", "neurons", "share", "bytes", "dtype"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for t in s["tensors"]:
        table.add_row(
            shown(t["name"]),
            f"{t['neurons']}/{t['of_neurons']}",
            f"{t['share']:.1%}",
            f"{t['bytes']:,}",
            t["dtype"],
        )
    console.print(table)
    console.print(
        f"total: {s['total_neurons']} neuron value vectors, {s['payload_bytes']:,} bytes of payload"
    )
    metrics = {int(x.get("index", i)): x for i, x in enumerate(s["metrics"])}
    facts = Table(title=f"facts ({len(s['requests'])}): P(new) before, right after its edit, after all edits")
    for col in ("#", "prompt", "new target", "before", "after edit", "after all"):
        facts.add_column(col)
    for i, r in enumerate(s["requests"]):
        mx = metrics.get(i, {})
        fmt = lambda v: "" if v is None else f"{float(v):.3f}"  # noqa: E731
        facts.add_row(
            str(i),
            shown(str(r.get("prompt", "")).replace("{}", str(r.get("subject", "")))),
            shown(r.get("target_new", "")),
            fmt(mx.get("p_new_before")),
            fmt(mx.get("p_new_after")),
            fmt(mx.get("p_new_final")),
        )
    console.print(facts)


def inspect(patches: PatchesArg, as_json: JsonOpt = False) -> None:
    """Show what a patch edits: tensors, neurons touched, bytes, base model, method and the facts."""
    resolved = resolve_patches(patches)
    if as_json:
        out = [patch_summary(p) for p in resolved]
        typer.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2, default=str))
        return
    for p in resolved:
        _print_summary(p)


def _load(model: str | None, device: str | None, dtype: str | None) -> tuple[Any, Any, BaseModelInfo]:
    from nmke_patch.models import load_base

    with console.status("loading model"):
        return load_base(model, device=device, dtype=dtype)


def _save(model: Any, tokenizer: Any, out: Path, merged: list[MergedPatch] | None) -> None:
    """Save the model in a staging folder next to ``out`` and move it into place, so an interrupted save
    leaves ``out`` as it was; with its record of ``merged`` patches (none where that is not known)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)
    try:
        with console.status(escape(f"saving to {out}")):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            give_umask_permissions(sorted(staging.glob("model*.safetensors")))  # what save_pretrained wrote
            if merged is not None:
                write_record(staging, merged)
            _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Move a saved model from ``staging`` to ``out``: the whole folder when ``out`` is new or empty; into an
    existing folder (``--overwrite``) file by file, other files kept, the old record removed first and the
    new one written last, so an interruption never leaves a record that does not match the weights."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        move_into_place(staging, out)
        return
    (out / RECORD_FILE).unlink(missing_ok=True)
    for old in out.glob("model*.safetensors*"):  # the shards (and index) of the model being replaced
        old.unlink()
    record = staging / RECORD_FILE
    for file in sorted(staging.iterdir()):
        if file != record:
            os.replace(file, out / file.name)
    if record.exists():
        os.replace(record, out / RECORD_FILE)


def _ancestor_names(patch: Patch, by_id: dict[str, Patch]) -> set[str]:
    """Names of the patches ``patch`` was made on top of, parents of parents included (among ``by_id``)."""
    found: set[str] = set()
    todo = list(patch.manifest.parents)
    while todo:
        ref = todo.pop()
        if ref.name not in found:
            found.add(ref.name)
            if ref.id in by_id:
                todo.extend(by_id[ref.id].manifest.parents)
    return found


def apply(
    patches: PatchesArg,
    out: OutOpt,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Apply patches in order to a base model and save the merged model (loadable by plain transformers).

    The merged model's nmke_patches.json lists what it holds (after what --model held already), so that
    `revert` can check it is given the right patches."""
    check_out_dir(out, model, overwrite)
    resolved = resolve_patches(patches)  # validate every patch before loading anything
    held = (read_record(model) or []) if force else check_apply(model, resolved)
    loaded, tokenizer, _ = _load(model, device, dtype)
    stack = PatchStack.for_model(loaded)
    by_id = {p.id: p for p in resolved}
    for p in resolved:
        for o in stack.apply(p, force=force):
            if o.other in _ancestor_names(p, by_id):
                continue  # a patch made on top of another touches its neurons by design
            console.print(
                labelled(
                    "overlap:",
                    "yellow",
                    f"{p.name} and {o.other} both touch {o.num_neurons} neurons of {o.tensor}",
                )
            )
    _save(loaded, tokenizer, out, held + [MergedPatch.of(p) for p in resolved])
    console.print(f"applied {len(resolved)} patch(es); merged model saved to {out}")
    params = dict(loaded.named_parameters())
    narrow = sorted(
        {
            p.name
            for p in resolved
            for d in p.deltas
            if torch.finfo(d.original.dtype).bits < torch.finfo(params[d.name].dtype).bits
        }
    )
    if narrow:
        console.print(
            labelled(
                "note:",
                "yellow",
                f"{', '.join(narrow)} recorded weights in a narrower dtype than this model's, so `revert` "
                "cannot restore this model's own values from the merged copy; keep the base (unloading in "
                "memory stays exact)",
            )
        )


def revert(
    patches: PatchesArg,
    model: Annotated[str, typer.Option("--model", "-m", help="The merged model directory (from `apply`).")],
    out: OutOpt,
    force: Annotated[
        bool,
        typer.Option(
            help="Revert even where the weights are not the base plus these patches, or they are not the last "
            "ones nmke_patches.json lists: the result is then neither the base nor any recorded state."
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Exactly revert patches from a saved merged model: the result is bit-identical to the model without
    them (the base, once all are reverted).

    Give the patches last applied, in the order they were applied; nmke_patches.json (written by `apply`)
    says which those are and is rewritten with what stays merged."""
    check_out_dir(out, model, overwrite)
    resolved = resolve_patches(patches)
    try:
        left = check_revert(model, resolved)
    except PatchMismatchError:
        if not force:
            raise
        left = None
    loaded, tokenizer, _ = _load(model, None, None)
    stack = PatchStack.for_model(loaded)
    exact = True
    try:
        stack.adopt(resolved)
    except PatchMismatchError:
        if not force:
            raise
        stack.adopt(resolved, force=True)
        exact = False
    stack.unload_all()
    if not exact:
        _save(loaded, tokenizer, out, None)
        console.print(
            labelled(
                "warning:",
                "yellow",
                f"forced: {model} was not the base plus these patches, so {out} is neither the base nor any "
                "state nmke-patch made; no nmke_patches.json written",
            )
        )
        return
    _save(loaded, tokenizer, out, left)
    if left is None:
        console.print(
            f"reverted {len(resolved)} patch(es); saved to {out}: exactly {model} without them "
            f"({model} kept no nmke_patches.json, so what else it holds is not known)"
        )
    elif left:
        console.print(
            f"reverted {len(resolved)} patch(es); saved to {out}, which still has {names(left)} merged"
        )
    else:
        console.print(f"reverted {len(resolved)} patch(es); base model saved to {out}")


def verify(
    patches: PatchesArg,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Check that patches fit a base model (applied in order, in memory; nothing is saved)."""
    resolved = resolve_patches(patches)
    loaded, _, info = _load(model, device, dtype)
    stack = PatchStack.for_model(loaded)
    for p in resolved:
        stack.check(p, fingerprints=True)
        stack.apply(p)
        console.print(
            labelled(
                "ok",
                "green",
                f"{p.describe()}: {len(p.deltas)} tensors, {p.num_neurons} neurons match the base",
            )
        )
        recorded = {k: p.manifest.base_model.get(k) for k in ("architecture", "model_type")}
        actual = {"architecture": info.architecture, "model_type": info.model_type}
        named = all(isinstance(v, str) for v in recorded.values())  # both are optional (docs/format.md)
        if named and recorded != actual:  # names do not decide the fit, but a user should see this
            err_console.print(
                labelled(
                    "note:",
                    "yellow",
                    f"{p.describe()} records its base as {recorded['architecture']} "
                    f"({recorded['model_type']}), this model is {info.architecture} ({info.model_type}); "
                    "the weights match, so it applies, but its manifest's record of the base is wrong",
                ),
                soft_wrap=True,
            )


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("apply")(apply)
    app.command("revert")(revert)
    app.command("verify")(verify)

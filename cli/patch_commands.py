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

from nmke_patch.card import filled_prompt
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
from nmke_patch.paths import give_umask_permissions, move_into_place, staging_dir, written_meanwhile
from nmke_patch.sources import is_pack, resolve_patches
from nmke_patch.stack import PatchStack, check_lineage

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
    check_in_order,
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
            shown(filled_prompt(r)),
            shown(r.get("target_new", "")),
            fmt(mx.get("p_new_before")),
            fmt(mx.get("p_new_after")),
            fmt(mx.get("p_new_final")),
        )
    console.print(facts)


def inspect(patches: PatchesArg, as_json: JsonOpt = False) -> None:
    """Show what a patch edits: tensors, neurons touched, bytes, base model, method and the facts.

    With --json: one object for one patch directory; a list (in order) for several patches or any pack,
    however many patches it holds."""
    resolved = resolve_patches(patches)
    if as_json:
        out = [patch_summary(p) for p in resolved]
        one_patch = len(patches) == 1 and not is_pack(patches[0])
        typer.echo(json.dumps(out[0] if one_patch else out, indent=2, default=str))
        return
    for p in resolved:
        _print_summary(p)


def _load(model: str | None, device: str | None, dtype: str | None) -> tuple[Any, Any, BaseModelInfo]:
    from nmke_patch.models import load_base

    with console.status("loading model"):
        return load_base(model, device=device, dtype=dtype)


def _save(
    model: Any, tokenizer: Any, out: Path, merged: list[MergedPatch] | None, *, overwrite: bool
) -> None:
    """Save the model with its record of ``merged`` patches (none where that is not known).

    A new ``out`` is written in a staging folder beside it and renamed into place: an interrupted save
    leaves nothing. Into an existing folder (empty, or ``--overwrite``; maybe a mount point or a link) the
    files are staged inside it, so every move stays on its filesystem; its old record goes first and the new
    one comes last, so an interrupted save never leaves a record that does not match the weights."""
    with console.status(escape(f"saving to {out}")):
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = staging_dir(out)
            try:
                _write_model(model, tokenizer, staging, merged)
                move_into_place(staging, out, replace=False)  # another writer's folder meanwhile: refused
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        if not overwrite and any(out.iterdir()):  # empty when checked; something else wrote there since
            raise written_meanwhile(out)
        staging = staging_dir(out / "model")
        try:
            _write_model(model, tokenizer, staging, merged)
            _move_files_into(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _write_model(model: Any, tokenizer: Any, folder: Path, merged: list[MergedPatch] | None) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    give_umask_permissions(sorted(folder.glob("model*.safetensors")))  # what save_pretrained wrote
    if merged is not None:
        write_record(folder, merged)


def _move_files_into(staging: Path, out: Path) -> None:
    """Move the saved files from ``staging`` into the existing folder ``out`` (other files kept), the old
    record removed first and the new one moved last; old weight shards the new save did not replace go."""
    names = {f.name for f in staging.iterdir()}
    blocked = sorted(n for n in names if (out / n).is_dir() and not (out / n).is_symlink())
    if blocked:
        raise IsADirectoryError(f"{out}: {', '.join(blocked)} is a folder where the saved model has a file")
    (out / RECORD_FILE).unlink(missing_ok=True)
    for name in sorted(names - {RECORD_FILE}):
        os.replace(staging / name, out / name)
    for old in out.glob("model*.safetensors*"):  # shards (and index) of the model that was there
        if old.name not in names:
            old.unlink()
    if RECORD_FILE in names:
        os.replace(staging / RECORD_FILE, out / RECORD_FILE)


def _ancestor_ids(patch: Patch, by_id: dict[str, Patch]) -> set[str]:
    """Ids of the patches ``patch`` was made on top of, parents of parents included (among ``by_id``)."""
    found: set[str] = set()
    todo = list(patch.manifest.parents)
    while todo:
        ref = todo.pop()
        if ref.id not in found:
            found.add(ref.id)
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
    held = check_apply(model, resolved)
    if not force:
        check_lineage(resolved, [m.id for m in held])  # what the stack would refuse, before the model loads
    loaded, tokenizer, _ = _load(model, device, dtype)
    stack = PatchStack.for_model(loaded)
    stack.declare_merged(held)  # children of merged patches apply on top of them
    by_id = {p.id: p for p in resolved}
    forced = []
    for p in resolved:
        try:
            overlaps = stack.apply(p)
        except PatchMismatchError:
            if not force:
                raise
            overlaps = stack.apply(p, force=True)
            forced.append(p.name)
        for o in overlaps:
            if o.other_id in _ancestor_ids(p, by_id):
                continue  # a patch made on top of another touches its neurons by design
            console.print(
                labelled(
                    "overlap:",
                    "yellow",
                    f"{p.name} and {o.other} both touch {o.num_neurons} neurons of {o.tensor} (their deltas add "
                    f"up; `revert` takes {p.name} off the saved model only together with "
                    f"{by_id[o.other_id].name if o.other_id in by_id else o.other})",
                )
            )
    _save(
        loaded,
        tokenizer,
        out,
        None if forced else held + [MergedPatch.of(p) for p in resolved],
        overwrite=overwrite,
    )
    console.print(f"applied {len(resolved)} patch(es); merged model saved to {out}")
    if forced:
        console.print(
            labelled(
                "warning:",
                "yellow",
                f"forced: {', '.join(forced)} did not fit the model, so {out} is not a base plus patches that "
                "`revert` can undo exactly; no nmke_patches.json written",
            )
        )
    params = dict(loaded.named_parameters())
    narrow = sorted(
        {
            p.name
            for p in resolved
            for d in p.deltas
            if torch.finfo(d.original.dtype).bits < torch.finfo(params[d.name].dtype).bits
        }
    )
    wide_children = sorted(
        {
            p.name
            for p in resolved
            if p.manifest.parents
            for d in p.deltas
            if torch.finfo(d.original.dtype).bits > torch.finfo(params[d.name].dtype).bits
        }
    )
    if wide_children and not forced:
        console.print(
            labelled(
                "note:",
                "yellow",
                f"{', '.join(wide_children)} ({len(wide_children)} patch(es) made on top of parents) recorded a wider "
                f"dtype than this model's {loaded.dtype}: `revert` takes them off only together with their "
                "parents",
            )
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
            "--force",
            help="Revert even where the weights are not the base plus these patches, or they are not the last "
            "ones nmke_patches.json lists: the result is then neither the base nor any recorded state.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Exactly revert patches from a saved merged model (bit-identical to the model without them).

    Once all are reverted, the result is the base. Give the patches last applied, in the order they were applied; nmke_patches.json (written by `apply`)
    says which those are and is rewritten with what stays merged."""
    check_out_dir(out, model, overwrite)
    resolved = resolve_patches(patches)
    record = read_record(model)
    try:
        left = check_revert(model, resolved)
    except PatchMismatchError:
        if not force:
            raise
        given = {p.id for p in resolved}  # forced past the record's order: it still says what stays
        listed = record is not None and given <= {m.id for m in record}
        left = [m for m in record if m.id not in given] if record is not None and listed else None
    loaded, tokenizer, _ = _load(model, None, None)
    stack = PatchStack.for_model(loaded)
    exact = True
    try:
        stack.adopt(resolved)
    except PatchMismatchError as exc:
        if not force and left:
            raise PatchMismatchError(
                f"{exc}. If {', '.join(p.name for p in resolved)} shares neurons with {names(left)}, merged "
                "before it without being its parent (apply reported the overlap), or the chain was merged in a "
                "narrower dtype than it was made in, the values there are not recorded in it: revert them "
                f"together, passing their patches too, oldest first ({names(left)}, then these); otherwise "
                f"{model} was changed after it was saved"
            ) from exc
        if not force:
            raise
        stack.adopt(resolved, force=True)
        exact = False
    stack.unload_all()
    if not exact:
        _save(loaded, tokenizer, out, None, overwrite=overwrite)
        console.print(
            labelled(
                "warning:",
                "yellow",
                f"forced: {model} was not the base plus these patches, so {out} is neither the base nor any "
                "state nmke-patch made; no nmke_patches.json written",
            )
        )
        return
    _save(loaded, tokenizer, out, left, overwrite=overwrite)
    if left is None:
        why = "kept no nmke_patches.json" if record is None else "lists in nmke_patches.json not all of them"
        console.print(
            f"reverted {len(resolved)} patch(es); saved to {out}: exactly {model} without them "
            f"({model} {why}, so what else it holds is not known; no record written)"
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
    held = check_apply(model, resolved)  # what a merged model holds: refused again, parents for children
    check_lineage(resolved, held)  # what the stack would refuse, before the model loads
    loaded, _, info = _load(model, device, dtype)

    def report(p: Patch) -> None:
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

    check_in_order(loaded, held, resolved, report)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("apply")(apply)
    app.command("revert")(revert)
    app.command("verify")(verify)

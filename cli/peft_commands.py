"""``export-peft``: write patches as a PEFT adapter (LoRA or SHiRA) for ``PeftModel.from_pretrained``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from nmke_patch.export.peft import export_peft
from nmke_patch.patch import Patch
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import check_lineage

from .common import OutOpt, OverwriteOpt, PatchesArg, check_in_order, check_out_dir, console, labelled


class PeftFormatChoice(str, Enum):
    lora = "lora"
    shira = "shira"


def export_peft_command(
    patches: PatchesArg,
    out: OutOpt,
    fmt: Annotated[
        PeftFormatChoice,
        typer.Option(
            "--format",
            help="lora: any architecture. shira: sparse, nn.Linear models only. Both are exact where no two "
            "patches share a neuron (else within rounding there: n ulp for n patches on a neuron).",
        ),
    ] = PeftFormatChoice.lora,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            help="LoRA only: truncate each module to this rank by SVD (lossy; error reported).",
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="base_model_name_or_path to record in the adapter config (default: the patches'); also "
            "asserts that the patches share this base, so differing recorded names only warn.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Also check that the patches fit this base model, as `verify` does, before writing (PEFT "
            "itself cannot tell a wrong base). Default: no model is loaded (see --check).",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Check the fit before writing, as `verify` does, on --model or, without it, on the "
            "embedded default model.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export patches (composed in order) as a PEFT adapter directory, loadable without nmke-patch."""
    check_out_dir(out, overwrite=overwrite)
    resolved = resolve_patches(patches)
    check_lineage(resolved)  # what the export refuses, before a model loads
    loaded = _check_fit(model, resolved) if model is not None or check else None
    report = export_peft(
        resolved,
        out,
        fmt="shira" if fmt is PeftFormatChoice.shira else "lora",
        rank=rank,
        base_model_name_or_path=base_model,
        model=loaded,
    )
    for warning in report.warnings:
        console.print(labelled("warning:", "yellow", warning))
    ranks = sorted(set(report.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per module)"
    console.print(
        f"exported {len(resolved)} patch(es) as {report.format.upper()} to {report.path}: "
        f"{len(report.modules)} modules, rank {rank_text}, {report.adapter_bytes:,} bytes"
    )
    if report.relative_error == 0:
        console.print(
            f"not truncated: --rank {rank} is at least every module's exact rank (touched neurons, or the "
            f"residual width if fewer), so ranks were capped at {rank_text}; as exact as a full-rank export"
        )
    if report.exact:
        unchecked = "" if loaded is not None else " on a base they fit (not checked: add --check or --model)"
        console.print(f"exact: merge_and_unload() reproduces the patched weights bit for bit{unchecked}")
    elif not report.relative_error:
        shared = sum(report.shared_neurons.values())
        console.print(
            f"within rounding where patches share neurons ({shared} neurons in {len(report.shared_neurons)} "
            "modules; n ulp for n patches on a neuron, docs/peft.md): merge_and_unload() adds their "
            "summed delta; elsewhere exact"
        )
    else:
        worst = max(report.module_errors.items(), key=lambda kv: kv[1])
        console.print(
            labelled(
                "lossy:",
                "yellow",
                f"relative Frobenius error {report.relative_error:.3g} overall (worst {worst[1]:.3g} in {worst[0]})",
            )
        )
    console.print(f"load with: PeftModel.from_pretrained(base_model, {str(report.path)!r})", highlight=False)


def _check_fit(model: str | None, patches: list[Patch]) -> Any:
    """The base model ``model`` (``None``: the embedded default), once every patch has been checked to fit
    it in order (then removed)."""
    from nmke_patch.merged import check_apply
    from nmke_patch.models import load_base

    held = check_apply(model, patches)  # a merged model's record: a patch it holds is refused
    with console.status("loading model"):
        loaded, _, _ = load_base(model)
    check_in_order(loaded, held, patches, lambda _p: None)
    where = model if model is not None else "the embedded default model"
    console.print(labelled("ok", "green", f"{len(patches)} patch(es) fit {where}"), highlight=False)
    return loaded


def register(app: typer.Typer) -> None:
    app.command("export-peft")(export_peft_command)

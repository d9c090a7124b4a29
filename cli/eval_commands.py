"""``eval``: evaluate a base model and the same model with patches applied, side by side."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from nmke_patch.errors import InvalidRequestError, NmkePatchError
from nmke_patch.lengths import TooLongError
from nmke_patch.merged import RECORD_FILE, check_apply, names
from nmke_patch.patch import Patch
from nmke_patch.paths import check_writable
from nmke_patch.requests import read_requests
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack, check_lineage

from .common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    PatchesArg,
    console,
    err_console,
    labelled,
    shown,
)

SHARES = (
    "efficacy",
    "generalization",
    "specificity",
    "zsre_accuracy",
    "zsre_paraphrase_accuracy",
    "zsre_neighborhood_accuracy",
    "zsre_neighborhood_agreement",
    "unrelated_accuracy",
    "unrelated_retention",
)
"""Metrics that are shares in [0, 1] (plotted together, shown as percentages)."""


def idle_threads() -> int:
    """Intra-op threads worth using now: torch's default, less the cores other processes keep busy."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


class PlotUnavailableError(NmkePatchError, ImportError):
    """``--plot`` needs matplotlib."""


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError(
            "--plot needs matplotlib: pip install 'nmke-patch[plot]' (or pip install matplotlib)"
        ) from exc
    return plt


def _rows(result: dict[str, Any]) -> list[tuple[str, str, float | None, float | None]]:
    """``(key, label, base, patched)`` in display order; drift figures have no base value of their own."""
    from nmke_patch.evaluate import METRICS

    base, patched, comp = result["base"]["metrics"], result["patched"]["metrics"], result["comparison"]
    rows = []
    for key, label in METRICS.items():
        if key in comp:
            # the base agrees with itself: 100%, where there is anything to agree on
            reference = {"zsre_neighborhood_agreement": 1.0, "unrelated_retention": 1.0}.get(key)
            reference = None if comp[key] is None else reference
            rows.append((key, label, reference, comp[key]))
        elif key in patched:
            rows.append((key, label, base.get(key), patched.get(key)))
    return rows


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in SHARES:
        return f"{value:.1%}"
    if key.endswith("_pct"):
        return f"{value:+.2f}%"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _change(key: str, base: float | None, patched: float | None) -> str:
    if base is None or patched is None or key.endswith("_pct") or key == "fluency_change":
        return ""
    diff = patched - base
    if key in SHARES:
        return f"{diff * 100:+.1f} pt"
    if key == "perplexity" and base:
        return f"{diff / base:+.2%}"
    return f"{diff:+.4g}"


def _spans(numbers: list[int]) -> str:
    """``4-8`` for consecutive numbers, ``2-3, 7`` otherwise."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


def _print_table(result: dict[str, Any], title: str) -> None:
    from nmke_patch.evaluate import layer_index

    table = Table(title=title)
    for col in ("metric", "base", "patched", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, base, patched in _rows(result):
        if key in ("fluency_change", "perplexity_drift_pct"):  # shown as the change of their metric
            continue
        # agreement and retention compare with the base, which agrees with itself: 100% -> patched
        table.add_row(label, _fmt(key, base), _fmt(key, patched), _change(key, base, patched))
    fp = result["comparison"]["footprint"]
    table.add_section()
    tensors = list(fp["tensors"].items())
    label, touched = "neurons touched per layer", "none"
    if tensors:
        layers = _spans([i for name, _ in tensors if (i := layer_index(name)) is not None])
        label = f"neurons/layer, layers {layers}" if len(tensors) > 1 else f"neurons, layer {layers}"
        touched = (
            f"{_range([t['neurons'] for _, t in tensors])} of {_range([t['of_neurons'] for _, t in tensors])}"
        )
    table.add_row(label, "", touched, f"{fp['mean_share']:.1%} mean")
    table.add_row("parameters changed", "", f"{fp['parameters_changed']:,}", "")
    table.add_row(
        "patch bytes",
        "",
        f"{fp['patch_bytes']:,}",
        f"{fp['patch_bytes'] / max(1, fp['dense_bytes']):.1%} of a dense patch",
    )
    console.print(table)
    counts = result["patched"]["counts"]
    if counts["with_target_true"] < counts["requests"]:
        console.print(
            f"{counts['with_target_true']} of {counts['requests']} records have target_true: efficacy and "
            "generalization are measured on those only (docs/evaluation.md)"
        )


def _chart_path(path: Path) -> Path:
    """Where ``--plot PATH`` writes: PATH, with ``.png`` added unless it ends in an image extension
    (``.png``, ``.svg``, ``.pdf``, ``.jpg``); refused when it is a directory."""
    if not str(path).strip() or str(path) == ".":
        raise NmkePatchError("--plot needs a file name, such as eval.png")
    if path.is_dir():
        raise NmkePatchError(f"--plot {path} is a directory; give a file name such as {path / 'eval.png'}")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise NmkePatchError(f"--plot {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise NmkePatchError(f"--plot {path}: folder {folder} does not exist")
    try:  # by trying: os.access is true for root on read-only and virtual file systems (/proc)
        check_writable(Path(f"--plot {path}"), folder)
    except OSError as exc:
        raise NmkePatchError(str(exc)) from exc
    if path.suffix.lower() in {".png", ".svg", ".pdf", ".jpg", ".jpeg"}:
        return path
    return path.with_name(path.name + ".png")


def _plot(result: dict[str, Any], path: Path, title: str) -> None:
    plt = _require_matplotlib()
    rows = _rows(result)
    names = {
        "efficacy": "efficacy",
        "generalization": "generalization",
        "specificity": "specificity",
        "zsre_accuracy": "ZsRE acc",
        "zsre_paraphrase_accuracy": "ZsRE acc\n(paraphrases)",
        "zsre_neighborhood_accuracy": "ZsRE acc\n(neighbours)",
        "zsre_neighborhood_agreement": "neighbours\nagree w/ base",
        "unrelated_accuracy": "unrelated\nanswered",
        "unrelated_retention": "unrelated\nretention",
    }
    shares = [(names[key], b, p) for key, _, b, p in rows if key in SHARES and p is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]})
    xs = range(len(shares))
    ax.bar([x - 0.2 for x in xs], [b or 0.0 for _, b, _ in shares], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [p or 0.0 for _, _, p in shares], 0.4, label="patched")
    ax.set_xticks(list(xs), [s[0] for s in shares], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.legend()
    ax.set_title(title.replace("$", r"\$"))  # a '$' in a file or patch name is not mathtext
    b, p = result["base"]["metrics"], result["patched"]["metrics"]
    health = [k for k in ("perplexity", "fluency") if b.get(k) is not None and p.get(k) is not None]
    ax2.bar([i - 0.2 for i in range(len(health))], [b[k] for k in health], 0.4, label="base")
    ax2.bar([i + 0.2 for i in range(len(health))], [p[k] for k in health], 0.4, label="patched")
    ax2.set_xticks(list(range(len(health))), health)
    ax2.set_title("model health")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_command(
    patches: PatchesArg,
    facts: Annotated[
        Path,
        typer.Option(
            "--facts",
            "-f",
            help="Facts to evaluate on (same formats as `create`).",
            exists=True,
            dir_okay=False,
        ),
    ],
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write a bar chart to this file: SVG, PDF or JPEG by its extension, else PNG (.png "
            "added to other names). Its folder is checked before the evaluation runs.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Evaluate only the first N facts (the others are not checked)."),
    ] = None,
    unrelated: Annotated[
        Path | None,
        typer.Option(
            help="Unrelated facts: {prompt, target} objects, JSONL or a JSON list (default: the packaged set).",
            exists=True,
        ),
    ] = None,
    heldout: Annotated[
        Path | None,
        typer.Option(
            help="Held-out text for perplexity, one paragraph per line (default: packaged).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    generations: Annotated[
        int,
        typer.Option(
            min=0,
            help="Greedy generations for fluency (0 = skip); at most one per record plus 8 fixed prompts.",
        ),
    ] = 8,
    cache: Annotated[
        bool, typer.Option(help="Reuse the base model's cached result for the same facts.")
    ] = True,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            help="Torch threads; 0 = the idle cores (by load average): on a busy machine extra threads "
            "wait on each other and run several times slower.",
        ),
    ] = 0,
) -> None:
    """Evaluate the base model and the model with PATCH... applied, side by side, on FACTS."""
    from nmke_patch.evaluate import evaluate_pair, load_unrelated
    from nmke_patch.jsonio import read_user_text
    from nmke_patch.models import load_base

    resolved = resolve_patches(patches)  # validate everything before the slow part
    held = check_apply(model, resolved)  # a merged model's patches: the base here, and parents for children
    if not force:
        check_lineage(resolved, [m.id for m in held])
    requests = read_requests(facts, limit)
    extra: dict[str, Any] = {"generations": generations}
    if unrelated is not None:
        extra["unrelated"] = load_unrelated(str(unrelated))
    if heldout is not None:
        extra["heldout_text"] = read_user_text(heldout, InvalidRequestError)
        if not extra["heldout_text"].strip():
            raise InvalidRequestError(f"--heldout {heldout} is empty; perplexity needs some text")
    if plot is not None:
        _require_matplotlib()
        plot = _chart_path(plot)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or idle_threads())
    try:
        with err_console.status("loading model") as status:
            loaded, tokenizer, info = load_base(model, device=device, dtype=dtype)
            PatchStack.for_model(loaded).declare_merged(held)
            try:
                result = evaluate_pair(
                    loaded,
                    tokenizer,
                    requests,
                    resolved,
                    force=force,
                    cache=cache,
                    progress=lambda stage: status.update(stage),
                    **extra,
                )
            except TooLongError as exc:  # name the file it came from
                if not exc.unrelated:
                    raise TooLongError(f"{facts}: {exc}") from None
                if unrelated is not None:
                    raise TooLongError(str(exc).replace("unrelated facts", str(unrelated), 1)) from None
                raise
    finally:
        torch.set_num_threads(previous)
    if held:  # "base" is the model given, which already holds merged patches
        err_console.print(
            labelled(
                "note:",
                "yellow",
                f"{model} already has {names(held)} merged ({RECORD_FILE}): 'base' is that model, and "
                "'patched' adds the patches given",
            ),
            soft_wrap=True,
        )
    if forced := result["forced"]:
        err_console.print(
            f"warning: forced: {', '.join(forced)} did not fit the model, so 'patched' is not this model plus "
            "the patches as they were made",
            soft_wrap=True,
        )
    title = shown(f"{len(requests)} facts from {facts.name}; patches: {', '.join(p.name for p in resolved)}")
    result["model_holds"] = [{"name": m.name, "id": m.id} for m in held]
    _report(result, as_json, title, facts, info.name_or_path, resolved, plot)
    if plot is not None:  # after the results are out: a failure to write it loses nothing
        _plot(result, plot, title)
        if not as_json:
            console.print(f"chart written to {plot}")


def _report(
    result: dict[str, Any],
    as_json: bool,
    title: str,
    facts: Path,
    model_name: Any,
    resolved: list[Patch],
    plot: Path | None,
) -> None:
    """Print the evaluation: the table and timing, or (``as_json``) the JSON document."""
    if as_json:
        out = {
            "facts": str(facts),
            "model": model_name,
            "patches": [{"name": p.name, "id": p.id} for p in resolved],
            "forced": result["forced"],
            "model_holds": result["model_holds"],
            "base_cached": result["base_cached"],
            **{
                side: {k: result[side][k] for k in ("metrics", "counts", "seconds")}
                | {"generations": result[side]["details"]["generations"]}
                for side in ("base", "patched")
            },
            "comparison": result["comparison"],
            "chart": str(plot) if plot is not None else None,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    _print_table(result, title)
    seconds = result["patched"]["seconds"].get("total", 0.0)
    if not result["base_cached"]:
        seconds += result["base"]["seconds"].get("total", 0.0)
    note = " (base result reused from the cache)" if result["base_cached"] else ""
    console.print(f"evaluated in {seconds:.1f} s{note}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)

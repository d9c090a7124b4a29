"""``create``: compute edits for a facts file and write them as a patch."""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from nmke_patch.checkpoints import refuse_interrupted_run
from nmke_patch.consistency import refuse_conflicts
from nmke_patch.errors import InvalidRequestError, PatchMismatchError
from nmke_patch.jsonio import load_json_text
from nmke_patch.lengths import TooLongError
from nmke_patch.merged import RECORD_FILE, read_record
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.methods.nmke.prompts import encode
from nmke_patch.patch import MAX_NAME_CHARS, PATCH_SUFFIX, check_patch_target
from nmke_patch.paths import sole_writer
from nmke_patch.requests import read_requests

if TYPE_CHECKING:
    from nmke_patch.create import LoadedModel
    from nmke_patch.patch import Patch
    from nmke_patch.requests import EditRequest

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, ModelOpt, console, err_console, shown


class MethodChoice(str, Enum):
    """``--method``: the values of :data:`nmke_patch.methods.nmke.config.Method`."""

    nmke = "nmke"
    alphaedit = "alphaedit"
    memit = "memit"


class ModeChoice(str, Enum):
    """``--mode``: the values of ``EditConfig.mode``."""

    sequential = "sequential"
    batch = "batch"


_MAX_LAYERS = 10_000
"""More decoder layers than any model has: a bound for ``--layers`` ranges (the model checks the rest)."""


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-"))
        else:
            return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise InvalidRequestError(f"--layers must look like '4,5,6' or '4-8' (got {text!r})") from exc
    if not 0 <= a <= b < _MAX_LAYERS:  # checked before a range of a billion numbers is built
        raise InvalidRequestError(
            f"--layers {text}: a range FIRST-LAST of layer numbers, 0 <= FIRST <= LAST < {_MAX_LAYERS}"
        )
    return tuple(range(a, b + 1))


def _no_budget(text: str) -> bool:
    return text.strip().lower() == "none"


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InvalidRequestError(
            f"--max-neurons takes a fraction of a layer's neurons, e.g. 0.1, or none (got {text!r})"
        ) from exc


_PYTHON_WORDS: dict[str, object] = {"None": None, "True": True, "False": False}
"""Python's spellings, read as JSON's null, true and false in --set values."""


def _parse_settings(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequestError(f"--set takes KEY=VALUE (got {pair!r})")
        try:  # strict: NaN / Infinity stay strings, which the config then refuses for a number
            out[key.strip()] = load_json_text(value, f"--set {key.strip()}", InvalidRequestError)
        except InvalidRequestError:
            out[key.strip()] = _PYTHON_WORDS.get(value.strip(), value)
    return out


def create(
    facts: Annotated[
        Path,
        typer.Argument(
            metavar="FACTS",
            help="Facts to write: a JSON list of records, JSONL (one per line) or one record (ours, CounterFact "
            "or ZsRE; formats in the README).",
            exists=True,
            dir_okay=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help=f"Patch directory to write (NAME{PATCH_SUFFIX}).")],
    model: ModelOpt = None,
    method: Annotated[
        MethodChoice, typer.Option(help="nmke (sparse), or the dense baselines alphaedit / memit.")
    ] = MethodChoice.nmke,
    mode: Annotated[
        ModeChoice, typer.Option(help="sequential (one edit at a time) or batch.")
    ] = ModeChoice.sequential,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Requests per solve with --mode batch (default 10).")
    ] = None,
    max_neurons: Annotated[
        str | None,
        typer.Option(
            metavar="FRACTION|none",
            help="Sparsity budget: at most this fraction of a layer's neurons per edit (nmke only; default "
            f"{EditConfig().max_neurons:g}); none = no budget, the published mask's size.",
        ),
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Edited layers, e.g. '4-8' or '3,4,5'. Default: per architecture.")
    ] = None,
    on: Annotated[
        list[str] | None,
        typer.Option(
            "--on", help="Parent patch(es) to continue from (repeatable): the whole chain, oldest first."
        ),
    ] = None,
    stats_corpus: Annotated[
        str | None,
        typer.Option(
            help="Text file(s) for key statistics, several joined with os.pathsep (':' on Linux and macOS, "
            "';' on Windows), or a data set: 'dataset:NAME\\[?config=C&split=S&field=F&revision=R]' (a Hub id "
            "when online, or a local folder of .jsonl/.parquet/.csv files; needs nmke-patch\\[datasets]); "
            "default: text sampled from the model."
        ),
    ] = None,
    stats_tokens: Annotated[
        int | None,
        typer.Option(help=f"Tokens of text for key statistics (default {EditConfig().stats_tokens:,})."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any config field, KEY=VALUE (see docs/method.md), except those with their own option above.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted run from its checkpoint (OUT.checkpoint beside --out; without "
            "--resume an existing checkpoint is refused, never overwritten)."
        ),
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write a checkpoint every N edits.")] = 25,
    name: Annotated[
        str | None, typer.Option(help="Patch name (default: the output directory's stem).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace an existing patch at --out (only a patch directory is ever replaced)."),
    ] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Compute edits for FACTS with NMKE (or a dense baseline) and write them as a patch."""
    from nmke_patch.create import LoadedModel
    from nmke_patch.models import load_base
    from nmke_patch.sources import resolve_patches
    from nmke_patch.stack import check_lineage
    from nmke_patch.stats import check_corpus

    requests = read_requests(facts)  # every record validated before anything is computed
    refuse_conflicts(requests, str(facts))
    check_patch_target(out, overwrite=overwrite)  # before the model loads; save() checks again
    if name is not None and not name.strip():
        raise InvalidRequestError("--name is blank; leave it out to name the patch after --out")
    if batch_size is not None and mode is not ModeChoice.batch:
        raise InvalidRequestError("--batch-size needs --mode batch")
    options: dict[str, object] = {
        "method": method.value,
        "mode": mode.value,
        "batch_size": 10 if mode is ModeChoice.batch and batch_size is None else batch_size,
        "max_neurons": None if max_neurons is None or _no_budget(max_neurons) else _budget(max_neurons),
        "layers": _parse_layers(layers),
        "stats_corpus": stats_corpus,
        "stats_tokens": stats_tokens,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    if max_neurons is not None and _no_budget(max_neurons):
        overrides["max_neurons"] = None
    extra = _parse_settings(settings or [])
    clash = sorted(set(extra) & set(options))
    if clash:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in clash)
        raise InvalidRequestError(f"--set {', '.join(clash)}: use {flags} instead (one place per setting)")
    overrides |= extra
    config = EditConfig().with_overrides(**overrides)
    unused = config.unused(set(overrides) - {"method"})
    if unused:
        given = "; ".join(
            (f"--{k.replace('_', '-')}" if k in options else f"--set {k}") + f" ({reason})"
            for k, reason in unused.items()
        )
        raise InvalidRequestError(
            f"not read with --method {config.method} and these settings, so it would do nothing: {given}. "
            "Drop it (docs/method.md)"
        )
    check_corpus(config.stats_corpus)  # a missing corpus file fails before the model loads
    patch_name = name or out.name.removesuffix(PATCH_SUFFIX)
    if len(patch_name) > MAX_NAME_CHARS:  # save() would refuse it, after all the edits
        raise InvalidRequestError(
            f"the patch name is {len(patch_name):,} characters long; at most {MAX_NAME_CHARS}"
        )
    parents = resolve_patches(on or [])  # read and verified once, here
    check_lineage(parents)  # an incomplete or out-of-order chain fails before the model loads too
    held = {m.id for m in read_record(model) or []}
    merged_parents = [p.name for p in parents if p.id in held]
    if merged_parents:
        raise PatchMismatchError(
            f"--model {model} has {', '.join(merged_parents)} merged already ({RECORD_FILE}); create on the base "
            "model with --on (the child then applies to this merged model too), or drop --on to make this "
            "merged model the new base"
        )
    for p in parents:
        if p.path is not None and out.resolve() in (p.path.resolve(), *p.path.resolve().parents):
            raise FileExistsError(
                f"--out {out} is (or holds) the parent {p.describe()}; write the child elsewhere"
            )
    with sole_writer(out, "nmke-patch create"):  # held to the end: the checkpoint and -o are this run's
        checkpoint = out.with_name(out.name + ".checkpoint")
        if not resume:
            refuse_interrupted_run(checkpoint)  # before the model loads
        elif (checkpoint / "progress.json").is_file():
            console.print(
                f"resuming from {checkpoint} if it is this run's (same facts, settings, model)",
                highlight=False,
            )
        else:
            console.print(f"no checkpoint in {checkpoint}: starting from the first edit", highlight=False)
        with console.status("loading model"):
            loaded = LoadedModel(*load_base(model, device=device, dtype=dtype, device_map=device_map))
        patch = _edit_with_progress(
            requests,
            loaded,
            facts=facts,
            config=config,
            name=patch_name,
            parents=parents,
            checkpoint=checkpoint,
            resume=resume,
            checkpoint_every=checkpoint_every,
        )
        try:
            saved = patch.save(out, overwrite=overwrite)
        except KeyboardInterrupt:  # every edit is in the checkpoint: --resume only writes the patch
            _resume_hint(checkpoint)
            raise
        shutil.rmtree(checkpoint, ignore_errors=True)
    table = Table(
        title=shown(
            f"{saved.name}: {len(requests)} edit(s), {saved.num_neurons} neuron vectors, {saved.nbytes:,} bytes"
        )
    )
    for col in ("#", "prompt", "target", "P(new) before", "after edit", "after all"):
        table.add_column(col)
    for r, m in zip(requests, saved.manifest.metrics, strict=True):
        table.add_row(
            str(m["index"]),
            shown(r.text),
            shown(r.target_new),
            f"{m['p_new_before']:.3f}",
            f"{m['p_new_after']:.3f}",
            f"{m['p_new_final']:.3f}",
        )
    console.print(table)
    console.print(f"patch written to {out}")
    answers = encode(
        loaded.tokenizer, [r.text for r in requests], [None] * len(requests), [r.target_new for r in requests]
    )
    multi_token = {
        m["index"] for m, ids in zip(saved.manifest.metrics, answers.target_ids, strict=True) if len(ids) > 1
    }  # tokenized in context, as the engine scores them
    _report_landing(saved.manifest.metrics, config, multi_token)
    with console.status("measuring held-out perplexity"):
        try:
            _report_health(loaded, [*parents, saved], config)
        except Exception as exc:  # the patch is written; a failed check must not read as a failed create
            err_console.print(f"warning: could not measure held-out perplexity ({exc})", soft_wrap=True)


def _edit_with_progress(
    requests: list[EditRequest],
    loaded: LoadedModel,
    *,
    facts: Path,
    config: EditConfig,
    name: str,
    parents: list[Patch],
    checkpoint: Path,
    resume: bool,
    checkpoint_every: int,
) -> Patch:
    """``create_patch`` with a progress bar (and one for the statistics when they are sampled), and the
    ``--resume`` hint on Ctrl-C."""
    from nmke_patch.create import create_patch

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("editing", total=len(requests))
        status = console.status("preparing key statistics (cached after the first run)")
        status.start()
        sampling: list[TaskID] = []

        def stats_progress(done: int, total: int) -> None:
            if not sampling:  # the first call: the statistics are not cached, and this takes a while
                status.stop()
                console.print(
                    f"sampling {total:,} tokens of preservation text from the model for the key statistics "
                    "(once per model and settings; cached afterwards)"
                )
                sampling.append(bar.add_task("statistics", total=total))
            bar.update(sampling[0], completed=done, total=total)

        def progress(done: int, total: int) -> None:
            status.stop()
            if sampling:
                bar.remove_task(sampling.pop())
            bar.update(task, completed=done, total=total)

        try:
            patch = create_patch(
                requests,
                loaded=loaded,
                config=config,
                name=name,
                on=parents,
                checkpoint_dir=checkpoint,
                resume=resume,
                checkpoint_every=checkpoint_every,
                progress=progress,
                stats_progress=stats_progress,
            )
        except TooLongError as exc:
            raise TooLongError(f"{facts}: {exc}") from None
        except KeyboardInterrupt:
            _resume_hint(checkpoint)
            raise
        finally:
            status.stop()
    return patch


def _resume_hint(checkpoint: Path) -> None:
    """Say, on an interrupted ``create``, that the checkpoint it leaves lets ``--resume`` go on."""
    if checkpoint.exists():
        err_console.print(
            f"checkpoint kept in {checkpoint}: the same command with --resume continues from it",
            soft_wrap=True,
        )


def _report_health(loaded: LoadedModel, chain: list[Patch], config: EditConfig) -> None:
    """Held-out perplexity (the text ``eval`` uses, first 1,024 tokens) and the unrelated facts the model
    answers (``eval``'s set), without and with the new patch, and a warning when perplexity rises more than
    10%: a patch that changes the model beyond its facts should not look fine."""
    from nmke_patch.evaluate import evaluate, packaged_unrelated
    from nmke_patch.health import load_heldout, perplexity
    from nmke_patch.stack import PatchStack

    facts = packaged_unrelated(loaded.model, loaded.tokenizer)  # read (and warned about) once

    def answered() -> dict[str, bool]:
        only_facts = evaluate(
            loaded.model, loaded.tokenizer, [], heldout_text=[], unrelated=facts, generations=0
        )
        return dict(only_facts["details"]["unrelated_answered"])

    text = load_heldout()
    what = "with its parents, " if len(chain) > 1 else ""
    stack = PatchStack.for_model(loaded.model)
    try:
        for p in chain[:-1]:
            stack.apply(p)
        before, _ = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=1024)
        known = [fact for fact, ok in answered().items() if ok]
        stack.apply(chain[-1])
        after, _ = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=1024)
        still = answered()
    finally:
        stack.unload_all()
    drift = 100.0 * (after / before - 1.0)
    console.print(
        f"held-out perplexity ({what}without -> with this patch): {before:.2f} -> {after:.2f} ({drift:+.1f}%)"
    )
    if known:
        kept = sum(still[fact] for fact in known)
        console.print(
            f"unrelated facts kept: {kept} of the {len(known)} the model {'with its parents ' if what else ''}"
            f"answers without this patch ({kept / len(known):.0%}; `nmke-patch eval` measures more)"
        )
    if not drift <= 10.0:  # also NaN
        err_console.print(
            f"warning: held-out perplexity rose {drift:+.1f}%: the patch changes the model beyond its facts. "
            "`nmke-patch eval` shows where; fewer edits per patch, "
            + (
                "`--set min_preservation=300`, "
                if "min_preservation" not in config.unused(["min_preservation"])
                and config.min_preservation < 300
                else ""
            )
            + "or other `--layers` may help (docs/method.md)",
            soft_wrap=True,
        )


def _report_landing(metrics: list[dict[str, Any]], config: EditConfig, multi_token: set[int]) -> None:
    """One line on how many edits reach ``sweep_until`` (P(new) after all edits), and a warning naming those
    that do not, so a user sees a weak edit before shipping it rather than after. ``multi_token``: indices
    of edits whose answer has several tokens (z stops per token unless ``z_stop_whole``)."""
    threshold = config.sweep_until
    weak = [m for m in metrics if float(m["p_new_final"]) < threshold]
    console.print(
        f"{len(metrics) - len(weak)} of {len(metrics)} edit(s) reach P(new) >= {threshold:g} after all edits"
    )
    if weak:
        listed = ", ".join(f"#{m['index']} ({float(m['p_new_final']):.3f})" for m in weak[:20])
        more = f" and {len(weak) - 20} more" if len(weak) > 20 else ""
        err_console.print(
            f"warning: {len(weak)} edit(s) below P(new) {threshold:g}: {listed}{more}. `nmke-patch eval` measures "
            "them fully"
            + (
                "; `--set grow_budget_to=0.4` lets an edit that does not land use more neurons (docs/method.md)"
                if "grow_budget_to" not in config.unused(["grow_budget_to"]) and config.grow_budget_to is None
                else ""
            )
            + (
                f"; {', '.join(f'#{m}' for m in sorted(long_answers)[:5])} answer with several tokens, and the "
                f"target value stops once each token averages P {config.z_stop_prob:g}: `--set z_stop_whole=true`"
                " aims at the whole answer"
                if (long_answers := multi_token & {int(m["index"]) for m in weak})
                and config.method == "nmke"
                and not config.z_stop_whole
                else ""
            ),
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    app.command("create")(create)

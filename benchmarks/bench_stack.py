"""Patch stack figures for issue 2, on the embedded default model (SmolLM2-135M-Instruct, fp32, CPU).

Measures the package as it is:
  (a) ``PatchStack.apply`` and (b) ``PatchStack.unload`` of a patch touching 1,000 neuron columns spread over
      5 layers (median of ``--runs`` runs each, after ``--warmup`` runs);
  (c) wall time of ``load_model()`` bare vs ``load_model(patches=[10 patches])``, interleaved (alternating
      order), ``--reps`` repetitions: in this process, in this process with every weight page read
      afterwards (ready to run), and in fresh processes; and what reading + validating and applying the
      10 patches take on their own;
  (profile) single small tensor ops of an apply, with PyTorch's default intra-op threads vs one thread
      (``nmke_patch.threads.one_thread``, which the stack and the patch validator run their ops under);
  (d) patch size on disk vs the theoretical minimum (indices + deltas + originals) and the header overhead.

Prints a Markdown table and notes and writes them to the section "## Patch stack (issue 2)" of
``BENCHMARKS.md`` (created if missing). Usage::

    python benchmarks/bench_stack.py [--runs 30] [--warmup 5] [--reps 7] [--no-write]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from _report import cpu_name, update_section
from torch import nn

import nmke_patch
from nmke_patch.architectures import spec_for_model
from nmke_patch.delta import add_delta, gather_neurons, make_delta, scatter_neurons
from nmke_patch.models import load_base, tensor_fingerprint
from nmke_patch.patch import CARD_FILE, DELTAS_FILE, MANIFEST_FILE, Manifest, Patch, load_patch
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack
from nmke_patch.threads import one_thread

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Patch stack (issue 2)"
NEURONS = 1000
NUM_LAYERS_TOUCHED = 5
NUM_STACKED = 10
APPLY_TARGET_MS = 20.0
LOAD_TARGET = 0.10
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- patches ----------------------------------------------------------------------------------------------


def build_patch(model: nn.Module, layer_indices: dict[int, torch.Tensor], name: str, seed: int) -> Patch:
    """A patch with small random deltas on the given neurons of the given layers (originals from ``model``)."""
    spec = spec_for_model(model)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for layer, idx in sorted(layer_indices.items()):
        pname = spec.weight_name(layer)
        weight = params[pname]
        d_model = weight.shape[1 - spec.neuron_axis]
        values = torch.randn(len(idx), d_model, generator=gen) * 0.01
        deltas.append(
            make_delta(pname, weight, spec.neuron_axis, idx.sort().values, values, tensor_fingerprint(weight))
        )
    manifest = Manifest(
        name=name,
        base_model={"name_or_path": "default", "architecture": "LlamaForCausalLM", "model_type": "llama"},
        method={"name": "benchmark-random", "config": {"seed": seed}},
        created_at="2026-01-01T00:00:00+00:00",
    )
    return Patch(manifest=manifest, deltas=tuple(deltas))


def stacked_layout(num_layers: int, d_ff: int, first: int, seed: int) -> list[dict[int, torch.Tensor]]:
    """Neurons of ``NUM_STACKED`` patches, each 1,000 columns over 5 consecutive layers (mod depth), disjoint."""
    gen = torch.Generator().manual_seed(seed)
    pools = {layer: torch.randperm(d_ff, generator=gen) for layer in range(num_layers)}
    used = dict.fromkeys(range(num_layers), 0)
    per_layer = NEURONS // NUM_LAYERS_TOUCHED
    layouts = []
    for i in range(NUM_STACKED):
        layout = {}
        for j in range(NUM_LAYERS_TOUCHED):
            layer = (first + NUM_LAYERS_TOUCHED * i + j) % num_layers
            layout[layer] = pools[layer][used[layer] : used[layer] + per_layer]
            used[layer] += per_layer
        layouts.append(layout)
    return layouts


# -- timing -----------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_apply_unload(
    model: nn.Module, patch: Patch, runs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Seconds of each timed ``PatchStack.apply`` and ``PatchStack.unload`` (after ``warmup`` untimed pairs)."""
    stack = PatchStack.for_model(model)
    applies: list[float] = []
    unloads: list[float] = []
    for i in range(warmup + runs):
        applied = timed(lambda: stack.apply(patch))
        unloaded = timed(lambda: stack.unload(patch))
        if i >= warmup:
            applies.append(applied)
            unloads.append(unloaded)
    return applies, unloads


def bench_breakdown(model: nn.Module, dirs: list[Path]) -> tuple[float, float]:
    """Median seconds to read + validate the stacked patches, and to apply them to a live model."""
    reads = [timed(lambda: resolve_patches(dirs)) for _ in range(5)]
    patches = resolve_patches(dirs)
    stack = PatchStack.for_model(model)
    applies = []
    for _ in range(5):
        applies.append(timed(lambda: [stack.apply(p) for p in patches]))
        stack.unload_all()
    return statistics.median(reads), statistics.median(applies)


def touch_every_page(model: nn.Module) -> None:
    """Read one value per 4 KiB page of every weight: what the first forward pass makes the OS do."""
    with one_thread():
        for param in model.parameters():
            float(param.detach().reshape(-1)[::1024].sum())


def _load(patches: list[Path], touch: bool = False) -> None:
    model, _ = nmke_patch.load_model(patches=patches)
    if touch:
        touch_every_page(model)
    del model
    gc.collect()


def bench_load_in_process(
    dirs: list[Path], reps: int, touch: bool = False
) -> tuple[list[float], list[float]]:
    """``load_model()`` bare and with ``dirs`` in this process, interleaved, order alternating."""
    bare: list[float] = []
    patched: list[float] = []
    _load([], touch)  # warm-up: page cache, first-call allocations
    _load(dirs, touch)
    for rep in range(reps):
        pairs: list[tuple[list[Path], list[float]]] = [([], bare), (dirs, patched)]
        for patches, out in pairs[:: 1 if rep % 2 == 0 else -1]:
            out.append(timed(functools.partial(_load, patches, touch)))
    return bare, patched


def _on_one_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with one_thread():
            return fn()

    return run


def bench_small_ops(model: nn.Module, patch: Patch) -> dict[str, tuple[float, float]]:
    """Median seconds of single ops an apply is made of, on the first tensor: (default threads, one thread)."""
    spec = spec_for_model(model)
    d = patch.deltas[0]
    weight = dict(model.named_parameters())[d.name].detach().clone()
    current = gather_neurons(weight, spec.neuron_axis, d.indices)
    ops: dict[str, Callable[[], Any]] = {
        "`index_copy_` (scatter)": lambda: scatter_neurons(weight, spec.neuron_axis, d.indices, current),
        "`add_delta`": lambda: add_delta(current, d.delta),
        "`torch.equal`": lambda: torch.equal(current, d.original),
        "`isfinite().all()`": lambda: bool(torch.isfinite(d.delta).all()),
    }
    out: dict[str, tuple[float, float]] = {}
    for name, fn in ops.items():
        variants = (fn, _on_one_thread(fn))
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(33):  # the two take turns; the first 3 rounds are warm-up
            for run, t in zip(variants, times, strict=True):
                elapsed = timed(run)
                if i >= 3:
                    t.append(elapsed)
        out[name] = (statistics.median(times[0]), statistics.median(times[1]))
    return out


def bench_load_fresh(dirs: list[Path], reps: int) -> tuple[list[float], list[float]]:
    """The same in fresh Python processes (imports included), interleaved, order alternating."""
    env = {**os.environ, **QUIET_ENV}

    def run(patches: list[Path]) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-load", *map(str, patches)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    bare: list[float] = []
    patched: list[float] = []
    run([])
    for rep in range(reps):
        pairs: list[tuple[list[Path], list[float]]] = [([], bare), (dirs, patched)]
        for patches, out in pairs[:: 1 if rep % 2 == 0 else -1]:
            out.append(timed(functools.partial(run, patches)))
    return bare, patched


# -- report -----------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def ok(good: bool) -> str:
    return "yes" if good else "**no**"


def update_benchmarks_md(section_body: str, path: Path) -> None:
    """Replace (or append) this script's section of ``path``; other sections are kept."""
    update_section(path, SECTION, section_body)


def notes_text(
    results: dict[str, Any],
    small_ops: dict[str, tuple[float, float]],
    add_shape: tuple[int, int],
    stacked_bytes: int,
    touched_weights: int,
) -> str:
    """What the rows mean; every number is this run's."""
    apply_med, unload_med = (statistics.median(results[k]) for k in ("apply", "unload"))
    load, ready, fresh = ([statistics.median(x) for x in results[k]] for k in ("load", "ready", "fresh"))
    threads = results["threads"]
    add_default, add_one = small_ops["`add_delta`"]
    ratios = {op: default / one for op, (default, one) in small_ops.items()}
    slow = [op for op, r in ratios.items() if r >= 2]
    ops_line = (
        f"The profile rows time single ops of an apply on the first tensor, with the default {threads} "
        f"intra-op threads and with one thread, taking turns: one `add_delta` of {add_shape[0]} x "
        f"{add_shape[1]} values took {ms(add_default)} vs {ms(add_one)}"
    )
    if threads == 1:
        ops_line += "; the default here is one thread, so both columns time the same thing."
    elif len(slow) == len(ratios):
        ops_line += (
            f", and each of the {len(ratios)} ops was {min(ratios.values()):.0f}x to {max(ratios.values()):.0f}x "
            "slower on the default "
            "threads than on one, which is why the package runs them on one thread."
        )
    else:
        ops_line += (
            "; default-thread time / one-thread time per op in this run: "
            f"{', '.join(f'{op} {r:.2f}x' for op, r in ratios.items())}."
        )
    reps = len(results["fresh"][0])
    if reps > 1:
        bare_spread = max(results["fresh"][0]) - min(results["fresh"][0])
        patched_spread = max(results["fresh"][1]) - min(results["fresh"][1])
        noise_line = (
            f"over the {reps} repetitions the bare loads spread over {bare_spread:.2f} s and the patched ones "
            f"over {patched_spread:.2f} s (min-max), so a difference smaller than those spreads is within the noise."
        )
    else:
        noise_line = "with one repetition this run has no spread to judge that difference by (use --reps 7)."
    read_share = results["read"] / load[0]
    read_line = (
        f"Reading and validating the {stacked_bytes / 1e6:.0f} MB of patches alone took {ms(results['read'])}, "
        f"{read_share:.0%} of the bare in-process load"
    )
    if read_share > LOAD_TARGET:
        read_line += f": on its own more than the +{LOAD_TARGET:.0%} target for the patched in-process load."
    else:
        read_line += "."
    return (
        "Notes:\n\n"
        f"- `PatchStack.apply` / `unload` took {ms(apply_med)} / {ms(unload_med)} (median). The stack "
        "(`apply`, `unload`, `unload_all`, `adopt`, `check` in `nmke_patch/stack.py`) and the tensor reading "
        "and checks of `load_patch` (`nmke_patch/patch.py`) run on one intra-op thread, under `one_thread` "
        f"of `nmke_patch/threads.py`, which restores the thread count afterwards. {ops_line}\n"
        "- In-process `load_model()` is lazy: transformers memory-maps the safetensors file, so the bare "
        f"load ({load[0]:.3f} s) reads no weights, while the patched one ({load[1]:.3f} s) reads, hashes and "
        f"validates {stacked_bytes / 1e6:.0f} MB of patches and copies on write every page of the "
        f"{touched_weights} weights they touch: {load[1] - load[0]:+.3f} s against a bare load that has not "
        "read the model yet. Once every weight page is read (what the first forward pass does; 'ready to "
        f"run' rows) the difference is {ready[1] - ready[0]:+.3f} s on {ready[0]:.3f} s "
        f"({ready[1] / ready[0] - 1:+.1%}). {read_line}\n"
        "- In a fresh process (imports included: what a user of `nmke-patch` or a script waits for) the "
        f"difference is {fresh[1] - fresh[0]:+.3f} s on {fresh[0]:.3f} s ({fresh[1] / fresh[0] - 1:+.1%}). "
        f"Fresh-process times are noisy, as the machine's cores are shared with other jobs: {noise_line}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="timed apply/unload runs (>= 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7, help="interleaved load_model repetitions")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    # internal: one load_model() with the given patch directories (none: bare), timed by the parent process
    parser.add_argument("--child-load", nargs="*", metavar="PATCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(QUIET_ENV)
    transformers.utils.logging.disable_progress_bar()
    if args.child_load is not None:
        nmke_patch.load_model(patches=[Path(p) for p in args.child_load])
        return
    if args.runs < 20:
        parser.error("--runs must be at least 20")
    load_avg = os.getloadavg()
    started = time.perf_counter()

    model, _, _ = load_base()
    spec = spec_for_model(model)
    num_layers = len(getattr(model, "model").layers)  # noqa: B009
    d_ff = dict(model.named_parameters())[spec.weight_name(0)].shape[spec.neuron_axis]
    first = spec.default_layers(num_layers)[0]
    layouts = stacked_layout(num_layers, d_ff, first, seed=0)
    touched_weights = len({layer for layout in layouts for layer in layout})
    results: dict[str, Any] = {"threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory(prefix="nmke-bench-") as tmp:
        dirs = []
        for i, layout in enumerate(layouts):
            saved = build_patch(model, layout, f"bench-{i}", seed=i).save(Path(tmp) / f"bench-{i}.nmke")
            assert saved.path is not None
            dirs.append(saved.path)
        patch = load_patch(dirs[0])  # 1,000 columns over 5 consecutive layers

        small_ops = bench_small_ops(model, patch)
        results["apply"], results["unload"] = bench_apply_unload(model, patch, args.runs, args.warmup)
        results["read"], results["apply10"] = bench_breakdown(model, dirs)
        del model
        gc.collect()
        results["load"] = bench_load_in_process(dirs, args.reps)
        results["ready"] = bench_load_in_process(dirs, args.reps, touch=True)
        results["fresh"] = bench_load_fresh(dirs, args.reps)

        root = dirs[0]
        file_size = (root / DELTAS_FILE).stat().st_size
        minimum = patch.nbytes
        manifest_size = (root / MANIFEST_FILE).stat().st_size
        card_size = (root / CARD_FILE).stat().st_size
        dense = sum(d.shape[0] * d.shape[1] * d.original.element_size() for d in patch.deltas)
        stacked_bytes = sum((d / DELTAS_FILE).stat().st_size for d in dirs)

    per_layer = NEURONS // NUM_LAYERS_TOUCHED
    layers = sorted(int(d.name.split(".")[2]) for d in patch.deltas)
    rows = [("measurement", "result", "target", "met")]
    for what in ("apply", "unload"):
        times = results[what]
        med = statistics.median(times)
        rows.append(
            (
                f"({'a' if what == 'apply' else 'b'}) `PatchStack.{what}`, {NEURONS:,} columns "
                f"({per_layer} x layers {layers[0]}-{layers[-1]}), median of {args.runs}",
                f"{ms(med)} (min {ms(min(times))}, max {ms(max(times))})",
                f"<= {APPLY_TARGET_MS:.0f} ms",
                ok(med * 1e3 <= APPLY_TARGET_MS),
            )
        )
    for key, where in (
        ("load", "in this process"),
        ("ready", "in this process, then every weight page read (ready to run)"),
        ("fresh", "fresh process, imports included"),
    ):
        bare, patched = results[key]
        mb, mp = statistics.median(bare), statistics.median(patched)
        rows.append(
            (
                f"(c) `load_model()` bare vs `load_model(patches=[{NUM_STACKED} x {NEURONS:,} columns])`, "
                f"{where}, median (min-max) of {args.reps}",
                f"{mb:.3f} s ({min(bare):.2f}-{max(bare):.2f}) vs {mp:.3f} s ({min(patched):.2f}-"
                f"{max(patched):.2f}): {mp / mb - 1:+.1%} ({(mp - mb) * 1e3:+.0f} ms, ratio {mp / mb:.3f})",
                f"<= +{LOAD_TARGET:.0%}",
                ok(mp / mb - 1 <= LOAD_TARGET),
            )
        )
    rows.append(
        (
            f"(c) of which: read + validate / apply the {NUM_STACKED} patches on a loaded model, median of 5",
            f"{ms(results['read'])} / {ms(results['apply10'])}",
            "",
            "",
        )
    )
    for op, (default, one) in small_ops.items():
        rows.append(
            (
                f"(profile) one {op} of {patch.deltas[0].num_neurons} value vectors, median of 30, "
                f"alternating: default threads ({results['threads']}) / one thread",
                f"{ms(default)} / {ms(one)}",
                "",
                "",
            )
        )
    rows += [
        (f"(d) `deltas.safetensors` of the {NEURONS:,}-column patch", f"{file_size:,} bytes", "", ""),
        (
            "(d) theoretical minimum: int32 indices + fp32 deltas + fp32 originals",
            f"{minimum:,} bytes",
            "",
            "",
        ),
        (
            "(d) safetensors header overhead",
            f"{file_size - minimum:,} bytes ({(file_size - minimum) / minimum:.3%})",
            "small",
            ok(file_size - minimum <= 4096),
        ),
        ("(d) `manifest.json` / `README.md` card", f"{manifest_size:,} / {card_size:,} bytes", "", ""),
        (
            "(d) for scale: the 5 touched weights stored densely",
            f"{dense:,} bytes (the patch stores {minimum / dense:.1%} of that)",
            "never stored",
            "",
        ),
        (f"(d) all {NUM_STACKED} stacked patches (`deltas.safetensors`)", f"{stacked_bytes:,} bytes", "", ""),
    ]
    table = "\n".join(
        "| " + " | ".join(r) + " |" + ("\n|---|---|---|---|" if i == 0 else "") for i, r in enumerate(rows)
    )
    now = datetime.now(timezone.utc)
    notes = notes_text(results, small_ops, tuple(patch.deltas[0].delta.shape), stacked_bytes, touched_weights)
    body = (
        f"Command: `python benchmarks/bench_stack.py --runs {args.runs} --warmup {args.warmup} --reps {args.reps}` "
        f"({time.perf_counter() - started:.0f} s)\n\n"
        f"Machine: 2-core CPU ({cpu_name()}; {os.cpu_count()} logical CPUs, shared with other jobs: "
        f"load average {load_avg[0]:.2f} at start), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
        f"threads by default), transformers {transformers.__version__}, nmke-patch {nmke_patch.__version__}. "
        f"Date: {now:%Y-%m-%d %H:%M} UTC.\n\n"
        f"Model: the embedded default (SmolLM2-135M-Instruct, fp32, `down_proj` [576, 1536] x 30 layers). "
        f"Patches: random deltas (N(0, 0.01^2)) on sorted random neuron sets; the {NUM_STACKED} stacked "
        f"patches touch disjoint neurons, 5 consecutive layers each (mod 30), {NEURONS:,} columns each. "
        f"Load times: bare and patched interleaved with alternating order, after a warm-up; "
        f"page cache warm.\n\n"
        f"{table}\n\n{notes}"
    )
    print(body)
    if not args.no_write:
        update_benchmarks_md(body, ROOT / "BENCHMARKS.md")
        print(f"updated {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()

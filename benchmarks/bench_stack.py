"""Patch stack figures for issue 2, on the embedded default model (SmolLM2-135M-Instruct, fp32, CPU).

Measures
  (a) ``PatchStack.apply`` and (b) ``PatchStack.unload`` of a patch touching 1,000 neuron columns spread over
      5 layers (median of ``--runs`` runs each, after warm-up);
  (c) wall time of ``load_model()`` bare vs ``load_model(patches=[10 patches])``, interleaved (alternating
      order), ``--reps`` repetitions: in this process, and in fresh processes;
  (d) patch size on disk vs the theoretical minimum (indices + deltas + originals) and the header overhead.

(a)-(c) are measured twice: as the code is, and with the stack's and the validator's small tensor ops run
on one intra-op thread (the fix proposed in BENCHMARKS.md, simulated here by wrapping ``PatchStack.apply``,
``PatchStack.unload``, ``PatchStack.unload_all`` and ``nmke_patch.patch._check_tensors``).

Prints a Markdown table and writes it to the section "## Patch stack (issue 2)" of ``BENCHMARKS.md``
(created if missing). Usage::

    python benchmarks/bench_stack.py [--runs 30] [--reps 7] [--no-write]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from _report import cpu_name, update_section
from torch import nn

import nmke_patch
import nmke_patch.patch as patch_module
from nmke_patch.architectures import spec_for_model
from nmke_patch.delta import add_delta, gather_neurons, make_delta, scatter_neurons
from nmke_patch.models import load_base, tensor_fingerprint
from nmke_patch.patch import CARD_FILE, DELTAS_FILE, MANIFEST_FILE, Manifest, Patch, load_patch
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Patch stack (issue 2)"
NEURONS = 1000
NUM_LAYERS_TOUCHED = 5
NUM_STACKED = 10
APPLY_TARGET_MS = 20.0
LOAD_TARGET = 0.10
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- the proposed fix, simulated ------------------------------------------------------------------------


def _one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return inner


_FIX_TARGETS: list[tuple[Any, str]] = [
    (PatchStack, "apply"),
    (PatchStack, "unload"),
    (PatchStack, "unload_all"),
    (patch_module, "_check_tensors"),
]


@contextmanager
def patch_ops(mode: str) -> Iterator[None]:
    """``mode == "fix"``: run the patch ops on one intra-op thread; ``"as-is"``: leave the code alone."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name in _FIX_TARGETS]
    if mode == "fix":
        for owner, name, fn in saved:
            setattr(owner, name, _one_thread(fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


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
    model: nn.Module, patch: Patch, runs: int, warmup: int, modes: tuple[str, ...]
) -> dict[str, tuple[list[float], list[float]]]:
    """Apply and unload times per mode; the modes take turns run by run, so they see the same machine."""
    stack = PatchStack.for_model(model)
    times: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in modes}
    for i in range(warmup + runs):
        for mode in modes:
            with patch_ops(mode):
                applied = timed(lambda: stack.apply(patch))
                unloaded = timed(lambda: stack.unload(patch))
            if i >= warmup:
                times[mode][0].append(applied)
                times[mode][1].append(unloaded)
    return times


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


@_one_thread
def touch_every_page(model: nn.Module) -> None:
    """Read one value per 4 KiB page of every weight: what the first forward pass makes the OS do."""
    for param in model.parameters():
        float(param.detach().reshape(-1)[::1024].sum())


def _load(patches: list[Path], touch: bool = False) -> None:
    model, _ = nmke_patch.load_model(patches=patches)
    if touch:
        touch_every_page(model)
    del model
    gc.collect()


def bench_load_in_process(
    dirs: list[Path], reps: int, mode: str, touch: bool = False
) -> tuple[list[float], list[float]]:
    """``load_model()`` bare and with ``dirs`` in this process, interleaved, order alternating."""
    bare: list[float] = []
    patched: list[float] = []
    with patch_ops(mode):
        _load([], touch)  # warm-up: page cache, first-call allocations
        _load(dirs, touch)
        for rep in range(reps):
            pairs: list[tuple[list[Path], list[float]]] = [([], bare), (dirs, patched)]
            for patches, out in pairs[:: 1 if rep % 2 == 0 else -1]:
                out.append(timed(functools.partial(_load, patches, touch)))
    return bare, patched


def bench_small_ops(model: nn.Module, patch: Patch) -> dict[str, dict[str, float]]:
    """Median seconds of single ops an apply is made of, on the first tensor: default threads vs one thread."""
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
    out: dict[str, dict[str, float]] = {}
    for name, fn in ops.items():
        runs: dict[str, Callable[[], Any]] = {"as-is": fn, "fix": _one_thread(fn)}
        times: dict[str, list[float]] = {"as-is": [], "fix": []}
        for i in range(33):  # the two modes take turns; the first 3 rounds are warm-up
            for mode, run in runs.items():
                elapsed = timed(run)
                if i >= 3:
                    times[mode].append(elapsed)
        out[name] = {mode: statistics.median(t) for mode, t in times.items()}
    return out


def bench_load_fresh(dirs: list[Path], reps: int, mode: str) -> tuple[list[float], list[float]]:
    """The same in fresh Python processes (imports included), interleaved, order alternating."""
    env = {**os.environ, **QUIET_ENV}

    def run(patches: list[Path]) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-load", mode, *map(str, patches)]
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
    results: dict[str, dict[str, Any]], small_ops: dict[str, dict[str, float]], stacked_bytes: int
) -> str:
    """What the rows mean; the numbers are this run's."""
    med = {m: {k: statistics.median(results[m][k]) for k in ("apply", "unload")} for m in results}
    load = {m: [statistics.median(x) for x in results[m]["load"]] for m in results}
    ready = {m: [statistics.median(x) for x in results[m]["ready"]] for m in results}
    fresh = {m: [statistics.median(x) for x in results[m]["fresh"]] for m in results}
    add = small_ops["`add_delta`"]
    profile_line = (
        f"one `add_delta` of 200 x 576 values took {ms(add['as-is'])} with the default threads and "
        f"{ms(add['fix'])} on one thread in this run (profile rows; the two alternate)"
    )
    if add["as-is"] < 5 * add["fix"]:
        profile_line += (
            ", so the stall was intermittent in this run; in fresh processes on this machine it reproduces as "
            "~16 ms vs 0.02 ms"
        )
    return (
        "Notes:\n\n"
        f"- The as-is apply/unload ({ms(med['as-is']['apply'])} / {ms(med['as-is']['unload'])}) is not the "
        "algorithm: an apply or unload is about ten small tensor ops (gathers and scatters of 200 columns, "
        "a float32 add, a comparison), and PyTorch splits each over its OpenMP threads. With the second "
        "core busy (this machine is shared), every parallel region can wait for a spin-waiting worker "
        f"that is not running: {profile_line}. "
        "cProfile of as-is apply/unload shows about the same cost per call for `index_copy_`, `add_delta`, "
        "`torch.equal` and `_base_values`; of as-is `load_model(patches=...)`, most of the time in "
        "`torch.isfinite` / `.all()` of `nmke_patch.patch._check_tensors`. "
        "`OMP_WAIT_POLICY=PASSIVE` or `OMP_NUM_THREADS=1` make it disappear too.\n"
        "- Proposed fix (simulated in the rows marked so; not applied to the package): run the stack's and "
        "the validator's tensor ops on one intra-op thread, e.g. a context manager in `nmke_patch/stack.py` "
        "that saves `torch.get_num_threads()`, calls `torch.set_num_threads(1)` and restores it, around the "
        "bodies of `PatchStack.apply`, `unload`, `unload_all`, `adopt` and `check`, and around the tensor "
        "checks of `load_patch` in `nmke_patch/patch.py`. These ops are memory-bound and tiny; "
        f"one thread gives apply {ms(med['fix']['apply'])} and unload {ms(med['fix']['unload'])}.\n"
        f"- In-process `load_model()` is lazy: transformers memory-maps the safetensors file, so the bare "
        f"load ({load['fix'][0]:.3f} s) reads no weights, while the patched one reads, hashes and validates "
        f"{stacked_bytes / 1e6:.0f} MB of patches and copies on write every page of the weights they "
        f"touch (30 of them here). Even with the fix that is {load['fix'][1] - load['fix'][0]:+.3f} s against a bare load that "
        "has not read the model yet. Once the weights are read (what the first forward pass does; "
        f"'ready to run' rows) the difference is {ready['fix'][1] - ready['fix'][0]:+.3f} s on "
        f"{ready['fix'][0]:.3f} s ({ready['fix'][1] / ready['fix'][0] - 1:+.1%}), and in a fresh process "
        f"(what a user of `nmke-patch` or a script waits for) {fresh['fix'][1] - fresh['fix'][0]:+.3f} s on "
        f"{fresh['fix'][0]:.3f} s ({fresh['fix'][1] / fresh['fix'][0] - 1:+.1%}); fresh-process times swing "
        "by seconds with the load other jobs put on the 2 cores (see min-max), so only differences of that "
        "size mean anything there.\n"
        "- What is left in-process with the fix is real work: sha256 + safetensors parse + finiteness check "
        "of every patch byte, 3 gathers of the same columns per tensor per apply (check, snapshot, current; "
        "one would do), and the copy-on-write of each touched weight's pages. Reading each file once "
        "(hash the bytes in memory, then `safetensors.torch.load(bytes)`) and gathering once would trim "
        "it; the copy-on-write is inherent to editing a memory-mapped model in place. Here reading and "
        f"validating the {stacked_bytes / 1e6:.0f} MB of patches alone takes {ms(results['fix']['read'])}, "
        f"{results['fix']['read'] / load['fix'][0]:.0%} of the bare in-process load, so <= +10% in-process "
        "needs smaller patches than 10 x 1,000 columns.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="timed apply/unload runs (>= 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7, help="interleaved load_model repetitions")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--child-load", nargs="+", metavar=("MODE", "PATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(QUIET_ENV)
    transformers.utils.logging.disable_progress_bar()
    if args.child_load:
        with patch_ops(args.child_load[0]):
            nmke_patch.load_model(patches=[Path(p) for p in args.child_load[1:]])
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
    modes = ("as-is", "fix")
    results: dict[str, dict[str, Any]] = {mode: {} for mode in modes}

    with tempfile.TemporaryDirectory(prefix="nmke-bench-") as tmp:
        dirs = []
        for i, layout in enumerate(layouts):
            saved = build_patch(model, layout, f"bench-{i}", seed=i).save(Path(tmp) / f"bench-{i}.nmke")
            assert saved.path is not None
            dirs.append(saved.path)
        patch = load_patch(dirs[0])  # 1,000 columns over 5 consecutive layers

        small_ops = bench_small_ops(model, patch)
        for mode, (applies, unloads) in bench_apply_unload(
            model, patch, args.runs, args.warmup, modes
        ).items():
            results[mode]["apply"], results[mode]["unload"] = applies, unloads
        for mode in modes:
            with patch_ops(mode):
                results[mode]["read"], results[mode]["apply10"] = bench_breakdown(model, dirs)
        del model
        gc.collect()
        for mode in modes:
            results[mode]["load"] = bench_load_in_process(dirs, args.reps, mode)
        for mode in modes:
            results[mode]["ready"] = bench_load_in_process(dirs, args.reps, mode, touch=True)
        for mode in modes:
            results[mode]["fresh"] = bench_load_fresh(dirs, args.reps, mode)

        root = dirs[0]
        file_size = (root / DELTAS_FILE).stat().st_size
        minimum = patch.nbytes
        manifest_size = (root / MANIFEST_FILE).stat().st_size
        card_size = (root / CARD_FILE).stat().st_size
        dense = sum(d.shape[0] * d.shape[1] * d.original.element_size() for d in patch.deltas)
        stacked_bytes = sum((d / DELTAS_FILE).stat().st_size for d in dirs)

    per_layer = NEURONS // NUM_LAYERS_TOUCHED
    layers = sorted(int(d.name.split(".")[2]) for d in patch.deltas)
    label = {"as-is": "as-is", "fix": "one-thread patch ops (proposed fix)"}
    rows = [("measurement", "result", "target", "met")]
    for what in ("apply", "unload"):
        for mode in modes:
            times = results[mode][what]
            med = statistics.median(times)
            rows.append(
                (
                    f"({'a' if what == 'apply' else 'b'}) `PatchStack.{what}`, {NEURONS:,} columns "
                    f"({per_layer} x layers {layers[0]}-{layers[-1]}), median of {args.runs} "
                    f"(modes alternating), {label[mode]}",
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
        for mode in modes:
            bare, patched = results[mode][key]
            mb, mp = statistics.median(bare), statistics.median(patched)
            rows.append(
                (
                    f"(c) `load_model()` bare vs `load_model(patches=[{NUM_STACKED} x {NEURONS:,} columns])`, "
                    f"{where}, median (min-max) of {args.reps}, {label[mode]}",
                    f"{mb:.3f} s ({min(bare):.2f}-{max(bare):.2f}) vs {mp:.3f} s ({min(patched):.2f}-"
                    f"{max(patched):.2f}): {mp / mb - 1:+.1%} ({(mp - mb) * 1e3:+.0f} ms, ratio {mp / mb:.3f})",
                    f"<= +{LOAD_TARGET:.0%}",
                    ok(mp / mb - 1 <= LOAD_TARGET),
                )
            )
    for mode in modes:
        rows.append(
            (
                f"(c) of which: read + validate / apply the {NUM_STACKED} patches on a loaded model, "
                f"median of 5, {label[mode]}",
                f"{ms(results[mode]['read'])} / {ms(results[mode]['apply10'])}",
                "",
                "",
            )
        )
    for op, times in small_ops.items():
        rows.append(
            (
                f"(profile) one {op} of {patch.deltas[0].num_neurons} value vectors, median of 30, "
                "alternating: default threads / one thread",
                f"{ms(times['as-is'])} / {ms(times['fix'])}",
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
    notes = notes_text(results, small_ops, stacked_bytes)
    body = (
        f"Command: `python benchmarks/bench_stack.py --runs {args.runs} --reps {args.reps}` "
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

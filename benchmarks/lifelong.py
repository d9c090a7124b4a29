"""Lifelong-editing benchmark (issue 4): NMKE against AlphaEdit and MEMIT as edits accumulate.

For every method and mode (sequential single edits, and batches of each ``--batch-sizes``) one editing run
goes up to the largest milestone T; at each milestone the model carrying every edit so far is evaluated
on all the facts edited so far (``nmke_patch.evaluate``: efficacy, generalization, specificity, ZsRE
accuracy, neighbourhood agreement, perplexity drift, unrelated-fact retention, fluency) and the lifetime
patch's footprint is measured (union of neurons touched per layer, patch bytes). Batch runs are evaluated
at each milestone rounded up to a multiple of their batch size.

The runs share one model and advance round-robin, milestone by milestone, so a run stopped by
``--max-minutes`` (or Ctrl-C) has every method at the same T. After each milestone the results go to
``<out-dir>/lifelong.json`` and each run's editor state (tens of MB, kept out of the repository) to
``--checkpoint-dir`` (default ``$NMKE_PATCH_HOME/lifelong/<hash of the out dir>``); ``--resume`` continues
from there. At the end (also when stopped early) the section "## Lifelong editing (issue 4)" of
``BENCHMARKS.md`` is rewritten with the table, the command, machine and date, and one PNG per metric is
written to ``<out-dir>/lifelong_<metric>.png``. Runs split over several processes (one core each, their
own ``--out-dir``) are reported together with ``--report-only --include DIR ...``.

Usage (hours for the defaults; the base evaluation is cached with the checkpoints)::

    python benchmarks/lifelong.py                                  # T = 10..1000, batches of 10 and 100
    python benchmarks/lifelong.py --milestones 2,4 --methods nmke,alphaedit --batch-sizes 2 \\
        --facts data/counterfact_dev.jsonl --out-dir /tmp/lifelong --no-write   # a smoke run
    python benchmarks/lifelong.py --methods nmke --out-dir results/a --no-write &        # two processes
    python benchmarks/lifelong.py --methods alphaedit,memit --out-dir results/b --no-write &
    python benchmarks/lifelong.py --report-only --out-dir results/a --include results/b  # one report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from _report import cpu_name, refuse_unread, update_section

import nmke_patch
from nmke_patch.architectures import decoder_layers, spec_for_model
from nmke_patch.checkpoints import load_checkpoint, run_key, save_checkpoint
from nmke_patch.create import LoadedModel
from nmke_patch.evaluate import compare, evaluate
from nmke_patch.methods.nmke.config import ADDED_FIELDS, EditConfig
from nmke_patch.methods.nmke.engine import Editor
from nmke_patch.models import load_base
from nmke_patch.paths import home
from nmke_patch.requests import EditRequest, read_requests
from nmke_patch.stats import load_statistics

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Lifelong editing (issue 4)"
COLUMNS = (
    ("method", "method"),
    ("T", "T"),
    ("mode", "mode"),
    ("efficacy", "efficacy"),
    ("generalization", "generalization"),
    ("specificity", "specificity"),
    ("zsre_accuracy", "ZsRE acc"),
    ("zsre_neighborhood_agreement", "nbhd agreement"),
    ("perplexity_drift_pct", "ppl drift %"),
    ("unrelated_retention", "unrelated retention"),
    ("fluency", "fluency"),
    ("union_share", "union neurons/layer"),
    ("patch_bytes", "patch bytes"),
    ("seconds_per_edit", "s/edit"),
)
PLOTS = (
    "efficacy",
    "generalization",
    "specificity",
    "zsre_accuracy",
    "zsre_neighborhood_agreement",
    "perplexity_drift_pct",
    "unrelated_retention",
    "fluency",
    "union_share",
    "patch_bytes",
    "seconds_per_edit",
)
TARGETS = (  # issue 4, NMKE at T = 1000 sequential
    ("efficacy", ">=", 0.95),
    ("generalization", ">=", 0.65),
    ("specificity", ">=", 0.80),
    ("perplexity_drift_pct", "<=", 10.0),
    ("unrelated_retention", ">=", 0.85),
)


@dataclass
class Run:
    """One editing run: a method in one mode, with its own editor state on the shared model."""

    method: str
    batch_size: int  # 1 = sequential
    milestones: list[int]
    config: EditConfig
    editor: Editor | None = None
    done: int = 0
    edit_seconds: float = 0.0
    finished: set[int] = field(default_factory=set)

    @property
    def mode(self) -> str:
        return "sequential" if self.batch_size == 1 else f"batch {self.batch_size}"

    @property
    def name(self) -> str:
        return f"{self.method}-{'seq' if self.batch_size == 1 else f'b{self.batch_size}'}"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(staging, path)


# -- the runs ----------------------------------------------------------------------------------------------


class Benchmark:
    """Round-robin lifelong runs on one model, checkpointed after every milestone."""

    def __init__(self, args: argparse.Namespace, requests: list[EditRequest]) -> None:
        self.args = args
        self.requests = requests
        self.out = Path(args.out_dir)
        self.results_file = self.out / "lifelong.json"
        self.deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
        model, tokenizer, info = load_base(args.model)
        self.loaded = LoadedModel(model, tokenizer, info)
        spec = spec_for_model(model)
        base_config = EditConfig().with_overrides(**args.overrides)
        self.layers = list(base_config.layers or spec.default_layers(len(decoder_layers(model, spec))))
        top = max(args.milestones)
        self.runs: list[Run] = []
        for size in ([] if args.no_sequential else [1]) + args.batch_sizes:
            points = sorted(
                {min(len(requests), math.ceil(t / size) * size) for t in args.milestones if t <= top}
            )
            for method in args.methods:
                config = base_config.with_overrides(
                    method=method,
                    layers=tuple(self.layers),
                    mode="sequential" if size == 1 else "batch",
                    batch_size=size,
                )
                self.runs.append(Run(method, size, points, config))
        refuse_unread([run.config for run in self.runs], args.overrides)
        if args.resume:
            refuse_other_settings(self.results_file, self.runs)  # before the statistics
        self.stats = load_statistics(model, tokenizer, self.layers, [run.config for run in self.runs])
        self.rows: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.started = time.perf_counter()

    # evaluation of the base, once
    def base_result(self) -> dict[str, Any]:
        top = max(max(r.milestones) for r in self.runs)
        payload = [[r.to_json() for r in self.requests[:top]], self.args.generations, self.args.model]
        key = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
        file = Path(self.args.checkpoint_dir) / "base.json"
        if file.is_file():
            cached = json.loads(file.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return cached["result"]
        print(f"evaluating the base model on {top} facts", file=sys.stderr)
        result = evaluate(
            self.loaded.model, self.loaded.tokenizer, self.requests[:top], generations=self.args.generations
        )
        write_json(file, {"key": key, "result": result})
        return result

    def _checkpoint_dir(self, run: Run) -> Path:
        return Path(self.args.checkpoint_dir) / run.name

    def _run_key(self, run: Run) -> str:
        return run_key(self.requests[: max(run.milestones)], run.config, [])

    def _editor(self, run: Run) -> Editor:
        """The run's editor with its edits on the model (every other run's edits are off)."""
        if run.editor is None:
            model, tokenizer = self.loaded.model, self.loaded.tokenizer
            run.editor = Editor(
                model,
                tokenizer,
                run.config,
                c0=self.stats.c0,
                past_keys={},
                c_first=self.stats.c_first,
                bank=self.stats.bank,
            )
            if self.args.resume:
                restored = load_checkpoint(self._checkpoint_dir(run), self._run_key(run))
                if restored is not None:
                    run.done, tensors, records = restored
                    run.editor.load_state(tensors, records)
                    run.edit_seconds = sum(r.seconds.get("total", 0.0) for r in records)
                    return run.editor
        else:
            run.editor.load_state(run.editor.state_tensors(), run.editor.records)
        return run.editor

    def _save(self, run: Run) -> None:
        assert run.editor is not None
        save_checkpoint(self._checkpoint_dir(run), run.editor, run.done, self._run_key(run))

    def advance(self, run: Run, target: int, base: dict[str, Any]) -> bool:
        """Edit ``run`` up to ``target`` facts and evaluate; False when time ran out first."""
        editor = self._editor(run)
        try:
            while run.done < target:
                if time.monotonic() > self.deadline:
                    self.stopped = f"--max-minutes {self.args.max_minutes} reached"
                    self._save(run)
                    return False
                chunk = self.requests[run.done : run.done + run.batch_size]
                t0 = time.perf_counter()
                editor.edit(chunk, run.done)
                run.edit_seconds += time.perf_counter() - t0
                run.done += len(chunk)
                print(f"{run.name}: {run.done}/{target} edits", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            result = evaluate(
                self.loaded.model,
                self.loaded.tokenizer,
                self.requests[:target],
                generations=self.args.generations,
            )
            comparison = compare(base, result, patches=editor.final_deltas())  # final_deltas releases
            self._save(run)
        finally:
            editor.release()
        fp = comparison.pop("footprint")
        row = {
            "method": run.method,
            "mode": run.mode,
            "batch_size": run.batch_size,
            "T": target,
            **result["metrics"],
            **comparison,
            "union_share": fp["mean_share"],
            "union_max_share": fp["max_share"],
            "union_neurons": fp["union_neurons"],
            "parameters_changed": fp["parameters_changed"],
            "patch_bytes": fp["patch_bytes"],
            "dense_bytes": fp["dense_bytes"],
            "seconds_per_edit": run.edit_seconds / max(1, run.done),
            "eval_seconds": time.perf_counter() - t0,
        }
        self.rows = [
            r
            for r in self.rows
            if not (r["method"] == run.method and r["mode"] == run.mode and r["T"] == target)
        ]
        self.rows.append(row)
        run.finished.add(target)
        self.save_results()
        print(
            f"{run.name} T={target}: efficacy {row['efficacy']:.3f} specificity {row['specificity']:.3f} "
            f"ppl drift {row['perplexity_drift_pct']:+.2f}% union {row['union_share']:.1%}",
            file=sys.stderr,
            flush=True,
        )
        return True

    def save_results(self) -> None:
        write_json(
            self.results_file,
            {
                "command": self.args.command_line,
                "facts": self.args.facts,
                "layers": self.layers,
                "configs": {run.name: run.config.resolved().to_json() for run in self.runs},
                "rows": self.rows,
                "stopped": self.stopped,
                "elapsed_s": round(time.perf_counter() - self.started, 1),
                "machine": machine_line(),
                "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            },
        )

    def run(self) -> None:
        if self.args.resume and self.results_file.is_file():
            self.rows = json.loads(self.results_file.read_text(encoding="utf-8")).get("rows", [])
        base = self.base_result()
        for run in self.runs:
            run.finished = {r["T"] for r in self.rows if r["method"] == run.method and r["mode"] == run.mode}
        for target in sorted({t for r in self.runs for t in r.milestones}):
            for run in self.runs:
                due = target in run.milestones and target not in run.finished
                if due and not self.advance(run, target, base):
                    return


def refuse_other_settings(results_file: Path, runs: list[Run]) -> None:
    """Stop a ``--resume`` whose settings are not those ``results_file`` records for its runs (the defaults
    move between sessions), naming the ``--set`` options that continue the recorded runs."""
    if not results_file.is_file():
        return
    recorded = json.loads(results_file.read_text(encoding="utf-8")).get("configs", {})
    needed: dict[str, Any] = {}
    for run in runs:
        if run.name not in recorded:
            continue
        then = EditConfig.from_json(recorded[run.name]).resolved().to_json()
        now = run.config.resolved().to_json()
        unread = run.config.unused(then)  # in the run key, yet not what the run computes: not asked for
        needed |= {k: v for k, v in then.items() if now.get(k) != v and k not in unread}
    if needed:
        given = " ".join(f"--set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in sorted(needed.items()))
        raise SystemExit(
            f"{results_file} records these runs with other settings than today's defaults and options; "
            f"to continue them add: {given}"
        )


# -- report ------------------------------------------------------------------------------------------------


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()} ({os.cpu_count()} logical CPUs, shared with other jobs; load average {load:.2f}), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"nmke-patch {nmke_patch.__version__}"
    )


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in ("method", "mode", "T"):
        return str(value)
    if key == "patch_bytes":
        return f"{value:,}"
    if key == "perplexity_drift_pct":
        return f"{value:+.2f}"
    if key == "union_share":
        return f"{value:.1%}"
    if key == "seconds_per_edit":
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown(data: dict[str, Any], plots: list[Path]) -> str:
    rows = sorted(data["rows"], key=lambda r: (r["batch_size"], r["method"], r["T"]))
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = "\n".join("| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows)
    status = (
        f"**Partial run** ({data['stopped']}); the table holds every milestone it finished."
        if data.get("stopped")
        else "Complete run."
    )
    lines = [
        f"Command: `{data['command']}` ({data['elapsed_s'] / 60:.1f} min)",
        "",
        f"Machine: {data['machine']}. Date: {data['date']}.",
        "",
        f"Facts: `{data['facts']}` (the first T records, in file order); edited layers {data['layers']}; the "
        "default model (SmolLM2-135M-Instruct). Each milestone evaluates every fact edited so far on the model "
        "carrying all edits; drift figures compare with the unedited base on the same facts. Metric definitions: "
        "`docs/evaluation.md`. 'union neurons/layer' = the mean over edited layers of the share of neurons the "
        "lifetime patch touches; 'patch bytes' = its payload (indices, deltas, originals); 's/edit' = editing "
        "wall time per fact, evaluation excluded.",
        "",
        status,
        "",
        head,
        rule,
        body,
        "",
    ]
    for name in sorted({r["method"] for r in rows if r["method"].startswith("nmke")}):
        final = [r for r in rows if r["method"] == name and r["batch_size"] == 1]
        if not final:
            continue
        last = max(final, key=lambda r: r["T"])
        checks = []
        for key, op, bound in TARGETS:
            value = last.get(key)
            ok = value is not None and (value >= bound if op == ">=" else value <= bound)
            checks.append(f"{key} {_cell(key, value)} ({op} {bound}: {'met' if ok else '**not met**'})")
        lines += [f"Issue 4 figures, {name} sequential at T = {last['T']}: " + "; ".join(checks) + ".", ""]
    shown = (
        "masked_solve",
        "neuron_score",
        "max_neurons",
        "contrast_weight",
        "z_stop_prob",
        "min_preservation",
        "z_optimizer",
        "z_stop_bare",
        "key_columns",
        "contrast_subject_first",
        "contrast_words",
    )
    defaults = EditConfig().to_json()
    for name, written in sorted(data.get("configs", {}).items()):
        config = {**ADDED_FIELDS, **written}  # runs from before a field existed had its old meaning
        if config.get("method") == "nmke":
            other = [  # anything else off today's default (layers: in the facts line)
                f"{k}={json.dumps(v)}"
                for k, v in config.items()
                if k not in (*shown, "layers") and defaults.get(k, v) != v
            ]
            settings = [f"{k}={config.get(k)}" for k in shown] + other
            lines += [f"Settings of {name}: " + ", ".join(settings) + ".", ""]
    if plots:
        lines += [
            "Plots: " + ", ".join(f"`{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}`" for p in plots),
            "",
        ]
    return "\n".join(lines)


def update_benchmarks_md(section_body: str, path: Path) -> None:
    """Replace (or append) this script's section of ``path``; other sections are kept."""
    update_section(path, SECTION, section_body)


def plot(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per metric against T, one line per method and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    labels = dict(COLUMNS)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        series.setdefault((r["method"], r["mode"]), []).append(r)
    colors = {"nmke": "tab:blue", "alphaedit": "tab:orange", "memit": "tab:green"}
    variants = sorted({m for m, _ in series if m not in colors})
    colors |= {
        m: c for m, c in zip(variants, ["tab:purple", "tab:red", "tab:brown", "tab:gray"], strict=False)
    }
    styles = ["-", "--", ":", "-."]
    modes = sorted({m for _, m in series}, key=lambda m: (m != "sequential", m))
    files = []
    markers = ["o", "s", "^", "D"]
    for key in PLOTS:
        if not any(r.get(key) is not None for r in data["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ts: set[int] = set()
        for (method, mode), rows in sorted(series.items()):
            pts = sorted((r["T"], r[key]) for r in rows if r.get(key) is not None)
            if pts:
                k = modes.index(mode)
                ax.plot(
                    [t for t, _ in pts],
                    [v for _, v in pts],
                    styles[k % len(styles)],
                    marker=markers[k % len(markers)],
                    color=colors.get(method),
                    label=f"{method} ({mode})",
                )
                ts.update(t for t, _ in pts)
        ax.set_xscale("log")
        ax.set_xticks(sorted(ts), [str(t) for t in sorted(ts)])
        ax.minorticks_off()
        if key == "patch_bytes":
            ax.set_yscale("log")
        ax.set_xlabel("edits T")
        ax.set_ylabel(labels.get(key, key))
        ax.set_title(f"{labels.get(key, key)} vs T")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = out_dir / f"lifelong_{key}.png"
        fig.savefig(file, dpi=110)
        plt.close(fig)
        files.append(file)
    return files


def merge_results(parts: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One report's data from the ``lifelong.json`` of runs made in separate processes (``names``: their
    out dirs). A method run in more than one of them (e.g. under different settings) is labelled with
    the out dir's name: ``nmke (nmke-seq-defaults)``."""
    first = parts[0]
    seen: dict[tuple[str, str], int] = {}
    for p in parts:
        for key in {(r["method"], r["mode"]) for r in p["rows"]}:
            seen[key] = seen.get(key, 0) + 1
    parts = [
        {
            **p,
            "rows": [
                {**r, "method": f"{r['method']} ({name})"} if seen[(r["method"], r["mode"])] > 1 else r
                for r in p["rows"]
            ],
            "configs": {f"{k} ({name})": c for k, c in p.get("configs", {}).items()},
        }
        for p, name in zip(parts, names, strict=True)
    ]
    if any(p["facts"] != first["facts"] or p["layers"] != first["layers"] for p in parts):
        raise SystemExit("--include: the runs used different facts or layers; they cannot share a table")
    merged = dict(first)
    merged["command"] = " ; ".join(p["command"] for p in parts)
    merged["configs"] = {k: v for p in parts for k, v in p.get("configs", {}).items()}
    merged["rows"] = [r for p in parts for r in p["rows"]]
    merged["stopped"] = "; ".join(p["stopped"] for p in parts if p.get("stopped")) or None
    merged["elapsed_s"] = max(p["elapsed_s"] for p in parts)
    merged["machine"] = first["machine"]
    merged["date"] = max(p["date"] for p in parts)
    return merged


def report(args: argparse.Namespace) -> None:
    files = [Path(d) / "lifelong.json" for d in [args.out_dir, *args.include]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"no results in {', '.join(map(str, missing))}", file=sys.stderr)
        return
    data = merge_results(
        [json.loads(f.read_text(encoding="utf-8")) for f in files], [f.parent.name for f in files]
    )
    plots = plot(data, Path(args.out_dir))
    body = markdown(data, plots)
    print(body)
    if not args.no_write:
        update_benchmarks_md(body, ROOT / "BENCHMARKS.md")
        print(f"updated {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


def default_checkpoint_dir(out_dir: str | Path) -> Path:
    """Where the editor states of the runs reported to ``out_dir`` live unless ``--checkpoint-dir`` says."""
    out_key = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return home() / "lifelong" / out_key


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", default="data/counterfact_bench.jsonl", help="records to edit, in order")
    parser.add_argument("--methods", default="nmke,alphaedit,memit")
    parser.add_argument("--milestones", default="10,50,100,250,500,1000", help="T values to evaluate at")
    parser.add_argument(
        "--batch-sizes", default="10,100", help="batch-mode runs besides sequential ('' = none)"
    )
    parser.add_argument("--no-sequential", action="store_true", help="only the batch-mode runs")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and report) after this long")
    parser.add_argument("--model", default=None, help="base model (default: the embedded default)")
    parser.add_argument("--generations", type=int, default=8, help="fluency generations per evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="editor states (default: under $NMKE_PATCH_HOME/lifelong)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from lifelong.json")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="DIR",
        help="also report the lifelong.json of this out dir (runs made in another process)",
    )
    args = parser.parse_args()
    args.command_line = "python benchmarks/lifelong.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.methods = [m for m in args.methods.split(",") if m]
    args.milestones = _ints(args.milestones)
    args.batch_sizes = _ints(args.batch_sizes)
    args.overrides = {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        try:
            args.overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            args.overrides[key] = value
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(default_checkpoint_dir(args.out_dir))
    if args.report_only:
        report(args)
        return
    requests = read_requests(args.facts)
    if max(args.milestones) > len(requests):
        print(f"{args.facts} has {len(requests)} records; milestones above that are cut", file=sys.stderr)
        args.milestones = sorted({min(t, len(requests)) for t in args.milestones})
    bench = Benchmark(args, requests)
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.stopped = "interrupted"
    finally:
        bench.save_results()
        report(args)


if __name__ == "__main__":
    main()

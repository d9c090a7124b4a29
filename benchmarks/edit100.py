"""Issue 3 figures: N sequential single edits on the development set, one method per run, then evaluation.

Usage (one process per method; they can run side by side)::

    python benchmarks/edit100.py --method nmke --n 100
    python benchmarks/edit100.py --summarize   # writes the table into BENCHMARKS.md

Each run checkpoints (a rerun of the same command continues from it), writes the patch to ``benchmarks/results/edit<N>-<method>.nmke``
and the evaluation to ``benchmarks/results/edit<N>-<method>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from _report import parse_settings, refuse_unread, update_section

from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.evaluate import evaluate_pair
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import load_base
from nmke_patch.requests import read_requests

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SECTION = "## Sequential edits on the development set (issue 3)"


def run(method: str, n: int, facts: Path, overrides: dict[str, object], tag: str) -> None:
    requests = read_requests(facts)[:n]
    loaded = LoadedModel(*load_base())
    config = EditConfig().with_overrides(method=method, **overrides)
    refuse_unread([config], overrides)
    stem = RESULTS / f"edit{n}-{tag}"
    start = time.perf_counter()
    patch = create_patch(
        requests,
        loaded=loaded,
        config=config,
        name=stem.name,
        checkpoint_dir=stem.with_suffix(".ckpt"),
        resume=True,
        checkpoint_every=10,
        progress=lambda d, t: print(f"{tag}: {d}/{t} {time.perf_counter() - start:.0f}s", flush=True),
    )
    wall = time.perf_counter() - start
    saved = patch.save(stem.with_suffix(".nmke"), overwrite=True)
    result = evaluate_pair(loaded.model, loaded.tokenizer, requests, [saved])
    seconds = [m["seconds"] for m in saved.manifest.metrics]
    result["timing"] = {
        "wall_s": wall,
        "per_edit_mean_s": statistics.mean(s["total"] for s in seconds),
        "z_mean_s": statistics.mean(s["z"] for s in seconds),
        "attribution_mean_s": statistics.mean(s["attribution"] for s in seconds),
        "solve_mean_s": statistics.mean(s["solve"] for s in seconds),
        "z_steps_mean": statistics.mean(m["z_steps"] for m in saved.manifest.metrics),
        "neurons_per_edit_per_layer": statistics.mean(
            v for m in saved.manifest.metrics for v in m["neurons"].values()
        ),
    }
    result["config"] = config.resolved().to_json()
    result["n"] = n
    result["tag"] = tag
    result["threads"] = torch.get_num_threads()
    (stem.with_suffix(".json")).write_text(json.dumps(result, indent=1, default=str))
    print(
        json.dumps(
            {"patched": result["patched"]["metrics"], "comparison": result["comparison"]}, default=str
        )[:2000]
    )


def summarize() -> None:
    rows = []
    for file in sorted(RESULTS.glob("edit*-*.json")):
        r = json.loads(file.read_text())
        p, b, c, t = r["patched"]["metrics"], r["base"]["metrics"], r["comparison"], r["timing"]
        fp = c["footprint"]

        def f(v: object) -> str:
            return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

        rows.append(
            f"| {r['tag']} | {r['n']} | {f(p.get('efficacy'))} | {f(p.get('generalization'))} | {f(p.get('specificity'))} "
            f"| {f(c.get('zsre_neighborhood_agreement'))} | {f(c.get('perplexity_drift_pct'))} "
            f"| {f(c.get('unrelated_retention'))} | {t['neurons_per_edit_per_layer'] / 1536:.3f} "
            f"| {f(fp.get('mean_share'))} | {fp.get('patch_bytes')} | {t['per_edit_mean_s']:.1f} "
            f"| {t['z_mean_s']:.1f} / {t['attribution_mean_s']:.1f} / {t['solve_mean_s']:.1f} | {f(b.get('efficacy'))} |"
        )
    header = (
        "| run | T | efficacy | generalization | specificity | neighbour agreement | ppl drift % | unrelated "
        "retention | neurons/edit/layer | union share | patch bytes | s/edit | z / attribution / solve s | base efficacy |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    text = (
        f"{SECTION}\n\nCommand: `python benchmarks/edit100.py --method M --n 100` per method (run side by side, "
        f"`OMP_NUM_THREADS=1`), then `python benchmarks/edit100.py --summarize`. Machine: {platform.machine()} "
        f"2-core CPU shared with other jobs, torch {torch.__version__}, {date.today()}. Facts: the first T records "
        "of `data/counterfact_dev.jsonl`, edited one at a time, all evaluated after the last edit.\n\n"
        f"{header}\n" + "\n".join(rows) + "\n"
    )
    update_section(ROOT.parent / "BENCHMARKS.md", SECTION, text.removeprefix(SECTION))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="nmke")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--facts", type=Path, default=ROOT.parent / "data" / "counterfact_dev.jsonl")
    parser.add_argument("--set", action="append", default=[], help="EditConfig override KEY=JSON")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args()
    if args.summarize:
        summarize()
        return
    overrides = parse_settings(args.set)
    RESULTS.mkdir(exist_ok=True)
    run(args.method, args.n, args.facts, overrides, args.tag or args.method)


if __name__ == "__main__":
    main()

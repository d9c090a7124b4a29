"""Issue 3 speed figure: wall time per sequential edit on the default model, split by stage.

Usage::

    python benchmarks/edit_speed.py --n 10 --threads 2   # run on an otherwise idle machine

Edits ``--n`` records of ``data/counterfact_dev.jsonl`` (from ``--start``) one at a time after one warm-up
edit, with the default settings (``--set KEY=JSON`` overrides; ``--methods`` for the baselines; each
``--variant 'LABEL:KEY=JSON;...'`` adds an NMKE row with other settings, measured in the same run), and writes
the mean seconds per edit (total, target value z, attribution and mask, solve, other forward passes) to the
section "## Time per edit (issue 3)" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from _report import cpu_name, parse_settings, refuse_unread, update_section

from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import load_base
from nmke_patch.requests import read_requests

ROOT = Path(__file__).resolve().parent
SECTION = "## Time per edit (issue 3)"
STAGES = ("total", "z", "attribution", "solve", "forward")


def measure(method: str, n: int, start: int, overrides: dict[str, object]) -> dict[str, float]:
    requests = read_requests(ROOT.parent / "data" / "counterfact_dev.jsonl")[start : start + n + 1]
    loaded = LoadedModel(*load_base())
    config = EditConfig().with_overrides(method=method, **overrides)
    create_patch(requests[:1], loaded=loaded, config=config, name="warm-up")  # caches, allocator, C0
    t0 = time.perf_counter()
    patch = create_patch(requests[1:], loaded=loaded, config=config, name="speed")
    wall = (time.perf_counter() - t0) / n
    seconds = [m["seconds"] for m in patch.manifest.metrics]
    out = {stage: statistics.mean(s[stage] for s in seconds) for stage in STAGES}
    out["wall_per_edit"] = wall
    out["z_steps"] = statistics.mean(m["z_steps"] for m in patch.manifest.metrics)
    return out


def parse_variant(text: str, base: dict[str, object]) -> tuple[str, dict[str, object]]:
    """``LABEL:KEY=JSON;KEY=JSON`` -> (label, the base overrides updated with these)."""
    label, _, settings = text.partition(":")
    return label, {**base, **parse_settings(filter(None, settings.split(";")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--start", type=int, default=100, help="first record (away from the tuning records)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="nmke,alphaedit")
    parser.add_argument("--set", action="append", default=[], help="EditConfig override KEY=JSON")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=JSON[;KEY=JSON]",
        help="an extra NMKE row with these overrides, measured in the same run (side by side)",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_settings(args.set)
    runs = [(method, method, overrides) for method in args.methods.split(",")]
    runs += [("nmke", *parse_variant(v, overrides)) for v in args.variant]
    for method, _label, settings in runs:
        refuse_unread([EditConfig().with_overrides(method=method, **settings)], settings)
    rows = []
    for method, label, settings in runs:
        r = measure(method, args.n, args.start, settings)
        print(label, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
        share = r["attribution"] / r["total"]
        rows.append(
            f"| {label} | {r['wall_per_edit']:.2f} | {r['z']:.2f} ({r['z_steps']:.1f} steps) "
            f"| {r['attribution']:.2f} ({share:.0%}) | {r['solve']:.2f} | {r['forward']:.2f} |"
        )
    if args.no_write:
        return
    body = (
        f"Command: `python benchmarks/edit_speed.py --n {args.n} --threads {args.threads}"
        + "".join(f" --set {s}" for s in args.set)
        + "".join(f" --variant '{v}'" for v in args.variant)
        + f"` on an otherwise idle machine ({cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
        f"{date.today()}); records {args.start + 1}-{args.start + args.n} of the development set, sequential "
        "single edits after one warm-up edit. Seconds per edit; attribution includes the mask and the contrast "
        "keys, forward the passes before and after the solve.\n\n"
        "| method | wall s/edit | z s | attribution s (share) | solve s | forward s |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    update_section(ROOT.parent / "BENCHMARKS.md", SECTION, body)
    print(body)


if __name__ == "__main__":
    main()

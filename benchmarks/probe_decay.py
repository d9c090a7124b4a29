"""Do lifelong edits fade, or do later edits land less? Efficacy of a lifelong run's edits by age.

Usage::

    python benchmarks/probe_decay.py OUT_DIR [--run nmke-seq] [--facts data/counterfact_bench.jsonl] [--bucket 100]
    python benchmarks/probe_decay.py OUT_DIR --records-only   # the run's records alone, no model

Reads the editor checkpoint that ``benchmarks/lifelong.py --out-dir OUT_DIR`` left (its accumulated
deltas and per-edit records), puts the deltas on the default model, and prints, per bucket of edits in
the order they were made: the share whose new target beats the true one now (efficacy), the mean P(new)
now, and from the run's records the mean P(new) right after the edit was made, how many edits stayed
below P(new) 0.5 then, and the mean share of each edited layer's neurons an edit changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lifelong import default_checkpoint_dir
from safetensors.torch import load_file

from nmke_patch.architectures import spec_for_model
from nmke_patch.create import target_probabilities
from nmke_patch.models import load_base
from nmke_patch.requests import read_requests

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--run", default="nmke-seq", help="the run's name inside the checkpoint folder")
    parser.add_argument("--facts", default=str(ROOT / "data" / "counterfact_bench.jsonl"))
    parser.add_argument("--bucket", type=int, default=100)
    parser.add_argument("--records-only", action="store_true", help="skip the model: records' columns only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = default_checkpoint_dir(args.out_dir) / args.run
    progress = json.loads((folder / "progress.json").read_text())
    records = progress["records"]
    after = torch.tensor([rec["p_new_after"] for rec in records])
    layers = [sum(rec["neurons"].values()) / len(rec["neurons"]) for rec in records]
    d_ff: int | None = None  # from the run's deltas, when loaded
    p_new = p_true = torch.zeros(len(records))
    if not args.records_only:
        p_new, p_true, d_ff = _on_model(folder, args.facts, len(records))
    print(f"{len(records)} edits of {folder}")
    print(
        "| edits | efficacy now | P(new) now | P(new) right after the edit | below 0.5 then | neurons/edit/layer |"
    )
    print("|---|---|---|---|---|---|")
    for s in range(0, len(records), args.bucket):
        e = min(len(records), s + args.bucket)
        now = (
            "- | -"
            if args.records_only
            else f"{(p_new[s:e] > p_true[s:e]).float().mean():.2f} | {p_new[s:e].mean():.2f}"
        )
        neurons = sum(layers[s:e]) / (e - s)
        share = f"{neurons:.0f}" if d_ff is None else f"{neurons / d_ff:.3f}"
        print(
            f"| {s + 1}-{e} | {now} | {after[s:e].mean():.2f} | {int((after[s:e] < 0.5).sum())} | {share} |"
        )
    if not args.records_only:
        print(f"all: efficacy {(p_new > p_true).float().mean():.3f}")


def _on_model(folder: Path, facts: str, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """P(new) and P(true) of the first ``n`` facts on the default model carrying the run's deltas, and d_ff."""
    state = load_file(str(folder / "state.safetensors"))
    model, tokenizer, _ = load_base()
    model.requires_grad_(False)
    spec = spec_for_model(model)
    params = dict(model.named_parameters())
    cums = {int(name.split(".")[1]): cum for name, cum in state.items() if name.startswith("cum.")}
    for layer, cum in cums.items():  # [d_ff, d]
        weight = params[spec.weight_name(layer)]
        weight.add_((cum.T if spec.neuron_axis == 1 else cum).to(weight.dtype))
    requests = read_requests(facts)[:n]
    texts = [r.text for r in requests]
    p_new = target_probabilities(model, tokenizer, texts, [r.target_new for r in requests])
    p_true = target_probabilities(model, tokenizer, texts, [r.target_true or "" for r in requests])
    return p_new, p_true, next(iter(cums.values())).shape[0]


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""Do lifelong edits fade, or do later edits land less? Efficacy of a lifelong run's edits by age.

Usage::

    python benchmarks/probe_decay.py OUT_DIR [--run nmke-seq] [--facts data/counterfact_bench.jsonl] [--bucket 100]

Reads the editor checkpoint that ``benchmarks/lifelong.py --out-dir OUT_DIR`` left (its accumulated
deltas and per-edit records), puts the deltas on the default model, and prints, per bucket of edits in
the order they were made: the share whose new target beats the true one now (efficacy), the mean P(new)
now, and the mean P(new) right after the edit was made (from the run's records).
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = default_checkpoint_dir(args.out_dir) / args.run
    progress = json.loads((folder / "progress.json").read_text())
    records = progress["records"]
    state = load_file(str(folder / "state.safetensors"))
    model, tokenizer, _ = load_base()
    model.requires_grad_(False)
    spec = spec_for_model(model)
    params = dict(model.named_parameters())
    for name, cum in state.items():
        if name.startswith("cum."):
            weight = params[spec.weight_name(int(name.split(".")[1]))]
            weight.add_((cum.T if spec.neuron_axis == 1 else cum).to(weight.dtype))
    requests = read_requests(args.facts)[: len(records)]
    texts = [r.text for r in requests]
    p_new = target_probabilities(model, tokenizer, texts, [r.target_new for r in requests])
    p_true = target_probabilities(model, tokenizer, texts, [r.target_true or "" for r in requests])
    after = torch.tensor([rec["p_new_after"] for rec in records])
    print(f"{len(records)} edits of {folder}")
    print("| edits | efficacy now | P(new) now | P(new) right after the edit |")
    print("|---|---|---|---|")
    for s in range(0, len(records), args.bucket):
        e = min(len(records), s + args.bucket)
        ok = (p_new[s:e] > p_true[s:e]).float().mean()
        print(f"| {s + 1}-{e} | {ok:.2f} | {p_new[s:e].mean():.2f} | {after[s:e].mean():.2f} |")
    print(f"all: efficacy {(p_new > p_true).float().mean():.3f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""Target values z under Adam and normalized descent, and how a prompt-initial subject differs.

Usage: ``python benchmarks/probe_targets.py [--n 16] [--start 100] [--probes 18,0]``.

For records ``start..start+n`` of the development set (default model, last edited layer) it prints, per z
optimiser, the mean seconds, steps and ``||z - h|| / ||h||`` at the default early stop. For the records
``--probes`` (18: "Germany is located in the continent of"; 0: a prompt with context before its subject)
it prints the cosine between the bare prompt's key and the prefixed prompts' mean key and the last edited
layer's output norm per prompt: the evidence behind ``z_optimizer``, ``z_stop_bare`` and ``key_columns``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nmke_patch.architectures import spec_for_model
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.methods.nmke.engine import Editor
from nmke_patch.methods.nmke.values import compute_target_value
from nmke_patch.models import load_base
from nmke_patch.requests import read_requests
from nmke_patch.stats import load_statistics

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--probes", default="18,0", help="development-set indices for the key comparison")
    args = parser.parse_args()
    model, tokenizer, _ = load_base()
    requests = read_requests(ROOT / "data" / "counterfact_dev.jsonl")
    config = EditConfig()
    spec = spec_for_model(model)
    layers = list(spec.default_layers(model.config.num_hidden_layers))
    stats = load_statistics(model, tokenizer, layers, [config])
    editor = Editor(model, tokenizer, config, c0=stats.c0, c_first=stats.c_first, bank=stats.bank)
    sample = requests[args.start : args.start + args.n]
    for optimizer in ("adam", "normalized"):
        cfg = config.with_overrides(z_optimizer=optimizer, z_stop_bare=False)
        t0 = time.perf_counter()
        values = [
            compute_target_value(model, tokenizer, spec, layers[-1], r, editor.prefixes, cfg) for r in sample
        ]
        print(
            f"{optimizer}: {(time.perf_counter() - t0) / len(sample):.2f} s, "
            f"{statistics.mean(v.steps for v in values):.1f} steps, "
            f"||z-h||/||h|| {statistics.mean(float((v.z - v.h).norm() / v.h.norm()) for v in values):.3f}"
        )
    for r in (requests[int(i)] for i in args.probes.split(",")):
        batch, _ = editor._batch([r])
        fw = editor._forward(batch, editor.layers)
        keys = fw.keys_subject[layers[-1]]
        cosine = float(torch.nn.functional.cosine_similarity(keys[0], keys[1:].mean(dim=0), dim=0))
        norms = [round(float(x), 1) for x in fw.out_subject.norm(dim=1)]
        print(f"{r.text!r}: key cosine bare vs prefixed {cosine:+.3f}; output norms (bare first) {norms}")


if __name__ == "__main__":
    main()

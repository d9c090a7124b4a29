"""Which neighbour prompts lose their answer after an ``edit100.py`` run, by base margin and prompt shape.

Usage::

    python benchmarks/probe_neighbours.py nmke-wiki nmke-wiki-keep03 alphaedit-wiki

For each tag, reads ``benchmarks/results/edit100-<tag>.json`` (the base's and the patched model's argmax at
each neighbour prompt's answer tokens) and prints the share of distinct neighbour prompts whose first
answer token is unchanged, by the base model's margin there (log P(answer) - log P(best other token),
nats) and by whether the prompt opens with its subject or with other text ("The ...").
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from nmke_patch.models import load_base
from nmke_patch.requests import Neighbor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_damage import margins

RESULTS = Path(__file__).resolve().parent / "results"
BINS = ((0.5, "< 0.5"), (1.0, "0.5-1"), (2.0, "1-2"), (float("inf"), ">= 2"))


def _bin(margin: float) -> str:
    return next(name for top, name in BINS if margin < top)


def main(tags: list[str]) -> None:
    torch.set_num_threads(1)
    model, tokenizer, _ = load_base()
    cache: dict[str, float] = {}
    for tag in tags:
        data = json.loads((RESULTS / f"edit100-{tag}.json").read_text())
        base = data["base"]["details"]["neighborhood_argmax"]
        patched = data["patched"]["details"]["neighborhood_argmax"]
        keys = sorted({k for ks in data["patched"]["details"]["neighborhood"] for k in ks})
        todo = [k for k in keys if k not in cache]
        with torch.no_grad():
            cache.update(
                zip(todo, margins(model, tokenizer, [Neighbor(*k.split("\t")) for k in todo]), strict=True)
            )
        groups: dict[str, list[bool]] = defaultdict(list)
        for k in keys:
            kept = base[k][0] == patched[k][0]
            groups[f"margin {_bin(cache[k])}"].append(kept)
            groups["opens with 'The'" if k.startswith("The ") else "opens with the subject"].append(kept)
        cells = ", ".join(f"{g}: {sum(v) / len(v):.2f} of {len(v)}" for g, v in sorted(groups.items()))
        print(f"{tag} ({len(keys)} prompts, first token kept): {cells}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

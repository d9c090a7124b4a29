"""How long a subject-first prompt's bare key is against the same subject's keys after a context prefix.

The number ``sink_ratio`` (EditConfig) is compared with. A single-token subject that opens the prompt is a
text's first token; where that position is the attention sink its key is the same for every text and far
longer than any other, and an edit keyed there changes every text. Usage::

    python benchmarks/probe_sink.py                      # dev records whose prompt opens with the subject
    python benchmarks/probe_sink.py --layers 3-12 --records 60
    python benchmarks/probe_sink.py --z-layer 11   # also z for the position-0 subjects, unguarded vs guarded

Prints, per record, the subject's token position in the bare prompt and the ratio at each layer (bare key
length / mean length of its keys under five fixed prefixes), then min / median / max per layer, split
into subjects at position 0 and the others. With ``--z-layer L``, the target value z at layer L (the last
edited layer) of each position-0 record without the guard (``sink_ratio=None``) and with the default:
the length of the bare prompt's output ``h``, of z's delta, its steps and the mean target probability.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from nmke_patch.architectures import spec_for_model
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.methods.nmke.prompts import sample_prefixes
from nmke_patch.methods.nmke.values import compute_target_value
from nmke_patch.models import load_base
from nmke_patch.requests import EditRequest
from nmke_patch.tracing import capture

PREFIXES = (
    "The following is a short note.",
    "In the news today,",
    "Here are some facts.",
    "I read that",
    "According to the book,",
)


def subject_keys(model, tokenizer, spec, layers: list[int], text: str, subject: str) -> tuple[dict, int]:
    """Keys (MLP output-projection inputs) at the subject's last token, per layer, and that position."""
    enc = tokenizer(text, return_offsets_mapping=True)
    end = text.rfind(subject) + len(subject) - 1
    pos = max(i for i, (a, _b) in enumerate(enc["offset_mapping"]) if a <= end)
    paths = {str(l): f"{spec.layers}.{l}.{spec.mlp_out}" for l in layers}
    with torch.no_grad(), capture(model, inputs=paths) as seen:
        model(torch.tensor([enc["input_ids"]]))
    return {l: seen[str(l)][0, pos] for l in layers}, pos


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--facts", default="data/counterfact_dev.jsonl")
    parser.add_argument("--layers", default="3-12")
    parser.add_argument("--records", type=int, default=200, help="first N records whose prompt opens with {}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--z-layer", type=int, default=None, help="also compute z at this layer (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    a, b = (int(x) for x in args.layers.split("-"))
    layers = list(range(a, b + 1))
    model, tokenizer, _ = load_base()
    spec = spec_for_model(model)
    lines = Path(args.facts).read_text(encoding="utf-8").splitlines()
    records = [r for r in map(json.loads, lines) if r["prompt"].startswith("{}")][: args.records]
    first_records = []
    ratios: dict[bool, dict[int, list[float]]] = {
        True: {l: [] for l in layers},
        False: {l: [] for l in layers},
    }
    for r in records:
        text = r["prompt"].replace("{}", r["subject"])
        bare, pos = subject_keys(model, tokenizer, spec, layers, text, r["subject"])
        prefixed = [
            subject_keys(model, tokenizer, spec, layers, f"{p} {text}", r["subject"])[0] for p in PREFIXES
        ]
        row = []
        for l in layers:
            ratio = float(bare[l].norm() / torch.stack([k[l].norm() for k in prefixed]).mean())
            ratios[pos == 0][l].append(ratio)
            row.append(f"{l}:{ratio:.1f}")
        if pos == 0:
            first_records.append(r)
        print(f"{r['subject']!r} position {pos}: " + " ".join(row))
    for first in (True, False):
        print(f"\nsubject at position {'0' if first else '> 0'} ({len(ratios[first][layers[0]])} records)")
        for l in layers:
            v = ratios[first][l]
            if v:
                print(f"  layer {l}: min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f}")

    if args.z_layer is not None:
        model.requires_grad_(False)
        config = EditConfig()
        prefixes = sample_prefixes(model, tokenizer, config.n_prefixes, config.prefix_tokens, config.seed)
        print(f"\nz at layer {args.z_layer} for the subjects at position 0")
        for r in first_records:
            request = EditRequest(r["prompt"], r["subject"], r["target_new"], target_true=r["target_true"])
            for ratio in (None, config.sink_ratio):
                t = compute_target_value(
                    model,
                    tokenizer,
                    spec,
                    args.z_layer,
                    request,
                    prefixes,
                    config.with_overrides(sink_ratio=ratio),
                )
                print(
                    f"  {r['subject']!r} sink_ratio={ratio}: ||h|| {float(t.h.norm()):.1f}, ||delta|| "
                    f"{float((t.z - t.h).norm()):.1f}, {t.steps} steps, P(new) {t.p_before:.3f} -> {t.p_after:.3f}"
                )


if __name__ == "__main__":
    main()

"""How far a patch's change spills beyond its subjects, and which neighbour answers it flips.

Usage: ``python benchmarks/probe_spill.py PATCH [--facts data/counterfact_dev.jsonl] [--n 100]``

For the first ``--n`` records of ``--facts`` (the records the patch was made from, e.g. a patch written by
``benchmarks/edit100.py``):

- the edited layers' output change, ``|k @ delta| / |output|`` at each position (mean over the patch's
  layers), at each edit prompt's subject, at its last token, and at the neighbourhood prompts' last token
  and most-changed other token: how selective the edits are;
- neighbour answer tokens (teacher-forced) whose argmax the patch changes, by position (first answer token
  or later) and by the base model's probability of its answer there, and whether a flipped first token
  is the first token of one of the run's new targets.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

from nmke_patch.models import load_base
from nmke_patch.patch import load_patch
from nmke_patch.requests import read_requests
from nmke_patch.stack import PatchStack
from nmke_patch.tokens import text_ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("patch")
    parser.add_argument("--facts", default="data/counterfact_dev.jsonl")
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok, _ = load_base()
    requests = read_requests(args.facts)[: args.n]
    patch = load_patch(args.patch)
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(_module, inputs, output) -> None:
            outputs[name] = (inputs[0][0].detach(), output[0].detach())

        return hook

    for d in patch.deltas:
        model.get_submodule(d.name.rsplit(".", 1)[0]).register_forward_hook(keep(d.name))

    def change(text: str) -> torch.Tensor:
        """Per position, the patch's relative change of the edited layers' output (mean over layers)."""
        with torch.no_grad():
            model(torch.tensor([text_ids(tok, text)]))
        total = None
        for d in patch.deltas:
            key, out = outputs[d.name]
            rel = (key[:, d.indices.long()] @ d.delta.to(key.dtype)).norm(dim=-1) / out.norm(
                dim=-1
            ).clamp_min(1e-9)
            total = rel if total is None else total + rel
        assert total is not None
        return total / len(patch.deltas)

    subject, last = [], []
    for r in requests:
        c = change(r.text)
        head = r.text[: r.text.index(r.subject) + len(r.subject)]
        subject.append(float(c[len(text_ids(tok, head)) - 1]))
        last.append(float(c[-1]))
    pairs = [(r, n) for r in requests for n in r.neighborhood]
    n_last, n_other = [], []
    for _, n in pairs:
        c = change(n.prompt)
        n_last.append(float(c[-1]))
        n_other.append(float(c[:-1].max()))
    med = statistics.median
    print(f"edit prompts: subject {med(subject):.3f}, last token {med(last):.3f} (median relative change)")
    print(f"neighbour prompts: last token {med(n_last):.3f}, most-changed other token {med(n_other):.3f}")

    def answers() -> list[tuple[list[int], list[int], list[float]]]:
        rows = []
        for _, n in pairs:
            prompt = text_ids(tok, n.prompt)
            target = tok(" " + n.target, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1].float()
            probs = logits.softmax(-1)
            rows.append((target, probs.argmax(-1).tolist(), probs.max(-1).values.tolist()))
        return rows

    base = answers()
    stack = PatchStack.for_model(model)
    stack.apply(patch)
    patched = answers()
    stack.unload_all()
    firsts = {tok(" " + r.target_new, add_special_tokens=False).input_ids[0] for r in requests}
    flips, totals, by_band, band_totals, to_new = Counter(), Counter(), Counter(), Counter(), 0
    for (target, b_arg, b_prob), (_, p_arg, _) in zip(base, patched, strict=True):
        for k in range(len(target)):
            where = "first" if k == 0 else "later"
            band = min(int(b_prob[k] * 10), 9)
            totals[where] += 1
            band_totals[band] += 1
            if b_arg[k] != p_arg[k]:
                flips[where] += 1
                by_band[band] += 1
                to_new += k == 0 and p_arg[k] in firsts
    print(
        f"flipped answer tokens: first {flips['first']}/{totals['first']}, later {flips['later']}/{totals['later']}"
    )
    print(f"flipped first tokens that became a new target's first token: {to_new}")
    print("flipped by base probability of the argmax (tenths):")
    for band in sorted(band_totals):
        print(f"  {band / 10:.1f}-{(band + 1) / 10:.1f}: {by_band[band]}/{band_totals[band]}")


if __name__ == "__main__":
    main()

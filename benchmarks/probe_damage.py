"""Is a patch's damage to unrelated facts targeted, or what any change of its size would do?

Usage::

    python benchmarks/probe_damage.py control PATCH [PATCH ...]   # the patch vs a random one of the same size
    python benchmarks/probe_damage.py single 0-6 [JSON]           # what each dev record's edit alone does
    python benchmarks/probe_damage.py lookalike 0-6 [JSON]        # ... to the same prompt's other subjects

``control``: for each patch, the packaged unrelated facts the base answers (exact match) and the patched
model does not, the median base margin (log P(answer) - log P(best other token), first answer token) of
the lost and kept ones, and the same count for a control patch: the same neurons, each value vector
replaced by a random direction of the same length (seed 0).

``single``: each listed record of ``data/counterfact_dev.jsonl`` edited alone (today's defaults, or the
EditConfig overrides in JSON), and the unrelated facts whose margin turns negative, with the three largest
margin drops.

``lookalike``: each listed record edited alone, and what it does to the true facts of every other dev
record with the same prompt template (other subjects the base answers): the edit's own margin (new over
true target, first token), the look-alikes' mean margin change and how many of them turn negative.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.evaluate import load_unrelated, score_targets
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import load_base
from nmke_patch.patch import Patch, load_patch
from nmke_patch.requests import Neighbor, read_requests
from nmke_patch.stack import PatchStack

ROOT = Path(__file__).resolve().parents[1]


def margins(model: torch.nn.Module, tokenizer, facts: list[Neighbor]) -> list[float]:  # type: ignore[no-untyped-def]
    """log P(first answer token) - log P(best other token) at each fact's prompt."""
    out = []
    for fact in facts:
        ids = tokenizer(fact.prompt, return_tensors="pt").input_ids
        answer = tokenizer(fact.prompt + " " + fact.target).input_ids[ids.shape[1]]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        other = logp.clone()
        other[answer] = -float("inf")
        out.append(float(logp[answer] - other.max()))
    return out


def _exact(model: torch.nn.Module, tokenizer, facts: list[Neighbor]) -> list[bool]:  # type: ignore[no-untyped-def]
    return [
        bool(x)
        for x in score_targets(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts]).exact
    ]


@torch.no_grad()
def _random_like(model: torch.nn.Module, patch: Patch) -> dict[str, torch.Tensor]:
    """Add the control change to the model; returns the weights it replaced."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    saved = {}
    for d in patch.deltas:
        weight = params[d.name]
        saved[d.name] = weight.detach().clone()
        delta = d.delta.float()
        noise = torch.randn(delta.shape, generator=gen)
        noise = noise / noise.norm(dim=1, keepdim=True) * delta.norm(dim=1, keepdim=True)
        idx = d.indices.long()
        if d.neuron_axis == 1:
            weight[:, idx] += noise.T.to(weight.dtype)
        else:
            weight[idx] += noise.to(weight.dtype)
    return saved


def control(paths: list[str]) -> None:
    model, tokenizer, _ = load_base()
    facts = load_unrelated()
    base_ok, base_margin = _exact(model, tokenizer, facts), margins(model, tokenizer, facts)
    known = [i for i, ok in enumerate(base_ok) if ok]
    for path in paths:
        patch = load_patch(path)
        stack = PatchStack.for_model(model)
        stack.apply(patch)
        ok, margin = _exact(model, tokenizer, facts), margins(model, tokenizer, facts)
        stack.unload_all()
        saved = _random_like(model, patch)
        control_ok = _exact(model, tokenizer, facts)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in saved.items():
                params[name].copy_(value)
        lost = [i for i in known if not ok[i]]
        kept = [i for i in known if ok[i]]
        print(f"== {path}")
        print(f"unrelated facts the base answers: {len(known)}; lost: {len(lost)}; "
              f"lost by the random control of the same size: {sum(not control_ok[i] for i in known)}")  # fmt: skip
        if lost and kept:
            print(f"median base margin of the lost {statistics.median(base_margin[i] for i in lost):.2f}, "
                  f"of the kept {statistics.median(base_margin[i] for i in kept):.2f}; median margin change "
                  f"lost {statistics.median(margin[i] - base_margin[i] for i in lost):+.2f}, "
                  f"kept {statistics.median(margin[i] - base_margin[i] for i in kept):+.2f}")  # fmt: skip


def single(spec: str, overrides: str) -> None:
    lo, _, hi = spec.partition("-")
    indices = range(int(lo), int(hi or lo) + 1)
    loaded = LoadedModel(*load_base())
    model, tokenizer = loaded.model, loaded.tokenizer
    facts = load_unrelated()
    base = margins(model, tokenizer, facts)
    requests = read_requests(ROOT / "data" / "counterfact_dev.jsonl")
    config = EditConfig().with_overrides(**json.loads(overrides))
    total = 0
    for i in indices:
        r = requests[i]
        patch = create_patch([r], loaded=loaded, config=config, name="probe")
        stack = PatchStack.for_model(model)
        stack.apply(patch)
        after = margins(model, tokenizer, facts)
        stack.unload_all()
        drops = sorted((after[j] - base[j], j) for j in range(len(facts)) if base[j] > 0)
        lost = sum(after[j] < 0 for _, j in drops)
        total += lost
        worst = "; ".join(f"{facts[j].prompt!r} {d:+.2f}" for d, j in drops[:3])
        print(
            f"{i} {r.subject!r} -> {r.target_new!r} [{r.prompt}]: {lost} lost; largest drops: {worst}",
            flush=True,
        )
    print(f"{total} lost over {len(indices)} single edits")


def lookalike(spec: str, overrides: str) -> None:
    lo, _, hi = spec.partition("-")
    loaded = LoadedModel(*load_base())
    model, tokenizer = loaded.model, loaded.tokenizer
    requests = read_requests(ROOT / "data" / "counterfact_dev.jsonl")
    config = EditConfig().with_overrides(**json.loads(overrides))
    total = 0
    changes: list[float] = []
    own_margins: list[float] = []
    for i in range(int(lo), int(hi or lo) + 1):
        r = requests[i]
        others = [
            Neighbor(q.text, q.target_true)
            for q in requests
            if q.prompt == r.prompt and q.subject != r.subject and q.target_true
        ]
        base = margins(model, tokenizer, others)
        stack = PatchStack.for_model(model)
        stack.apply(create_patch([r], loaded=loaded, config=config, name="probe"))
        after = margins(model, tokenizer, others)
        own = margins(model, tokenizer, [Neighbor(r.text, r.target_new)])[0]
        stack.unload_all()
        known = [j for j in range(len(others)) if base[j] > 0]
        lost = sum(after[j] < 0 for j in known)
        change = statistics.mean(after[j] - base[j] for j in known) if known else 0.0
        total += lost
        own_margins.append(own)
        changes += [after[j] - base[j] for j in known]
        print(f"{i} {r.subject!r} -> {r.target_new!r} [{r.prompt}]: own margin {own:+.2f}; "
              f"{len(known)} look-alikes, mean margin change {change:+.2f}, {lost} lost", flush=True)  # fmt: skip
    print(f"{total} look-alikes lost; mean margin change {statistics.mean(changes):+.3f}; "
          f"edits landed {sum(m > 0 for m in own_margins)}/{len(own_margins)}")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) < 3 or sys.argv[1] not in ("control", "single", "lookalike"):
        sys.exit(__doc__)
    if sys.argv[1] == "control":
        control(sys.argv[2:])
    else:
        run = single if sys.argv[1] == "single" else lookalike
        run(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "{}")

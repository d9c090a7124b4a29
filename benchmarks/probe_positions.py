"""Where in a text does a patch do its damage? The patch's change applied at one position at a time.

Usage: ``python benchmarks/probe_positions.py PATCH [PATCH ...]``

For each patch (e.g. ``benchmarks/results/edit100-<tag>.nmke`` from ``benchmarks/edit100.py``):

- held-out perplexity of the base, of the patched model, of the patched model with the change undone at
  the first position of each text, and with the change kept *only* there (first-token share of the drift);
- for each packaged unrelated fact the base answers and the patched model does not: the single position
  whose change alone lowers P(first answer token) most, and the count of such positions by kind (the
  text's first token, its last token, or a token in between).

The change at a position is the edited layers' output on the patched weights instead of the base weights
(forward hooks on the edited modules), so the columns isolate positions without changing the patch.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from nmke_patch.evaluate import load_heldout, load_unrelated, perplexity, score_targets
from nmke_patch.models import load_base
from nmke_patch.patch import load_patch
from nmke_patch.stack import PatchStack


@contextmanager
def change_only_at(model: torch.nn.Module, base: dict[str, torch.Tensor], keep: str | int) -> Iterator[None]:
    """Inside: each edited module's output is the base output except at positions ``keep``
    ("first", "not-first" or a position index)."""
    modules = dict(model.named_modules())
    hooks = []
    for name, weight in base.items():

        def hook(_m, inputs, out, weight=weight):  # type: ignore[no-untyped-def]
            mixed = torch.nn.functional.linear(inputs[0], weight)
            if keep == "first":
                mixed[:, 0] = out[:, 0]
            elif keep == "not-first":
                mixed[:, 1:] = out[:, 1:]
            else:
                mixed[:, int(keep)] = out[:, int(keep)]
            return mixed

        hooks.append(modules[name.rsplit(".", 1)[0]].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def first_token_prob(model: torch.nn.Module, tokenizer, prompt: str, target: str) -> float:  # type: ignore[no-untyped-def]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer = tokenizer(prompt + " " + target).input_ids[ids.shape[1]]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, -1].softmax(-1)[answer])


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    model, tokenizer, _ = load_base()
    paragraphs = load_heldout()
    facts = load_unrelated()
    base_ppl, tokens = perplexity(model, tokenizer, paragraphs, max_tokens=1024)
    base_exact = score_targets(model, tokenizer, [f.prompt for f in facts], [f.target for f in facts]).exact
    for path in paths:
        patch = load_patch(path)
        stack = PatchStack.for_model(model)
        params = dict(model.named_parameters())
        names = [d.name for d in patch.deltas]
        base = {n: params[n].detach().clone() for n in names}
        stack.apply(patch)
        try:
            ppl = perplexity(model, tokenizer, paragraphs, max_tokens=1024)[0]
            with change_only_at(model, base, "not-first"):
                undone_first = perplexity(model, tokenizer, paragraphs, max_tokens=1024)[0]
            with change_only_at(model, base, "first"):
                only_first = perplexity(model, tokenizer, paragraphs, max_tokens=1024)[0]
            exact = score_targets(
                model, tokenizer, [f.prompt for f in facts], [f.target for f in facts]
            ).exact
            kinds: Counter[str] = Counter()
            examples = []
            for fact, was, now in zip(facts, base_exact.tolist(), exact.tolist(), strict=True):
                if not was or now:
                    continue
                n = len(tokenizer(fact.prompt).input_ids)
                probs = []
                for i in range(n):
                    with change_only_at(model, base, i):
                        probs.append(first_token_prob(model, tokenizer, fact.prompt, fact.target))
                worst = min(range(n), key=probs.__getitem__)
                kinds["first" if worst == 0 else "last" if worst == n - 1 else "between"] += 1
                word = tokenizer.decode(tokenizer(fact.prompt).input_ids[worst])
                examples.append(f"{fact.prompt!r} -> worst at {word!r} (P {probs[worst]:.2f})")
        finally:
            stack.unload_all()
        drift = lambda x: 100 * (x / base_ppl - 1)  # noqa: E731
        print(f"== {path}")
        print(
            f"held-out perplexity ({tokens} tokens): base {base_ppl:.3f}, patched {drift(ppl):+.1f}%, "
            f"change undone at the first position {drift(undone_first):+.1f}%, "
            f"change only at the first position {drift(only_first):+.1f}%"
        )
        print(f"unrelated facts lost: {sum(kinds.values())}; position doing most damage: {dict(kinds)}")
        for line in examples:
            print("  ", line)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The README demo: edit the facts in examples/facts.json on the embedded default model, show the model's
answers before and after, then revert and check that the weights are bit-identical to the base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from nmke_patch import PatchStack, load_model, load_patch
from nmke_patch.requests import read_requests

ROOT = Path(__file__).resolve().parent
FACTS = ROOT / "facts.json"
PATCH = ROOT.parent / "out" / "demo.nmke"


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: object, prompt: str, tokens: int = 6) -> str:
    ids = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined, operator]
    text = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    return " ".join(text.split())  # type: ignore[attr-defined]


def main() -> None:
    PATCH.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "nmke_patch.cli.main", "create", str(FACTS), "-o", str(PATCH), "--overwrite"]
    print("$", " ".join(["nmke-patch", *cmd[3:]]), flush=True)
    subprocess.run(cmd, check=True)
    requests = read_requests(FACTS)
    model, tokenizer = load_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [(r.text, r.target_new) for r in requests] + [
        (p, None) for r in requests for p in r.paraphrases[:1]
    ]
    prompts += [(n.prompt, n.target) for r in requests for n in r.neighborhood[:1]]
    before = {p: answer(model, tokenizer, p) for p, _ in prompts}
    stack = PatchStack.for_model(model)
    stack.apply(load_patch(PATCH))
    after = {p: answer(model, tokenizer, p) for p, _ in prompts}
    stack.unload_all()
    exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    print(f"\n{'prompt':55} | {'before':22} | after")
    for p, _ in prompts:
        print(f"{p[:55]:55} | {before[p][:22]:22} | {after[p]}")
    print(f"\nreverted: weights bit-identical to the base: {exact}")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Issue 5 figures for a real multi-edit patch on the default model.

(1) LoRA export: max |logits(PeftModel) - logits(nmke-patch stack)| in fp32 and the adapter size;
(2) push + pull + apply of the patch as an edit pack against the local Hub-protocol test server
    (tests/hub_server.py, 127.0.0.1 only), wall time end to end.

Usage: ``python benchmarks/bench_portable.py PATCH_DIR`` (e.g. a patch written by benchmarks/edit100.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("patch", type=Path, help="a patch directory made on the default model")
    patch_dir = parser.parse_args().patch
    from peft import PeftModel

    from nmke_patch.export.peft import export_peft
    from nmke_patch.models import load_base
    from nmke_patch.patch import load_patch
    from nmke_patch.stack import PatchStack

    patch = load_patch(patch_dir)
    n_edits = len(patch.manifest.requests)
    model, tok, _ = load_base()
    ids = tok(
        [
            "The capital of France is",
            "The main language spoken in Argentina is",
            "Water boils at a temperature of",
        ],
        return_tensors="pt",
        padding=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = export_peft([patch], Path(tmp) / "adapter")
        size = sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
        stack = PatchStack.for_model(model)
        stack.apply(patch)
        with torch.no_grad():
            patched = model(**ids).logits
        stack.unload_all()
        peft_model = PeftModel.from_pretrained(model, str(Path(tmp) / "adapter"))
        with torch.no_grad():
            adapted = peft_model(**ids).logits
        mask = ids.attention_mask.bool()
        diff = float((adapted - patched)[mask].abs().max())
        peft_model.unload()
    print(
        f"| LoRA export of a {n_edits}-edit patch, fp32 | max abs logit diff {diff:.2e} | adapter {size:,} bytes "
        f"(patch payload {patch.nbytes:,}) | modules {len(report.modules)} |"
    )

    from hub_server import HubServer

    with tempfile.TemporaryDirectory() as tmp, HubServer(tokens={"tok": "bench"}) as server:
        os.environ["HF_HUB_CACHE"] = str(Path(tmp) / "hub")
        from huggingface_hub import constants

        constants.HF_HUB_CACHE = str(Path(tmp) / "hub")
        from nmke_patch import load_model
        from nmke_patch.hub import push_pack

        fresh, _ = load_model()
        t0 = time.perf_counter()
        push_pack([patch_dir], "bench/pack", token="tok", endpoint=server.url)
        t1 = time.perf_counter()
        os.environ["NMKE_PATCH_HF_ENDPOINT"] = server.url
        os.environ["HF_TOKEN"] = "tok"
        from nmke_patch.sources import resolve_patches

        pulled = resolve_patches(["hf://bench/pack"])
        t2 = time.perf_counter()
        PatchStack.for_model(fresh).apply(pulled[0])
        t3 = time.perf_counter()
    print(
        f"| push + pull + apply of the {n_edits}-edit pack (local server) | {t3 - t0:.2f} s (push {t1 - t0:.2f}, "
        f"pull+verify {t2 - t1:.2f}, apply {t3 - t2:.3f}) | target <= 10 s |"
    )


if __name__ == "__main__":
    main()

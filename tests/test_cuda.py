"""The same mechanics on a GPU: editing, key statistics, the patch stack, evaluation, the CLI, device maps.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``. Each test
compares the GPU result with the same computation on the CPU, or checks bit-exact reverts on the GPU.
``NMKE_TEST_DEVICE`` picks another device (``cuda:1``; ``cpu`` checks the tests themselves).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_state_equal, random_patch, save_tiny, state_copy
from nmke_patch.cli.main import app
from test_engine import TINY_CONFIG, loaded, requests
from test_evaluate import SMALL_EVALUATION, _request
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nmke_patch.create import create_patch
from nmke_patch.errors import ModelLoadError
from nmke_patch.evaluate import evaluate_pair
from nmke_patch.models import load_base
from nmke_patch.patch import Patch, load_patch
from nmke_patch.stack import PatchStack
from nmke_patch.stats import StatsSource, load_or_compute_c0

DEVICE = os.environ.get("NMKE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _create(
    arch: str, tokenizer: PreTrainedTokenizerFast, device: str, home: Path, **overrides: object
) -> Patch:
    """A two-request patch made on ``device`` with its own key-statistics cache under ``home``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NMKE_PATCH_HOME", str(home))
        lm = loaded(arch, tokenizer)
        lm.model.to(device)
        before = state_copy(lm.model)
        patch = create_patch(requests(), loaded=lm, config=TINY_CONFIG.with_overrides(**overrides), name="t")
        assert_state_equal(lm.model, before)  # create leaves the model as it found it, on any device
        return patch


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("method", ["nmke", "alphaedit", "memit"])
def test_create_on_cuda_matches_cpu(arch: str, method: str, tiny_tokenizer, tmp_path: Path) -> None:
    on_cpu = _create(arch, tiny_tokenizer, "cpu", tmp_path / "cpu", method=method)
    on_gpu = _create(arch, tiny_tokenizer, DEVICE, tmp_path / "gpu", method=method)
    assert [d.name for d in on_gpu.deltas] == [d.name for d in on_cpu.deltas]
    for g, c in zip(on_gpu.deltas, on_cpu.deltas, strict=True):
        assert g.delta.device.type == "cpu" and g.original.device.type == "cpu"  # patches live on the CPU
        assert torch.equal(g.indices, c.indices), f"{g.name}: another neuron selection on the GPU"
        assert torch.equal(g.original, c.original)
        assert _relative_error(g.delta, c.delta) < 1e-3, g.name
    for key in on_cpu.state:
        assert _relative_error(on_gpu.state[key], on_cpu.state[key]) < 1e-3, key
    for mg, mc in zip(on_gpu.manifest.metrics, on_cpu.manifest.metrics, strict=True):
        assert mg["p_new_after"] == pytest.approx(mc["p_new_after"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_key_statistics_on_cuda_match_cpu(arch: str, tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    model = MODEL_FACTORIES[arch](init_range=0.2)
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "cpu"))
    source = StatsSource(None, TINY_CONFIG.stats_tokens, TINY_CONFIG.seed)
    c_cpu = load_or_compute_c0(model, tiny_tokenizer, (1, 2), source)
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "gpu"))
    c_gpu = load_or_compute_c0(model.to(DEVICE), tiny_tokenizer, (1, 2), source)
    for layer in (1, 2):
        assert c_gpu[layer].device.type == "cpu"
        assert _relative_error(c_gpu[layer], c_cpu[layer]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_stack_on_cuda_is_bit_exact(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = MODEL_FACTORIES[arch](dtype=dtype)
    patches = [
        random_patch(model, seed=s, name=f"p{s}", neurons=7).save(tmp_path / f"p{s}.nmke") for s in range(3)
    ]
    model.to(DEVICE)
    before = state_copy(model)
    reference = MODEL_FACTORIES[arch](dtype=dtype)
    ref_stack = PatchStack.for_model(reference)
    stack = PatchStack.for_model(model)
    for p in patches:
        stack.apply(p, force=True)
        ref_stack.apply(p, force=True)
    for name, value in model.state_dict().items():  # the same arithmetic as on the CPU, bit for bit
        assert value.device.type == torch.device(DEVICE).type and torch.equal(
            value.cpu(), reference.state_dict()[name]
        ), name
    stack.unload(patches[1])
    stack.unload_all()
    assert_state_equal(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_create_in_half_precision_on_cuda(dtype: torch.dtype, tiny_tokenizer, tmp_path: Path) -> None:
    """What ``--device cuda --dtype bf16`` users run: finite deltas in the weight dtype that apply and revert."""
    lm = loaded("llama", tiny_tokenizer)
    lm.model.to(device=DEVICE, dtype=dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NMKE_PATCH_HOME", str(tmp_path))
        half = create_patch(
            requests(), loaded=lm, config=TINY_CONFIG.with_overrides(method="alphaedit"), name="h"
        )
    for h in half.deltas:
        assert h.original.dtype == dtype and torch.isfinite(h.delta.float()).all()
    assert half.manifest.metrics[0]["p_new_after"] > half.manifest.metrics[0]["p_new_before"]
    before = state_copy(lm.model)
    stack = PatchStack.for_model(lm.model)
    stack.apply(half)
    stack.unload_all()
    assert_state_equal(lm.model, before)


def test_evaluate_on_cuda_matches_cpu(tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model, indices=[0, 1, 2], name="a")
    request = _request(model, tiny_tokenizer, new_is_best=False)
    kwargs = SMALL_EVALUATION
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "cpu"))
    on_cpu = evaluate_pair(model, tiny_tokenizer, [request], [patch], force=True, **kwargs)
    model.to(DEVICE)
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "gpu"))
    on_gpu = evaluate_pair(model, tiny_tokenizer, [request], [patch], force=True, **kwargs)
    for side in ("base", "patched"):
        cpu_metrics, gpu_metrics = on_cpu[side]["metrics"], on_gpu[side]["metrics"]
        assert gpu_metrics.keys() == cpu_metrics.keys()
        for key, value in cpu_metrics.items():
            if isinstance(value, float):
                assert gpu_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (side, key)


def test_cli_create_and_apply_on_cuda(tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    base = save_tiny(MODEL_FACTORIES["llama"](init_range=0.2), tiny_tokenizer, tmp_path / "base")
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in requests()]
        )
    )
    settings = [
        "--set",
        "z_clamp_norm=4.0",
        "--set",
        "n_prefixes=2",
        "--set",
        "prefix_tokens=3",
        "--set",
        "attribution_vocab=0",
    ]
    out = tmp_path / "edit.nmke"
    result = CliRunner().invoke(
        app,
        ["create", str(facts), "-o", str(out), "--model", str(base), "--device", DEVICE, "--layers", "1,2",
         "--max-neurons", "0.25", "--stats-tokens", "300", *settings],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    patch = load_patch(out)
    assert len(patch.manifest.requests) == 2 and patch.num_neurons > 0
    merged = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["apply", str(out), "--model", str(base), "--device", DEVICE, "--out", str(merged)]
    )
    assert result.exit_code == 0, result.output
    model, _, _ = load_base(merged)
    reference, _, _ = load_base(base)
    PatchStack.for_model(reference).apply(patch)
    assert_state_equal(model, reference.state_dict())


def _split_map(devices: tuple[str | int, str | int]) -> dict[str, str | int]:
    """Tiny Llama's layers 0-1 (and the embeddings) on the first device, layers 2-3 on the second."""
    first, second = devices
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.layers.0": first,
        "model.layers.1": first,
        "model.layers.2": second,
        "model.layers.3": second,
        "model.norm": second,
        "lm_head": first,
    }


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_create_across_two_gpus_matches_one(tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    """A model spread by ``device_map`` (edited layers 1 and 2 on different GPUs) edits as on one GPU."""
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    base = save_tiny(MODEL_FACTORIES["llama"](init_range=0.2), tiny_tokenizer, tmp_path / "base")
    single = create_patch(
        requests(), loaded=_loaded_from(base, device="cuda:0"), config=TINY_CONFIG, name="s"
    )
    spread_lm = _loaded_from(base, device_map=_split_map((0, 1)))
    before = state_copy(spread_lm.model)
    spread = create_patch(requests(), loaded=spread_lm, config=TINY_CONFIG, name="s")
    assert_state_equal(spread_lm.model, before)
    for a, b in zip(spread.deltas, single.deltas, strict=True):
        assert torch.equal(a.indices, b.indices) and _relative_error(a.delta, b.delta) < 1e-3, a.name
    stack = PatchStack.for_model(spread_lm.model)
    stack.apply(spread)
    stack.unload_all()
    assert_state_equal(spread_lm.model, before)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CPU offloading needs a GPU beside the CPU")
def test_cpu_offloaded_weights_are_refused_with_a_clear_error(
    tiny_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    """``device_map`` with 'cpu' beside a GPU offloads those weights (meta tensors): refused, nothing changed."""
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    model = MODEL_FACTORIES["llama"](init_range=0.2)
    base = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    patch = random_patch(model, layers=(2,)).save(tmp_path / "p.nmke")
    offloaded = _loaded_from(base, device_map=_split_map((0, "cpu")))
    with pytest.raises(ModelLoadError, match="offloaded"):
        create_patch(requests(), loaded=offloaded, config=TINY_CONFIG, name="s")
    with pytest.raises(ModelLoadError, match="offloaded"):
        PatchStack.for_model(offloaded.model).apply(patch)


def _loaded_from(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    from nmke_patch.create import LoadedModel

    return LoadedModel(*load_base(path, **kwargs))  # type: ignore[arg-type]

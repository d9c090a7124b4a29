"""The patch stack on the real embedded default model (SmolLM2-135M-Instruct, 30 Llama layers).

A random patch of 200 neurons over 5 layers is applied and unloaded exactly in fp32 and bf16, loaded with
``nmke_patch.load_model(patches=[...])`` and verified by the CLI. Run with ``pytest -m default_model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_state_equal, random_patch, state_copy, tiny_llama
from nmke_patch.cli.main import app
from torch import nn
from typer.testing import CliRunner

import nmke_patch
from nmke_patch.delta import add_delta, gather_neurons
from nmke_patch.errors import PatchMismatchError
from nmke_patch.models import load_base
from nmke_patch.patch import Patch, load_patch
from nmke_patch.stack import PatchStack

pytestmark = pytest.mark.default_model

LAYERS = (4, 5, 6, 7, 8)
PER_LAYER = 40  # 5 x 40 = 200 neurons


@pytest.fixture(scope="module")
def fp32() -> nn.Module:
    model, _, info = load_base()
    assert info.model_type == "llama" and "SmolLM2-135M" in info.name_or_path
    return model


@pytest.fixture(scope="module")
def bf16() -> nn.Module:
    model, _, _ = load_base(dtype="bf16")
    return model


@pytest.fixture(scope="module")
def patch(fp32: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Patch:
    made = random_patch(fp32, layers=LAYERS, neurons=PER_LAYER, name="random-200", seed=11, scale=0.05)
    saved = made.save(tmp_path_factory.mktemp("patches") / "random-200.nmke")
    assert saved.path is not None
    return load_patch(saved.path)


@pytest.fixture
def clean_stack(fp32: nn.Module, bf16: nn.Module) -> Iterator[None]:
    """The module's models are shared: whatever a test applies is unloaded afterwards."""
    yield
    for model in (fp32, bf16):
        PatchStack.for_model(model).unload_all()


def _assert_applied(model: nn.Module, patch: Patch, base: dict[str, torch.Tensor]) -> None:
    """Touched neurons hold base + delta (one float32 add, one rounding); every other value is the base."""
    params = dict(model.named_parameters())
    for d in patch.deltas:
        now, was = params[d.name].detach(), base[d.name]
        idx = d.indices.to(torch.long)
        expected = add_delta(gather_neurons(was, 1, idx), d.delta)
        assert torch.equal(gather_neurons(now, 1, idx), expected), d.name
        untouched = torch.ones(now.shape[1], dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(now[:, untouched], was[:, untouched]), d.name
    touched = {d.name for d in patch.deltas}
    for name, value in model.state_dict().items():
        if name not in touched:
            assert torch.equal(value, base[name]), name


def test_patch_shape(fp32: nn.Module, patch: Patch) -> None:
    assert len(fp32.get_submodule("model.layers")) == 30  # type: ignore[arg-type]
    assert [d.name for d in patch.deltas] == [f"model.layers.{i}.mlp.down_proj.weight" for i in LAYERS]
    assert patch.num_neurons == 200
    assert all(d.shape == (576, 1536) and tuple(d.delta.shape) == (PER_LAYER, 576) for d in patch.deltas)
    # no dense tensor: indices (int32) + deltas (fp32) + originals (fp32) of the 200 neurons only
    assert patch.nbytes == 200 * 4 + 2 * 200 * 576 * 4


def test_apply_unload_exact_fp32(fp32: nn.Module, patch: Patch, clean_stack: None) -> None:
    base = state_copy(fp32)
    stack = PatchStack.for_model(fp32)
    stack.apply(patch)
    _assert_applied(fp32, patch, base)
    stack.unload(patch)
    assert stack.applied == []
    assert_state_equal(fp32, base)


def test_apply_unload_exact_bf16(bf16: nn.Module, patch: Patch, clean_stack: None) -> None:
    base = state_copy(bf16)
    assert base["model.layers.4.mlp.down_proj.weight"].dtype == torch.bfloat16
    own = random_patch(bf16, layers=(6, 7), neurons=60, name="bf16-own", seed=12)  # made on the bf16 base
    stack = PatchStack.for_model(bf16)
    stack.apply(patch)  # made on the fp32 model: its originals match the bf16 model at bf16 precision
    _assert_applied(bf16, patch, base)
    overlaps = stack.apply(own)  # checked against the base, not against base + patch
    assert overlaps  # same layers, 40 and 60 of 1536 neurons: they share some with near certainty
    stack.unload(patch)  # from under the later patch
    _assert_applied(bf16, own, base)
    stack.unload_all()
    assert_state_equal(bf16, base)


def test_load_model_applies_patches(fp32: nn.Module, patch: Patch, clean_stack: None) -> None:
    assert patch.path is not None
    base = state_copy(fp32)
    model, tokenizer = nmke_patch.load_model(patches=[patch.path])
    assert tokenizer("Paris")["input_ids"]
    stack = PatchStack.for_model(model)
    assert [p.id for p in stack.applied] == [patch.id]
    _assert_applied(model, patch, base)
    stack.unload_all()
    assert_state_equal(model, base)


def test_cli_verify_on_the_default_model(patch: Patch) -> None:
    assert patch.path is not None
    result = CliRunner().invoke(app, ["verify", str(patch.path)])
    assert result.exit_code == 0, result.output
    assert f"ok {patch.describe()}: 5 tensors, 200 neurons match the base" in result.output


def test_verify_refuses_a_patch_for_another_model(tmp_path: Path) -> None:
    """Same tensor names (a Llama), other shapes: refused, naming the patch and the tensor."""
    tiny = random_patch(tiny_llama(), name="tiny-only").save(tmp_path / "tiny.nmke")
    assert tiny.path is not None
    result = CliRunner().invoke(app, ["verify", str(tiny.path)])
    assert isinstance(result.exception, PatchMismatchError)
    message = str(result.exception)
    assert "tiny-only" in message and "model.layers.1.mlp.down_proj.weight" in message
    assert "[576, 1536] in the model but [32, 48] in the patch" in message

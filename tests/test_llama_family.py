"""The Llama family beyond Llama itself (Mistral, Qwen2 with its attention biases, Qwen3 with its q/k norms):
a tiny model of each is edited, saved and read back, and its patch applies, unloads bit for bit and exports
as an exact PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LLAMA_SIZES
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from nmke_patch.architectures import spec_for_model
from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.export.peft import export_peft
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import BaseModelInfo
from nmke_patch.patch import load_patch
from nmke_patch.requests import EditRequest
from nmke_patch.stack import PatchStack

CONFIGS: dict[str, type[PretrainedConfig]] = {
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    model = AutoModelForCausalLM.from_config(
        CONFIGS[model_type](**LLAMA_SIZES, num_hidden_layers=4, initializer_range=0.2, **extra)
    )
    assert model.config.model_type == model_type
    return model.float().eval()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_a_llama_family_model_is_edited_applied_unloaded_and_exported(
    model_type: str, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    model = tiny(model_type)
    info = BaseModelInfo("tiny", None, type(model).__name__, model_type)
    requests = [
        EditRequest("w3 {} w4", "w5", "w6", target_true="w7"),
        EditRequest("w7 w8 {} w9", "w10 w11", "w12"),
    ]
    config = EditConfig(layers=(1, 2), stats_tokens=200, max_neurons=0.25, n_prefixes=2, prefix_tokens=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = create_patch(requests, loaded=LoadedModel(model, tiny_tokenizer, info), config=config, name="p")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # create leaves it alone
    patch = load_patch(patch.save(tmp_path / "p.nmke").path)
    assert patch.manifest.base_model["model_type"] == model_type
    spec = spec_for_model(model)
    assert {d.name for d in patch.deltas} == {
        spec.weight_name(1),
        spec.weight_name(2),
    }  # down_proj, layers 1-2
    assert all(0 < d.num_neurons <= 2 * int(0.25 * 48) for d in patch.deltas)  # two edits, each in budget

    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        plain = model(ids).logits
    stack = PatchStack.for_model(model)
    stack.apply(patch)
    with torch.no_grad():
        patched = model(ids).logits
    assert not torch.equal(plain, patched)
    stack.unload(patch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit

    export_peft([patch], tmp_path / "adapter")
    adapted = PeftModel.from_pretrained(tiny(model_type), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, patched, atol=1e-5, rtol=0)

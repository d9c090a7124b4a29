"""Shared fixtures: tiny Llama (nn.Linear) and tiny GPT-2 (Conv1D) models built in-process, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nmke_patch.architectures import spec_for_model
from nmke_patch.delta import make_delta
from nmke_patch.models import tensor_fingerprint
from nmke_patch.patch import Manifest, ParentRef, Patch

VOCAB = 64


LLAMA_SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=2,
)
"""The tiny Llama's configuration (other Llama-family configs take it too), less depth and init range."""


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float = 0.02, layers: int = 4
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA_SIZES, num_hidden_layers=layers, initializer_range=init_range)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(
    seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float = 0.02, layers: int = 4
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        n_inner=48,
        initializer_range=init_range,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """One tiny model per architecture family (Linear and Conv1D)."""
    return MODEL_FACTORIES[request.param]()


def random_patch(
    model: torch.nn.Module,
    *,
    layers: tuple[int, ...] = (1, 2),
    neurons: int = 5,
    seed: int = 0,
    name: str = "random",
    parents: tuple[Patch, ...] = (),
    indices: list[int] | None = None,
    scale: float = 0.1,
) -> Patch:
    """A patch with random deltas on ``neurons`` neurons of ``layers``, originals taken from ``model``."""
    spec = spec_for_model(model)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    deltas = []
    for layer in layers:
        pname = spec.weight_name(layer)
        weight = params[pname]
        d_ff = weight.shape[spec.neuron_axis]
        idx = torch.tensor(indices) if indices is not None else torch.randperm(d_ff, generator=gen)[:neurons]
        d_model = weight.shape[1 - spec.neuron_axis]
        values = torch.randn(len(idx), d_model, generator=gen) * scale
        deltas.append(make_delta(pname, weight, spec.neuron_axis, idx, values, tensor_fingerprint(weight)))
    manifest = Manifest(
        name=name,
        base_model={
            "name_or_path": "tiny",
            "revision": None,
            "architecture": type(model).__name__,
            "model_type": spec.model_type,
        },
        method={"name": "random", "config": {"seed": seed}},
        requests=[{"prompt": "The capital of {} is", "subject": "X", "target_new": "Y"}],
        parents=[ParentRef(p.name, p.id) for p in parents],
        created_at="2026-01-01T00:00:00+00:00",
    )
    return Patch(manifest=manifest, deltas=tuple(deltas))


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.fixture
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary (64 ids), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def save_tiny(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A CounterFact record as the data set writes it (requested_rewrite, paraphrase and neighbourhood prompts).
COUNTERFACT_RECORD: dict[str, Any] = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Jean Gabin is"],
}

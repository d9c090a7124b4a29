"""A real edit on the embedded default model: it flips one fact and leaves a neighbour alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmke_patch.create import LoadedModel, create_patch, target_probabilities
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.models import load_base
from nmke_patch.patch import load_patch
from nmke_patch.requests import EditRequest
from nmke_patch.stack import PatchStack

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return LoadedModel(*load_base())


def test_edit_flips_fact_and_keeps_neighbour(default_model: LoadedModel, tmp_path: Path) -> None:
    model, tok = default_model.model, default_model.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    request = EditRequest("The capital of {} is", "France", "Rome", target_true="Paris")
    neighbour = ("The capital of Germany is", "Berlin")

    def probs() -> list[float]:
        return target_probabilities(
            model,
            tok,
            [request.text, request.text, neighbour[0], neighbour[0]],
            ["Rome", "Paris", neighbour[1], "Rome"],
        ).tolist()

    p_rome, p_paris, p_berlin, p_rome_germany = probs()
    assert p_paris > p_rome and p_berlin > p_rome_germany  # the base knows the fact and the neighbour

    patch = create_patch([request], loaded=default_model, config=EditConfig(), name="france-rome")
    saved = patch.save(tmp_path / "france-rome.nmke")
    stack = PatchStack.for_model(model)
    stack.apply(load_patch(saved.path))
    p_rome, p_paris, p_berlin, p_rome_germany = probs()
    assert p_rome > p_paris, (p_rome, p_paris)
    assert p_berlin > p_rome_germany, (p_berlin, p_rome_germany)
    # sparse: at most 10% of each edited layer's neurons
    for d in saved.deltas:
        assert d.num_neurons <= int(0.1 * d.shape[d.neuron_axis])
    stack.unload_all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

"""Editing-engine mechanics on tiny in-process models: masks, attribution, padding, orientation, resume, cache."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import COUNTERFACT_RECORD, MODEL_FACTORIES, assert_state_equal, random_patch, state_copy
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from nmke_patch import stats as stats_module
from nmke_patch.architectures import spec_for_model
from nmke_patch.checkpoints import run_key
from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.errors import EditError, InvalidRequestError, ModelLoadError, PatchMismatchError
from nmke_patch.methods.nmke.attribution import final_norm_scale, neuron_scores
from nmke_patch.methods.nmke.config import ADDED_FIELDS, EditConfig
from nmke_patch.methods.nmke.contrast import LookAlikeSubjects
from nmke_patch.methods.nmke.engine import Editor, EditRecord
from nmke_patch.methods.nmke.mask import apply_budget, hybrid_mask, mask_ratios, ranked_candidates
from nmke_patch.methods.nmke.prompts import encode, split_subjects
from nmke_patch.methods.nmke.solve import solve_layer
from nmke_patch.methods.nmke.values import NormalizedDescent, compute_target_value, reached
from nmke_patch.models import BaseModelInfo, tensor_fingerprint
from nmke_patch.requests import EditRequest, read_requests
from nmke_patch.stack import PatchStack
from nmke_patch.tracing import capture, edit_output

TINY_CONFIG = EditConfig(
    layers=(1, 2),
    z_steps=20,
    z_clamp_norm=4.0,
    n_prefixes=2,
    prefix_tokens=3,
    stats_tokens=300,
    max_neurons=0.25,
    attribution_vocab=0,
)


def requests() -> list[EditRequest]:
    return [
        EditRequest("w1 w2 {} w3", "w4", "w5", target_true="w6"),
        EditRequest("w7 {} w8", "w9 w10", "w11 w12", target_true="w13"),
    ]


def loaded(arch: str, tokenizer, layers: int = 4) -> LoadedModel:
    model = MODEL_FACTORIES[arch](init_range=0.2, layers=layers)
    model.requires_grad_(False)
    return LoadedModel(
        model, tokenizer, BaseModelInfo("tiny", None, type(model).__name__, model.config.model_type)
    )


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))


def test_mask_ratios_within_bounds_and_budget_respected() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 200, generator=gen)
    ratios = mask_ratios(scores, temperature=30.0, low=0.3, high=0.4)
    assert 0.3 <= ratios.general <= 0.4 and 0.3 <= ratios.specific <= 0.4
    mask, priority = hybrid_mask(scores, ratios)
    assert mask.shape == (200,) and mask.dtype == torch.bool
    assert 0.3 * 200 <= int(mask.sum()) <= 0.8 * 200
    chosen = apply_budget([ranked_candidates(mask, priority)], 20)
    assert chosen.numel() == 20 and bool(mask[chosen].all())
    assert torch.equal(chosen, torch.sort(chosen).values)


def test_flat_scores_give_lowest_specific_ratio() -> None:
    ratios = mask_ratios(torch.full((3, 50), -1.0), temperature=30.0, low=0.3, high=0.4)
    assert ratios.specific == 0.3  # no positive attribution at all


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_attribution_matches_direct_logit_lens(arch: str) -> None:
    """The factored score equals log-softmax through the real final norm with fixed statistics."""
    model = MODEL_FACTORIES[arch]()
    spec = spec_for_model(model)
    layer = 1
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with (
        capture(
            model,
            inputs={
                "k": f"{spec.layers}.{layer}.{spec.mlp_out}",
                "m": f"{spec.layers}.{layer}.{spec.mlp_norm}",
                "f": spec.final_norm,
            },
        ) as seen,
        torch.no_grad(),
    ):
        logits = model(input_ids=ids).logits
    m, h_mid, final = seen["k"][0, -1:], seen["m"][0, -1:], seen["f"][0, -1:]
    y = logits[0, -1:].argmax(-1)
    weight = dict(model.named_parameters())[spec.weight_name(layer)].detach()
    values = weight if spec.neuron_axis == 0 else weight.T
    norm = model.get_submodule(spec.final_norm)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    unembed = model.get_output_embeddings().weight.detach()
    scores = neuron_scores(
        spec=spec,
        values=values,
        activations=m,
        h_mid=h_mid,
        final_resid=final,
        answers=y,
        norm_gain=norm.weight.detach(),
        norm_bias=getattr(norm, "bias", None),
        norm_eps=eps,
        unembed=unembed,
        amplification=30.0,
        vocab_limit=0,
    )
    assert scores.shape == (1, values.shape[0])
    scale = final_norm_scale(final, spec.final_norm_kind, eps)

    def lens(x: torch.Tensor) -> torch.Tensor:
        if spec.final_norm_kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        x = x / scale * norm.weight
        if getattr(norm, "bias", None) is not None:
            x = x + norm.bias
        return torch.log_softmax(x @ unembed.T, -1)[0, y[0]]

    for i in (0, 7, 30):
        direct = lens(h_mid + 30.0 * m[0, i] * values[i]) - lens(h_mid)
        assert torch.allclose(scores[0, i], direct, atol=1e-4), (i, scores[0, i], direct)


def _byte_level_tokenizer(text: str) -> Any:
    """A byte-level BPE tokenizer (GPT-2's kind) trained in-process on ``text``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def test_a_subject_ending_inside_a_token_is_found() -> None:
    tokenizer = _byte_level_tokenizer("The Yankees are a team. The Yankees won. The Yankees lost.")
    assert "ĠYankees" in tokenizer.get_vocab()
    requests = [
        EditRequest("The {}s are a team from", "Yankee", "Paris"),  # ends inside " Yankees"
        EditRequest("The {} are a team from", "Yankees", "Paris"),
    ]
    assert split_subjects(tokenizer, requests) == [(0, " Yankees")]


def test_the_subject_is_keyed_at_the_last_byte_token_of_its_last_character() -> None:
    """Byte-level BPE splits a CJK character or an emoji into several tokens with the same span; only the
    last has read the whole character, so the subject's key must sit there (an earlier one is shared with
    other subjects whose character starts with the same bytes)."""
    tokenizer = _byte_level_tokenizer("The city of Paris is in France.")
    for prompt, subject in (("The city of 上海 is", "上海"), ("The flag 🇦🇿 is", "🇦🇿"), ("Paris is", "Paris")):
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        end = prompt.rfind(subject) + len(subject)
        expected = max(i for i, (a, b) in enumerate(offsets) if a < end <= b)
        batch = encode(tokenizer, [prompt], [subject], [None])
        assert int(batch.subject_pos[0]) == expected
        assert all(a >= end for a, _ in offsets[expected + 1 :])  # nothing after it is part of the subject


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_padding_does_not_change_keys(arch: str, tiny_tokenizer) -> None:
    model = MODEL_FACTORIES[arch]()
    spec = spec_for_model(model)
    alone = encode(tiny_tokenizer, ["w1 w2 w4 w3"], ["w4"], [None])
    batch = encode(tiny_tokenizer, ["w1 w2 w4 w3", "w5 w6 w7 w8 w9 w10 w4 w11"], ["w4", "w4"], [None, None])
    assert int(alone.subject_pos[0]) == 2 and int(batch.subject_pos[1]) == 6
    path = f"{spec.layers}.1.{spec.mlp_out}"
    outs = []
    for b in (alone, batch):
        with capture(model, inputs={"k": path}) as seen, torch.no_grad():
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        outs.append(seen["k"][0, b.subject_pos[0]])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_key_pass_from_recorded_entry_equals_full_pass(arch: str, tiny_tokenizer) -> None:
    """The solve's per-layer key passes skip the layers below the last edited one: same keys and outputs."""
    lm = loaded(arch, tiny_tokenizer, layers=5)  # layers 1-3 edited, and one above them
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    config = TINY_CONFIG.with_overrides(layers=(1, 2, 3))
    editor = Editor(lm.model, tiny_tokenizer, config, c0={l: torch.eye(d_ff) for l in (1, 2, 3)})
    batch, _ = editor._batch(requests())
    fw = editor._forward(batch, editor.layers)
    torch.manual_seed(1)
    with torch.no_grad():  # as the solve does: layer 1 changes before the pass for layer 2
        editor.weights[1].add_(0.5 * torch.randn_like(editor.weights[1]))
    full = editor._keys_and_output(batch, 2, 0, fw.entry)
    replayed = editor._keys_and_output(batch, 2, 1, fw.entry)
    with torch.no_grad():
        editor.weights[2].add_(0.5 * torch.randn_like(editor.weights[2]))
    full_next = editor._keys_and_output(batch, 3, 0, fw.entry)
    replayed_next = editor._keys_and_output(batch, 3, 2, replayed[2])
    assert not torch.allclose(full[0], fw.keys_subject[2], atol=1e-3)  # the change of layer 1 is seen
    for a, b in [*zip(full, replayed, strict=True), *zip(full_next, replayed_next, strict=True)]:
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def _reference_target_value(model, tokenizer, layer, request, prefixes, config) -> torch.Tensor:
    """The target-value loop written plainly: full forward passes with the delta added by a hook."""
    spec = spec_for_model(model)
    texts = [p + request.text for p in ["", *prefixes]]
    batch = encode(
        tokenizer,
        [*texts, f"{request.subject} is a"],
        [request.subject] * (len(texts) + 1),
        [request.target_new] * len(texts) + [None],
    )
    n = len(texts)
    rows = torch.arange(n + 1)
    module = model.get_submodule(f"{spec.layers}.{layer}")
    delta = None

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        def add(out: torch.Tensor) -> torch.Tensor:
            if delta is None:
                return out
            out = out.clone()
            out[rows, batch.subject_pos] += delta
            return out

        with edit_output(module, add):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        lp = torch.stack(
            [
                torch.log_softmax(logits[i, int(batch.last_pos[i]) + torch.arange(len(t))], -1)[
                    torch.arange(len(t)), torch.tensor(t)
                ].mean()
                for i, t in enumerate(batch.target_ids[:n])
            ]
        )
        return lp, torch.log_softmax(logits[n, int(batch.last_pos[n])], -1)

    with torch.no_grad(), capture(model, outputs={"o": f"{spec.layers}.{layer}"}) as seen:
        _, kl_ref = forward()
    h = seen["o"][0, int(batch.subject_pos[0])]
    delta = torch.zeros_like(h, requires_grad=True)
    opt = (
        NormalizedDescent([delta], step=config.z_step * float(h.norm()), momentum=config.z_momentum)
        if config.z_optimizer == "normalized"
        else torch.optim.Adam([delta], lr=config.z_lr)
    )
    for _ in range(config.z_steps):
        lp, kl_new = forward()
        kl = torch.sum(kl_ref.exp() * (kl_ref - kl_new))
        loss = (
            -lp.mean() + config.z_kl_factor * kl + config.z_weight_decay * delta.pow(2).sum() / h.norm() ** 2
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > config.z_clamp_norm * h.norm():
                delta.mul_(config.z_clamp_norm * h.norm() / delta.norm())
    return h + delta.detach()


def test_normalized_descent_takes_fixed_length_steps_along_the_gradient() -> None:
    x = torch.zeros(3, requires_grad=True)
    opt = NormalizedDescent([x], step=0.5, momentum=0.5)
    (x @ torch.tensor([3.0, 4.0, 0.0])).backward()
    opt.step()
    assert torch.allclose(x, torch.tensor([-0.3, -0.4, 0.0]))
    opt.zero_grad()
    (x @ torch.tensor([0.0, 0.0, 2.0])).backward()  # orthogonal gradient: half the old direction stays
    before = x.detach().clone()
    opt.step()
    moved = x.detach() - before
    expected = -(torch.tensor([0.0, 0.0, 1.0]) + 0.5 * torch.tensor([0.6, 0.8, 0.0]))
    assert torch.allclose(moved, 0.5 * expected / expected.norm())


@pytest.mark.parametrize("optimizer", ["adam", "normalized"])
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_target_value_with_cached_prefix_equals_full_forward_passes(
    arch: str, optimizer: str, tiny_tokenizer
) -> None:
    model = MODEL_FACTORIES[arch](init_range=0.2)
    spec = spec_for_model(model)
    request = EditRequest(prompt="w5 w6 {} w8 w9", subject="w10 w11", target_new="w12 w13")
    prefixes = ["w20 w21 w22 w23.", "w30 w31."]  # different lengths: the rows split at different tokens
    # no early stop; the clamp acts
    config = EditConfig(z_steps=6, z_stop_prob=2.0, z_clamp_norm=0.3, z_optimizer=optimizer)
    ours = compute_target_value(model, tiny_tokenizer, spec, 1, request, prefixes, config)
    assert ours.steps == 6 and not torch.equal(ours.z, ours.h)
    reference = _reference_target_value(model, tiny_tokenizer, 1, request, prefixes, config)
    assert torch.allclose(ours.z, reference, atol=1e-5, rtol=1e-4), (ours.z - reference).abs().max()


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("method", ["nmke", "nmke:exact", "nmke:post", "alphaedit", "memit"])
def test_create_edits_only_budgeted_neurons_and_leaves_model_unchanged(
    arch: str, method: str, tiny_tokenizer
) -> None:
    lm = loaded(arch, tiny_tokenizer)
    before = state_copy(lm.model)
    method, _, solve = method.partition(":")
    config = TINY_CONFIG.with_overrides(method=method, **({"masked_solve": solve} if solve else {}))
    patch = create_patch(requests(), loaded=lm, config=config, name="t")
    assert_state_equal(lm.model, before)  # create never leaves edits on the model
    spec = spec_for_model(lm.model)
    assert {d.name for d in patch.deltas} == {spec.weight_name(1), spec.weight_name(2)}
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    for d in patch.deltas:
        assert d.neuron_axis == spec.neuron_axis and d.shape[spec.neuron_axis] == d_ff
        if method == "nmke":  # two sequential edits, each within 25% of the layer
            assert d.num_neurons <= 2 * int(0.25 * d_ff)
        else:
            assert d.num_neurons == d_ff
    first = patch.manifest.metrics[0]
    # On a random tiny model efficacy is only meaningful for the dense AlphaEdit solve (MEMIT's lambda2 * C0
    # dominates; NMKE's few masked neurons of 48 random ones may carry nothing). NMKE's efficacy is tested on the
    # default model (test_create_default_model.py).
    if method == "alphaedit":
        assert first["p_new_after"] > first["p_new_before"] * 1.1
    columns = 2 if method == "nmke" else 1  # NMKE's context key columns: bare prompt and prefixed mean
    assert set(patch.state) == {"keys.1", "keys.2"} and patch.state["keys.1"].shape == (2 * columns, d_ff)
    PatchStack.for_model(lm.model).apply(patch)  # originals recorded against the base


def test_soft_solve_lands_the_requested_share_on_selected_neurons_only() -> None:
    gen = torch.Generator().manual_seed(0)
    d_ff, d = 24, 8
    samples = torch.randn(500, d_ff, generator=gen) * torch.linspace(0.2, 3.0, d_ff)
    c0 = samples.T @ samples / len(samples)
    keys = torch.randn(d_ff, 1, generator=gen).abs()
    residual = torch.randn(d, 1, generator=gen)
    selected = torch.tensor([1, 5, 7, 11, 20])
    drifts = []
    for landing in (0.5, 0.9):
        config = EditConfig(masked_solve="soft", landing=landing, min_preservation=0.0)
        rows, x, _ = solve_layer(
            keys,
            residual,
            config=config,
            c0=c0,
            c_past=torch.zeros(d_ff, d_ff),
            basis=None,
            selected=selected,
        )
        assert torch.equal(rows, selected) and x.shape == (5, d)
        realised = x.T @ keys[rows]  # the change of the layer's output on the request's key
        share = float((realised.T @ residual) / residual.norm() ** 2)
        assert share == pytest.approx(landing, abs=2e-3)
        drifts.append(float(torch.trace(x.T @ c0[rows][:, rows] @ x)))
    assert drifts[0] < drifts[1]  # landing more costs more change on preserved text
    capped = EditConfig(masked_solve="soft", landing=0.9, min_preservation=1e4)
    rows, x, _ = solve_layer(
        keys, residual, config=capped, c0=c0, c_past=torch.zeros(d_ff, d_ff), basis=None, selected=selected
    )
    assert float(torch.trace(x.T @ c0[rows][:, rows] @ x)) < drifts[1]  # the cap binds: less drift,
    assert float(((x.T @ keys[rows]).T @ residual) / residual.norm() ** 2) < 0.9  # and less landed


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_contrast_keys_are_kept_by_the_edit(arch: str, tiny_tokenizer) -> None:
    lm = loaded(arch, tiny_tokenizer)
    spec = spec_for_model(lm.model)
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    config = TINY_CONFIG.with_overrides(contrast_subjects=6)
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    contrast = Editor(lm.model, tiny_tokenizer, config, c0=c0)._contrast_keys(requests()[:1])
    assert set(contrast) == {1, 2} and contrast[1].shape == (d_ff, 6)
    changes = []
    for weight in (0.0, 1e4):
        patch = create_patch(
            requests()[:1], loaded=lm, config=config.with_overrides(contrast_weight=weight), name="t"
        )
        delta = {d.name: d for d in patch.deltas}[spec.weight_name(2)]
        rows = torch.zeros(d_ff, delta.delta.shape[1])
        rows[delta.indices] = delta.delta.float()  # [d_ff, d]: change of each neuron's value vector
        changes.append(float((rows.T @ contrast[2]).norm()))
    assert changes[1] < 0.05 * changes[0], changes


def test_a_solve_that_diverges_stops_with_its_own_error(tiny_tokenizer, monkeypatch) -> None:
    from nmke_patch.methods.nmke import engine

    lm = loaded("llama", tiny_tokenizer)
    before = state_copy(lm.model)

    def diverging(*args: Any, **kwargs: Any) -> Any:
        update = solve_layer(*args, **kwargs)
        return update._replace(x=torch.full_like(update.x, float("nan")))

    monkeypatch.setattr(engine, "solve_layer", diverging)
    with pytest.raises(EditError, match=r"update of layer \d .* is not finite: the solve diverged"):
        create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="t")
    assert_state_equal(lm.model, before)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_reusing_touched_neurons_shrinks_the_lifetime_patch(arch: str, tiny_tokenizer) -> None:
    lm = loaded(arch, tiny_tokenizer)
    union = {}
    for reuse in (0.0, 1.0):
        config = TINY_CONFIG.with_overrides(reuse_touched=reuse)
        patch = create_patch(requests(), loaded=lm, config=config, name="t")
        union[reuse] = sum(d.num_neurons for d in patch.deltas)
        per_edit = [sum(m["neurons"].values()) for m in patch.manifest.metrics]
        assert per_edit[0] == per_edit[1]  # the budget per edit is the same
    assert union[1.0] < union[0.0], union


def test_an_edit_that_does_not_land_is_solved_again_on_twice_the_neurons(
    tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmke_patch.methods.nmke import engine

    lm = loaded("llama", tiny_tokenizer)
    assert lm.model.config.intermediate_size == 48  # budget 10% = 4 neurons, cap 50% = 24
    sizes: list[int] = []
    original = engine.solve_layer

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(kwargs["selected"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "solve_layer", recording)
    patches = {}
    for until, grow, budget in ((0.0, 0.5, 0.1), (1.0, None, 0.1), (1.0, 0.5, 0.1), (1.0, None, 0.5)):
        sizes.clear()
        config = TINY_CONFIG.with_overrides(max_neurons=budget, sweep_until=until, grow_budget_to=grow)
        patches[until, grow, budget] = create_patch(requests()[:1], loaded=lm, config=config, name="t")
        if grow is None or until == 0.0:  # never grows, or lands at once: one solve per layer
            assert len(sizes) == 2
        else:  # never lands (P(new) >= 1): 4, 8, 16, then 24 neurons (or all of a mask) per layer
            assert sizes[:2] == [4, 4] and sizes[2:4] == [8, 8] and len(sizes) == 8, sizes
    # each try starts from the model before the edit: the last equals a run on the larger budget alone
    grown, direct = patches[1.0, 0.5, 0.1], patches[1.0, None, 0.5]
    assert grown.manifest.metrics[0]["neurons"] == direct.manifest.metrics[0]["neurons"]
    for a, b in zip(grown.deltas, direct.deltas, strict=True):
        assert a.name == b.name and torch.equal(a.indices, b.indices) and torch.equal(a.delta, b.delta)
    assert torch.equal(grown.state["keys.1"], direct.state["keys.1"])


def test_state_file_round_trips_without_warnings(tmp_path: Path, tiny_tokenizer) -> None:
    import warnings

    from nmke_patch.patch import load_patch

    patch = create_patch(requests()[:1], loaded=loaded("llama", tiny_tokenizer), config=TINY_CONFIG, name="s")
    saved = patch.save(tmp_path / "s.nmke")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_patch(saved.path)
    assert again.state.keys() == patch.state.keys()
    assert all(torch.equal(again.state[k], patch.state[k]) for k in patch.state)
    (tmp_path / "s.nmke" / "state.safetensors").write_bytes(b"tampered")
    with pytest.raises(Exception, match=r"state\.safetensors does not match"):
        load_patch(saved.path)


# the second: kept contrast rows (40 per edit and layer) outgrow 2 x 48 neurons and are compressed mid-run
@pytest.mark.parametrize(
    "overrides",
    [{}, {"contrast_subjects": 40, "contrast_keep": 0.2}, {"contrast_keep": 0.2, "contrast_decay": 0.5}],
)
def test_resume_equals_uninterrupted_run(tmp_path: Path, tiny_tokenizer, overrides: dict[str, Any]) -> None:
    config = TINY_CONFIG.with_overrides(**overrides)
    reqs = [*requests(), EditRequest("w20 {} w21", "w22", "w23")]
    full = create_patch(reqs, loaded=loaded("llama", tiny_tokenizer), config=config, name="t")
    lm = loaded("llama", tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        create_patch(reqs, loaded=lm, config=config, name="t", checkpoint_dir=ckpt, stop_after=2)
    assert json.loads((ckpt / "progress.json").read_text())["next_index"] == 2
    resumed = create_patch(reqs, loaded=lm, config=config, name="t", checkpoint_dir=ckpt, resume=True)
    assert full.id == resumed.id  # same bytes of deltas.safetensors
    assert full.state.keys() == resumed.state.keys()
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)  # the chain state too
    with pytest.raises(InvalidRequestError, match="different run"):
        create_patch(reqs[:2], loaded=lm, config=config, name="t", checkpoint_dir=ckpt, resume=True)
    other = MODEL_FACTORIES["llama"](init_range=0.2, seed=1)  # same facts and settings, other weights
    other_lm = LoadedModel(other, tiny_tokenizer, lm.info)
    with pytest.raises(InvalidRequestError, match="different run"):
        create_patch(reqs, loaded=other_lm, config=config, name="t", checkpoint_dir=ckpt, resume=True)
    # other statistics settings: refused before the statistics (minutes on a real model) are sampled
    statistics_first = mock.patch("nmke_patch.create.load_statistics", side_effect=AssertionError("first"))
    other_text = config.with_overrides(stats_tokens=301)
    with statistics_first, pytest.raises(InvalidRequestError, match="different run"):
        create_patch(reqs, loaded=lm, config=other_text, name="t", checkpoint_dir=ckpt, resume=True)


def test_a_chain_is_given_whole_and_oldest_first(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    lm = loaded("llama", tiny_tokenizer)
    a = random_patch(lm.model, name="a", seed=1).save(tmp_path / "a.nmke")
    stack = PatchStack.for_model(lm.model)
    stack.apply(a)
    b = random_patch(lm.model, name="b", seed=2, parents=(a,)).save(tmp_path / "b.nmke")
    stack.unload_all()

    def no_statistics(*_: object, **__: object) -> None:
        raise AssertionError("statistics loaded before the parents were checked")

    monkeypatch.setattr("nmke_patch.create.load_statistics", no_statistics)
    for on, where in (([b], "a (not given)"), ([b, a], "a (listed after it)")):
        with pytest.raises(PatchMismatchError, match=re.escape(where)):
            create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="c", on=on)


def test_key_statistics_are_cached(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> None:
    calls = []
    real = stats_module.key_second_moments

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_module, "key_second_moments", counting)
    lm = loaded("gpt2", tiny_tokenizer)
    first = create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="a")
    create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="b")
    assert calls == [[1, 2]]
    # a damaged cache file is computed again, never used (it used to give another patch, or a traceback)
    from nmke_patch.paths import home

    (cached,) = (home() / "stats").rglob("layer1.safetensors")
    good = cached.read_bytes()
    tensor = safetensors_load(good)["c0"]
    nan = tensor * float("nan")
    for damage in (
        good[:-1] + bytes([good[-1] ^ 1]),  # a byte changed on disk
        safetensors_save({"c0": tensor[:-1].contiguous()}),  # another shape (and no sha256 of its own)
        safetensors_save(
            {"c0": nan}, metadata={"fingerprint": tensor_fingerprint(nan)}
        ),  # its own fingerprint
    ):
        cached.write_bytes(damage)
        calls.clear()
        again = create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="a")
        assert calls == [[1]] and again.id == first.id


def test_parents_continue_key_state(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    parent = create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="parent")
    child = create_patch(requests()[1:], loaded=lm, config=TINY_CONFIG, name="child", on=[parent])
    assert [p.id for p in child.manifest.parents] == [parent.id]
    stack = PatchStack.for_model(lm.model)
    with pytest.raises(Exception, match="parent"):
        stack.apply(child)
    stack.apply(parent)
    stack.apply(child)


def test_bad_records_name_index_and_field(tmp_path: Path) -> None:
    file = tmp_path / "facts.json"
    file.write_text(
        json.dumps(
            [
                {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"},
                {"prompt": "no placeholder", "subject": "X", "target_new": "Y"},
            ]
        )
    )
    with pytest.raises(InvalidRequestError, match=r"record 1: field 'prompt'"):
        read_requests(file)
    file.write_text(
        '{"prompt": "{} is", "subject": "A", "target_new": "B"}\n{"prompt": "{} is", "subject": ""}\n'
    )
    with pytest.raises(InvalidRequestError, match=r"record 1: field 'subject'"):
        read_requests(file)


def test_counterfact_and_zsre_records(tmp_path: Path) -> None:
    file = tmp_path / "facts.jsonl"
    cf = COUNTERFACT_RECORD
    zsre = {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "alt": "Yale",
        "answers": ["Trinity College"],
        "rephrase": "Where did Watts Humphrey study?",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
    }
    file.write_text(json.dumps(cf) + "\n" + json.dumps(zsre) + "\n")
    a, b = read_requests(file)
    assert (a.subject, a.target_new, a.target_true, a.id) == ("Danielle Darrieux", "English", "French", "7")
    assert a.neighborhood[0].target == "French"
    assert b.prompt == "What university did {} attend?" and b.neighborhood[0].prompt == "who wrote hamlet"


def test_configs_written_before_added_fields_keep_their_meaning_and_run_key() -> None:
    legacy = {k: v for k, v in EditConfig().to_json().items() if k not in ADDED_FIELDS}
    restored = EditConfig.from_json(legacy)
    assert restored.z_optimizer == "adam"
    assert restored.identity() == legacy
    assert run_key(requests(), restored, []) == run_key(requests(), EditConfig(**ADDED_FIELDS), [])
    current = EditConfig()  # the defaults changed since: a different run
    assert current.identity()["z_optimizer"] == "normalized"
    assert run_key(requests(), current, []) != run_key(requests(), restored, [])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mode": "foo"}, "mode must be one of sequential, batch"),
        ({"neuron_score": "bogus"}, "neuron_score must be one of hybrid, specificity, combined"),
        ({"masked_solve": "bogus"}, "masked_solve must be one of soft, exact, post"),
        ({"method": "rome"}, "method must be one of nmke, alphaedit, memit"),
        ({"layers": [1, 3]}, "layers must be consecutive"),
        ({"layers": [-1, 0]}, "layers must be consecutive"),
        ({"stats_tokens": 0}, "stats_tokens must be >= 1"),
        ({"contrast_keep": 2.0}, r"contrast_keep must be a share in \[0, 1\]"),
        ({"grow_budget_to": 0.05}, "grow_budget_to must be at least max_neurons"),
    ],
)
def test_config_refuses_values_outside_its_choices(override: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EditConfig().with_overrides(**override)
    with pytest.raises(InvalidRequestError, match=message):  # built directly, too
        EditConfig(**override)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"z_steps": 2.5}, "z_steps must be int"),
        ({"z_steps": 10**400}, "z_steps must be between"),
        ({"layers": "4-8"}, "layers must be tuple"),
        ({"amplification": "30"}, "amplification must be a finite number|amplification must be float"),
    ],
)
def test_a_config_built_directly_checks_types(override: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        EditConfig(**override)
    assert EditConfig(z_lr=1).z_lr == 1.0 and isinstance(EditConfig(z_lr=1).z_lr, float)
    assert EditConfig(layers=[4, 5]).layers == (4, 5)


def test_a_config_takes_numpy_numbers_and_dense_methods_ignore_the_budget() -> None:
    np = pytest.importorskip("numpy")
    config = EditConfig(z_steps=np.int64(5), z_lr=np.float32(0.5), layers=[np.int64(3), 4])
    assert (config.z_steps, config.z_lr, config.layers) == (5, 0.5, (3, 4))
    assert type(config.z_steps) is int and type(config.z_lr) is float and type(config.layers[0]) is int
    assert config.identity() == EditConfig(z_steps=5, z_lr=0.5, layers=(3, 4)).identity()
    assert EditConfig(method="alphaedit", grow_budget_to=0.05).grow_budget_to == 0.05


def test_layers_beyond_the_model_are_refused_before_statistics(tiny_tokenizer, monkeypatch) -> None:
    lm = loaded("llama", tiny_tokenizer)
    before = state_copy(lm.model)

    def no_statistics(*_: object, **__: object) -> None:
        raise AssertionError("statistics computed for an invalid layer")

    monkeypatch.setattr("nmke_patch.create.load_statistics", no_statistics)
    with pytest.raises(InvalidRequestError, match="the model has 4 decoder layers"):
        create_patch(requests(), loaded=lm, config=TINY_CONFIG.with_overrides(layers=(3, 4)), name="t")
    assert_state_equal(lm.model, before)
    # the last layer's change at the subject never reaches the answer: refused, not an all-zero patch
    with pytest.raises(
        InvalidRequestError, match=r"layer 3 is the model's last decoder layer.*edit layers 0-2"
    ):
        create_patch(requests(), loaded=lm, config=TINY_CONFIG.with_overrides(layers=(2, 3)), name="t")
    assert_state_equal(lm.model, before)
    # a prompt that, with a context prefix and its answer, would not fit the model's 64 positions
    long = [*requests(), {"prompt": " ".join(["w5"] * 60) + " {} w6", "subject": "w7", "target_new": "w8"}]
    with pytest.raises(
        InvalidRequestError,
        match=r"^record 2: its prompt, with its answer, needs 62 positions; the model has 64 \(7 of them kept for context prefixes\)$",
    ):
        create_patch(long, loaded=lm, config=TINY_CONFIG, name="t")
    assert_state_equal(lm.model, before)
    # a paraphrase eval could not score: refused here too, not made into a patch eval then refuses
    wordy = [*requests(), replace(requests()[0], subject="w9", paraphrases=(" ".join(["w5"] * 70),))]
    with pytest.raises(
        InvalidRequestError,
        match=r"^record 2: its paraphrase 0, with its answer, needs 70 positions; the model has 64$",
    ):
        create_patch(wordy, loaded=lm, config=TINY_CONFIG, name="t")
    assert_state_equal(lm.model, before)
    # two answers for one prompt: a patch holds one
    twice = [*requests(), replace(requests()[0], target_new="w7")]
    with pytest.raises(
        InvalidRequestError, match=r"^1 pair\(s\) of records edit one prompt .* records 0 and 2 edit"
    ):
        create_patch(twice, loaded=lm, config=TINY_CONFIG, name="t")
    assert_state_equal(lm.model, before)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_the_last_layer_edits_where_every_prompt_ends_with_its_subject(arch: str, tiny_tokenizer) -> None:
    """There the subject's position is where the answer is predicted, so the last layer's change counts."""
    lm = loaded(arch, tiny_tokenizer)
    ending = [EditRequest("w1 w2 {}", "w4", "w5", target_true="w6")]
    patch = create_patch(ending, loaded=lm, config=TINY_CONFIG.with_overrides(layers=(2, 3)), name="t")
    assert {d.name.split(".")[2] for d in patch.deltas if d.delta.abs().max() > 0} == {"2", "3"}


def test_create_patch_refuses_a_blank_name_and_wrong_argument_kinds(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    for name in (None, "", "  "):
        with pytest.raises(InvalidRequestError, match="name must be a non-empty string"):
            create_patch(requests(), loaded=lm, config=TINY_CONFIG, name=name)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loaded=LoadedModel"):
        create_patch(requests(), loaded=lm.model, config=TINY_CONFIG, name="t")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config=EditConfig"):
        create_patch(requests(), loaded=lm, config={}, name="t")  # type: ignore[arg-type]


def test_default_layers_leave_out_the_last_layer() -> None:
    from nmke_patch.architectures import check_edited_layers, spec_for_model

    spec = spec_for_model(MODEL_FACTORIES["llama"]())
    assert spec.default_layers(30) == [4, 5, 6, 7, 8]  # the embedded default model's
    assert spec.default_layers(4) == [0, 1, 2]
    assert spec.default_layers(2) == [0]
    for n in (2, 4, 5, 6, 8, 12, 30, 80):
        assert check_edited_layers(spec.default_layers(n), n) is None, n
    assert "at least 2" in str(check_edited_layers(spec.default_layers(1), 1))
    assert spec.default_layers(32) == [4, 5, 6, 7, 8]  # the references: Llama-3-8B's ...
    gpt2 = spec_for_model(MODEL_FACTORIES["gpt2"]())
    assert gpt2.default_layers(48) == [13, 14, 15, 16, 17]  # ... and GPT-2 XL's


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_context_key_columns_fit_bare_and_prefixed_prompts_separately(arch: str, tiny_tokenizer) -> None:
    lm = loaded(arch, tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    config = TINY_CONFIG.with_overrides(key_columns="contexts", bare_weight=0.7)
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0)
    _batch, owner = editor._batch(requests())
    assert owner == [0, 0, 0, 1, 1, 1]  # bare + 2 prefixes per request
    columns = editor._columns(owner, 2)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0.5, 0.5]]
    )
    assert torch.equal(columns.key_map, expected) and torch.equal(columns.residual_map, expected)
    assert torch.allclose(columns.weights, torch.tensor([0.7, 0.3, 0.7, 0.3]))
    assert columns.owner.tolist() == [0, 0, 1, 1]
    mean = Editor(lm.model, tiny_tokenizer, TINY_CONFIG.with_overrides(key_columns="mean"), c0=c0)._columns(
        owner, 2
    )
    reference = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0], [0, 0, 0, 0.5, 0.25, 0.25]])  # MEMIT's compute_ks:
    assert torch.equal(mean.key_map, reference)  # the bare prompt, then the prefixed ones' mean, averaged
    assert torch.equal(mean.residual_map, expected[[0, 2]])  # the residual is the bare prompt's
    editor.edit(requests(), 0)
    editor.release()
    assert editor.keys_state()[1].shape == (4, d_ff)  # both columns of both requests are protected later


def test_landing_counts_parallel_columns_together() -> None:
    """Two columns asking for the same change share it: the landing is not the per-column diagonal."""
    torch.manual_seed(0)
    keys = torch.randn(8, 2)
    r = torch.randn(3, 1).expand(3, 2)
    c0 = torch.eye(8)
    config = EditConfig(landing=0.6, min_preservation=0.0)
    _, x, _ = solve_layer(
        keys, r, config=config, c0=c0, c_past=torch.zeros(8, 8), basis=None, selected=torch.arange(8)
    )
    realised = (x.T @ keys * r).sum(dim=0) / r.pow(2).sum(dim=0)
    assert torch.allclose(realised.mean(), torch.tensor(0.6), atol=2e-3), realised


def test_z_stop_whole_stops_on_the_whole_answer(tiny_tokenizer) -> None:
    """By default z stops once the per-token geometric mean passes z_stop_prob, which for an answer of three
    tokens is its cube for the whole answer; z_stop_whole waits for the whole answer itself. (A random tiny
    model reaches small probabilities only, hence the small threshold.)"""
    model = MODEL_FACTORIES["llama"](init_range=0.2)
    spec = spec_for_model(model)
    request = EditRequest(prompt="w5 w6 {} w8", subject="w10", target_new="w12 w13 w14")
    config = EditConfig(z_steps=60, z_stop_prob=1e-5, n_prefixes=0)
    per_token = compute_target_value(model, tiny_tokenizer, spec, 0, request, [], config)
    whole = compute_target_value(
        model, tiny_tokenizer, spec, 0, request, [], config.with_overrides(z_stop_whole=True)
    )
    assert per_token.steps == 0 and per_token.p_before**3 < 1e-5  # stopped at once: the mean passes 1e-5
    assert 0 < whole.steps < 60 and whole.p_after >= 1e-5  # went on until the whole answer passed it


def test_z_stop_bare_waits_for_the_bare_prompt() -> None:
    lagging = torch.tensor([0.1, 0.9, 0.9, 0.9])  # mean 0.7; the bare prompt (first) far behind
    assert reached(lagging, EditConfig(z_stop_prob=0.6, z_stop_bare=False))
    assert not reached(lagging, EditConfig(z_stop_prob=0.6, z_stop_bare=True))
    assert reached(torch.tensor([0.65, 0.7, 0.6, 0.9]), EditConfig(z_stop_prob=0.6, z_stop_bare=True))
    assert not reached(torch.tensor([0.65, 0.5, 0.5, 0.5]), EditConfig(z_stop_prob=0.6, z_stop_bare=True))


def test_baselines_run_nmke_only_settings_as_published() -> None:
    for method in ("alphaedit", "memit"):
        resolved = EditConfig(method=method).resolved()
        assert resolved.z_optimizer == "adam" and resolved.key_columns == "mean" and not resolved.z_stop_bare
        legacy = {k: v for k, v in resolved.to_json().items() if k not in ADDED_FIELDS}
        shared = {"stats_prefix": EditConfig().stats_prefix}  # the preserved text is every method's
        assert EditConfig(method=method).identity() == legacy | shared  # as before, but for the shared text
        assert EditConfig(method=method, stats_prefix="").identity() == legacy  # keys of runs made before
    assert EditConfig().resolved() == EditConfig()


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_first_token_statistics_weight_each_token_by_its_count(arch: str) -> None:
    model = MODEL_FACTORIES[arch](init_range=0.2)
    spec = spec_for_model(model)
    rows = [[3, 4, 3], [5, 3]]
    got = stats_module.first_token_moments(model, spec, rows, [1, 2])
    path = f"{spec.layers}.1.{spec.mlp_out}"
    expected = torch.zeros_like(got[1])
    for token, count in ((3, 3), (4, 1), (5, 1)):
        with capture(model, inputs={"k": path}) as seen:
            model(input_ids=torch.tensor([[token, 7]]))  # a later token cannot change the first key
        k = seen["k"][0, 0].float()
        expected += count * torch.outer(k, k)
    torch.testing.assert_close(got[1], expected / 5)


def test_first_token_weight_adds_first_token_statistics_to_c0(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    first = {l: torch.full((d_ff, d_ff), float(l)) for l in (1, 2)}
    config = TINY_CONFIG.with_overrides(first_token_weight=0.5)
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0, c_first=first)
    torch.testing.assert_close(editor.c0[2], torch.eye(d_ff) + 1.0)
    with pytest.raises(ValueError, match="first-token"):
        Editor(lm.model, tiny_tokenizer, config, c0=c0)
    # the dense baselines keep the published statistics
    dense = Editor(lm.model, tiny_tokenizer, config.with_overrides(method="alphaedit"), c0=c0)
    torch.testing.assert_close(dense.c0[2], torch.eye(d_ff))


def test_first_token_statistics_are_cached(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> None:
    calls = []
    real = stats_module.first_token_moments

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_module, "first_token_moments", counting)
    lm = loaded("gpt2", tiny_tokenizer)
    config = TINY_CONFIG.with_overrides(first_token_weight=0.1)
    create_patch(requests()[:1], loaded=lm, config=config, name="a")
    create_patch(requests()[:1], loaded=lm, config=config, name="b")
    create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="c")
    assert calls == [[1, 2]]


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_subject_opening_the_prompt_is_contrasted_with_its_nearest_tokens(arch: str, tiny_tokenizer) -> None:
    lm = loaded(arch, tiny_tokenizer)
    spec = spec_for_model(lm.model)
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    editor = Editor(
        lm.model,
        tiny_tokenizer,
        TINY_CONFIG.with_overrides(contrast_subjects=4),
        c0={l: torch.eye(d_ff) for l in (1, 2)},
    )
    contrast = editor._contrast_keys([EditRequest("{} w3", "w2", "w4")])
    subject = tiny_tokenizer("w2").input_ids[0]
    table = lm.model.get_input_embeddings().weight.detach()
    similarity = torch.nn.functional.cosine_similarity(table, table[subject][None], dim=1)
    similarity[subject] = -2
    nearest = similarity.topk(4).indices
    with capture(lm.model, inputs={"k": f"{spec.layers}.2.{spec.mlp_out}"}) as seen:
        lm.model(input_ids=nearest[:, None])  # each alone: the first key of a text
    torch.testing.assert_close(contrast[2], seen["k"][:, 0].float().T)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_contrast_words_are_completed_greedily_and_keyed_at_their_last_token(
    arch: str, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = loaded(arch, tiny_tokenizer)
    look_alikes = LookAlikeSubjects(lm.model, tiny_tokenizer, TINY_CONFIG, torch.device("cpu"))
    # a stand-in word rule: a token continues the current word when its id is even
    monkeypatch.setattr(look_alikes, "_added_text", lambda ids, t: "x" if t % 2 == 0 else " x")
    context = torch.tensor([[5, 6]])
    candidates = torch.arange(10, 18)
    rows, last = look_alikes._complete_words(context, candidates, max_extra=3)
    for i, c in enumerate(candidates.tolist()):
        seq = [5, 6, c]
        for _ in range(3):
            nxt = int(lm.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt % 2:
                break
            seq.append(nxt)
        assert int(last[i]) == len(seq) - 1 and rows[i, : len(seq)].tolist() == seq
    assert (last > 2).any() and (last == 2).any()  # some words grew, some ended at once


def test_offloaded_weights_are_refused_before_anything_runs(tiny_tokenizer, tmp_path: Path) -> None:
    """``device_map`` offloading leaves weights on the meta device: create and apply say so (no cryptic copy error)."""
    lm = loaded("llama", tiny_tokenizer)
    patch = random_patch(lm.model, layers=(1,)).save(tmp_path / "p.nmke")
    mlp = lm.model.model.layers[1].mlp
    mlp.down_proj.weight = torch.nn.Parameter(torch.empty_like(mlp.down_proj.weight, device="meta"))
    with pytest.raises(ModelLoadError, match="offloaded"):
        create_patch(requests(), loaded=lm, config=TINY_CONFIG, name="t")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*offloaded"):
        PatchStack.for_model(lm.model).apply(patch)
    assert PatchStack.for_model(lm.model).applied == []


def test_overrides_take_the_field_type_and_refuse_the_wrong_one() -> None:
    as_int = EditConfig().with_overrides(min_preservation=30, z_steps=7.0, layers=[3, 4])
    as_float = EditConfig().with_overrides(min_preservation=30.0, z_steps=7, layers=(3, 4))
    assert (
        as_int == as_float and isinstance(as_int.min_preservation, float) and isinstance(as_int.z_steps, int)
    )
    assert run_key(requests(), as_int, []) == run_key(requests(), as_float, [])  # --set x=30 resumes x=30.0
    assert EditConfig().with_overrides(max_neurons=None, stats_corpus=None).max_neurons is None
    for bad in (
        {"z_steps": "abc"},
        {"z_steps": 2.5},
        {"contrast_words": 1},
        {"landing": "0.9"},
        {"layers": [1, "2"]},
    ):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):
            EditConfig().with_overrides(**bad)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_key_bank_holds_keys_of_the_preserved_text(arch: str) -> None:
    model = MODEL_FACTORIES[arch](init_range=0.2)
    spec = spec_for_model(model)
    rows = [[3, 4, 5, 6, 7], [8, 9, 10], [11]]
    bank = stats_module.key_bank(model, spec, rows, [1, 2], size=5, seed=0)
    assert bank[1].shape == (5, bank[1].shape[1]) and bank[1].dtype == torch.float16
    for l in (1, 2):
        every = []
        for r in rows[:2]:  # the one-token row has no position after the first
            with torch.no_grad(), capture(model, inputs={"k": f"{spec.layers}.{l}.{spec.mlp_out}"}) as seen:
                model(input_ids=torch.tensor([r]))
            every.append(seen["k"][0, 1:].to(torch.float16))
        keys = torch.cat(every).float()  # 6 non-first positions; the bank holds 5 of them, each once
        # the bank's batched, padded pass may round differently from these one-row passes (CPU kernels vary)
        gaps = (keys[:, None, :] - bank[l].float()[None]).abs().amax(dim=2)  # [6 keys, 5 bank rows]
        nearest = gaps.min(dim=0)
        assert float(nearest.values.max()) <= 1e-2 * float(keys.abs().max())
        assert len(set(nearest.indices.tolist())) == 5


def test_nearest_preserved_keys_rank_by_cosine_on_the_selected_neurons(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    bank = torch.zeros(4, d_ff)
    bank[0, :2] = torch.tensor([1.0, 0.0])  # along the subject on neurons 0-1
    bank[1, :2] = torch.tensor([0.0, 1.0])
    bank[2, :2] = torch.tensor([-1.0, 0.0])
    bank[3, 2] = 100.0  # huge, but on a neuron the edit may not change
    config = TINY_CONFIG.with_overrides(contrast_bank=2)
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0, bank={1: bank, 2: bank})
    subject = torch.zeros(1, d_ff)
    subject[0, :3] = torch.tensor([2.0, 0.5, 50.0])
    near = editor._nearest_preserved_keys(
        {1: subject, 2: subject}, torch.tensor([0]), {1: torch.arange(2), 2: torch.arange(2)}
    )
    assert torch.equal(near[1], bank[[0, 1]].T)


def test_contrast_bank_keys_are_kept_by_the_edit(tiny_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = loaded("llama", tiny_tokenizer)
    spec = spec_for_model(lm.model)
    chosen: list[torch.Tensor] = []
    original = Editor._nearest_preserved_keys

    def recording(self, *args):  # type: ignore[no-untyped-def]
        out = original(self, *args)
        chosen.append(out[2])
        return out

    monkeypatch.setattr(Editor, "_nearest_preserved_keys", recording)
    changes = []
    for weight in (0.0, 1e4):
        config = TINY_CONFIG.with_overrides(contrast_subjects=0, contrast_bank=3, contrast_weight=weight)
        patch = create_patch(requests()[:1], loaded=lm, config=config, name="t")
        delta = {d.name: d for d in patch.deltas}[spec.weight_name(2)]
        rows = torch.zeros(delta.shape[delta.neuron_axis], delta.delta.shape[1])
        rows[delta.indices] = delta.delta.float()
        changes.append(float((rows.T @ chosen[-1]).norm()))
    assert chosen[0].shape[1] == 3 and torch.equal(chosen[0], chosen[1])
    assert changes[1] < 0.05 * changes[0], changes


def test_contrast_keep_leaves_contrast_keys_in_the_past_statistics(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    config = TINY_CONFIG.with_overrides(contrast_subjects=4, contrast_weight=0.5, contrast_keep=0.2)
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0)
    contrast = editor._contrast_keys(requests()[:1])
    editor.edit(requests()[:1], 0)
    editor.release()
    for l in (1, 2):
        new = editor.new_keys[l][0]
        expected = new.T @ new + 0.2 * 0.5 * contrast[l] @ contrast[l].T
        torch.testing.assert_close(editor.c_past[l], expected)


def test_contrast_decay_ages_what_earlier_edits_kept(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    c0 = {l: torch.eye(d_ff) for l in (1, 2)}
    config = TINY_CONFIG.with_overrides(
        contrast_subjects=4, contrast_weight=0.5, contrast_keep=0.2, contrast_decay=0.25
    )
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0)
    reqs = [*requests(), EditRequest("w20 {} w21", "w22", "w23")]
    contrast = []
    for i, r in enumerate(reqs):
        contrast.append(editor._contrast_keys([r]))  # from the model this edit starts from
        editor.edit([r], i)
    editor.release()
    for l in (1, 2):
        keys = torch.cat(editor.new_keys[l])
        # the first edit's contrast has aged two edits (0.25^2), the second one, the last none
        kept = sum(0.25 ** (2 - i) * 0.1 * contrast[i][l] @ contrast[i][l].T for i in range(3))
        torch.testing.assert_close(editor.c_past[l], keys.T @ keys + kept, rtol=1e-4, atol=1e-5)
        rows = editor.chain_state()[f"contrast.{l}"]  # what children get is the aged statistics too
        torch.testing.assert_close(rows.T @ rows, kept, rtol=1e-4, atol=1e-5)


def test_contrast_score_steers_the_budget_off_neurons_look_alikes_share(
    tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = loaded("llama", tiny_tokenizer)
    spec = spec_for_model(lm.model)
    d_ff = lm.model.config.intermediate_size

    def chosen(score: float, shared: torch.Tensor | None) -> set[int]:
        def contrast_keys(self, requests):  # type: ignore[no-untyped-def]
            keys = torch.zeros(d_ff, 2)
            if shared is not None:
                keys[shared] = 1e3  # look-alike subjects drive these neurons hard
            return {1: keys, 2: keys}

        monkeypatch.setattr(Editor, "_contrast_keys", contrast_keys)
        config = TINY_CONFIG.with_overrides(contrast_weight=0.0, contrast_score=score)
        patch = create_patch(requests()[:1], loaded=lm, config=config, name="t")
        delta = {d.name: d for d in patch.deltas}[spec.weight_name(2)]
        return set(delta.indices.tolist())

    plain = chosen(0.0, None)
    shared = torch.tensor(sorted(plain)[:3])
    assert chosen(0.0, shared) == plain  # the score alone decides; contrast keys unused at 0
    steered = chosen(1.0, shared)
    assert len(steered) == len(plain) and not steered & set(shared.tolist())


def test_compress_rows_keeps_the_second_moment_in_at_most_d_rows() -> None:
    from nmke_patch.methods.nmke.engine import compress_rows

    rows = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert compress_rows(rows[:4]) is not None and torch.equal(compress_rows(rows[:4]), rows[:4])
    packed = compress_rows(rows)
    assert packed.shape == (5, 5)
    torch.testing.assert_close(packed.T @ packed, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_kept_contrast_travels_to_children(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmke_patch.patch import load_patch

    lm = loaded("llama", tiny_tokenizer)
    editors: list[Editor] = []
    starts: list[dict[int, torch.Tensor]] = []
    original_init = Editor.__init__

    def recording_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        editors.append(self)
        starts.append({l: c.clone() for l, c in self.c_past.items()})

    monkeypatch.setattr(Editor, "__init__", recording_init)
    # 30 contrast keys per edit and layer: more rows than the layer's 48 neurons after two edits
    config = TINY_CONFIG.with_overrides(contrast_subjects=30, contrast_weight=0.5, contrast_keep=0.2)
    parent = create_patch(requests(), loaded=lm, config=config, name="parent")
    assert {k.split(".")[0] for k in parent.state} == {"keys", "contrast"}
    assert all(t.shape[0] <= 48 for k, t in parent.state.items() if k.startswith("contrast"))
    parent.save(tmp_path / "parent.nmke")
    reloaded = load_patch(tmp_path / "parent.nmke")
    create_patch(requests()[:1], loaded=lm, config=config, name="child", on=[reloaded])
    first = editors[0]
    for l in (1, 2):  # the child starts from exactly the parent's past statistics, kept contrast included
        torch.testing.assert_close(starts[1][l], first.c_past[l], rtol=1e-4, atol=1e-4)
    keys_only = parent.state["keys.1"].T @ parent.state["keys.1"]
    assert not torch.allclose(keys_only, first.c_past[1], rtol=1e-2, atol=1e-2)  # the contrast part counts


def test_parent_state_of_the_wrong_width_is_refused_before_editing(tiny_tokenizer) -> None:
    from dataclasses import replace

    from nmke_patch.errors import InvalidPatchError

    lm = loaded("llama", tiny_tokenizer)
    before = state_copy(lm.model)
    parent = create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="parent")
    bad = replace(parent, state={**parent.state, "contrast.1": torch.zeros(3, 47)})
    with pytest.raises(InvalidPatchError, match="47 neurons"):
        create_patch(requests()[1:], loaded=lm, config=TINY_CONFIG, name="child", on=[bad])
    assert_state_equal(lm.model, before)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_listed_look_alikes_contrast_a_subject_opening_the_prompt(arch: str, tiny_tokenizer) -> None:
    lm = loaded(arch, tiny_tokenizer)
    spec = spec_for_model(lm.model)
    d_ff = lm.model.config.intermediate_size if arch == "llama" else lm.model.config.n_inner
    config = TINY_CONFIG.with_overrides(contrast_subjects=4, contrast_first="list")
    editor = Editor(lm.model, tiny_tokenizer, config, c0={l: torch.eye(d_ff) for l in (1, 2)})
    contrast = editor._contrast_keys([EditRequest("{} w3", "w2 w5", "w4")])
    # the names the model lists after the subject ("w2 w5,"), neither the subject nor a word of it
    ids = tiny_tokenizer("w2 w5,", return_tensors="pt").input_ids
    order = lm.model(input_ids=ids).logits[0, -1].argsort(descending=True).tolist()
    words = [tiny_tokenizer.decode([t]).strip() for t in order]
    names = [w for w in words if w.startswith("w") and w not in ("w2", "w5")][:4]
    alone = torch.tensor([tiny_tokenizer(w).input_ids for w in names])
    with capture(lm.model, inputs={"k": f"{spec.layers}.2.{spec.mlp_out}"}) as seen:
        lm.model(input_ids=alone)  # each at the start of a text, as the subject is in the prompt
    torch.testing.assert_close(contrast[2], seen["k"][:, -1].float().T)
    default = Editor(lm.model, tiny_tokenizer, TINY_CONFIG.with_overrides(contrast_subjects=4), c0=editor.c0)
    assert not torch.allclose(default._contrast_keys([EditRequest("{} w3", "w2 w5", "w4")])[2], contrast[2])


def test_past_weight_scales_the_past_keys_in_the_solve(
    tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmke_patch.methods.nmke import engine

    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    past = torch.randn(3, d_ff, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    original = engine.solve_layer

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["c_past"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "solve_layer", recording)
    for weight in (1.0, 0.25):
        config = TINY_CONFIG.with_overrides(contrast_subjects=0, past_weight=weight)
        editor = Editor(
            lm.model,
            tiny_tokenizer,
            config,
            c0={l: torch.eye(d_ff) for l in (1, 2)},
            past_keys={1: past, 2: past},
        )
        editor.edit(requests()[:1], 0)
        editor.release()
    torch.testing.assert_close(seen[0], past.T @ past)
    torch.testing.assert_close(seen[2], 0.25 * (past.T @ past))


def test_sink_ratio_leaves_out_a_bare_key_far_longer_than_its_prefixed_ones(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    c0 = {l: torch.eye(lm.model.config.intermediate_size) for l in (1, 2)}
    config = TINY_CONFIG.with_overrides(key_columns="contexts", sink_ratio=2.0)
    editor = Editor(lm.model, tiny_tokenizer, config, c0=c0)
    columns = editor._columns([0, 0, 0, 1, 1, 1], 2)  # [bare 0, prefixed 0, bare 1, prefixed 1]
    keys = {l: torch.ones(6, 4) for l in (1, 2)}
    keys[2][0] *= 2.5  # request 0's bare key at layer 2: 2.5x its prefixed keys (a first-token sink)
    keys[1][3] *= 1.5  # request 1's at layer 1: longer, but within the ratio
    keys[2][4] *= 9.0  # a prefixed key is never left out
    assert editor._active(columns, keys).tolist() == [[True, False], [True, True], [True, True], [True, True]]
    off = Editor(
        lm.model, tiny_tokenizer, TINY_CONFIG.with_overrides(key_columns="contexts", sink_ratio=None), c0=c0
    )
    assert bool(off._active(columns, keys).all())


def test_a_column_left_out_at_later_layers_gets_its_residual_from_the_earlier_ones(
    tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nmke_patch.methods.nmke.engine as engine

    real_solve, real_active = engine.solve_layer, Editor._active

    def run(overrides: dict[str, Any], drop_bare_at_last: bool) -> tuple[list[torch.Tensor], dict]:
        lm = loaded("llama", tiny_tokenizer)
        seen: list[torch.Tensor] = []

        def solve(keys: torch.Tensor, residuals: torch.Tensor, **kw: Any) -> Any:
            seen.append(residuals.clone())
            return real_solve(keys, residuals, **kw)

        def active(self: Editor, columns: Any, keys: Any) -> torch.Tensor:
            out = real_active(self, columns, keys)
            if drop_bare_at_last:
                out[columns.peer_map.sum(dim=1) > 0, -1] = False
            return out

        monkeypatch.setattr(engine, "solve_layer", solve)
        monkeypatch.setattr(Editor, "_active", active)
        config = TINY_CONFIG.with_overrides(key_columns="contexts", **overrides)
        patch = create_patch(requests()[:1], loaded=lm, config=config, name="p")
        return seen, {d.name: d.delta for d in patch.deltas}

    plain, plain_deltas = run({}, False)
    same, same_deltas = run({"sink_ratio": 1e9}, False)  # nothing that long: the same arithmetic
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    assert all(torch.equal(plain_deltas[k], same_deltas[k]) for k in plain_deltas)
    dropped, _ = run({}, True)
    assert plain[0].shape[1] == 2 and dropped[1].shape[1] == 1  # the bare column is not solved at layer 2
    assert torch.allclose(dropped[0][:, 0], 2 * plain[0][:, 0])  # layer 1 takes its whole residual
    assert torch.allclose(dropped[0][:, 1], plain[0][:, 1])  # the prefixed column still spreads over two


def test_z_steps_are_sized_by_the_prefixed_rows_when_the_bare_one_is_a_sink() -> None:
    from nmke_patch.methods.nmke.values import _reference_norm

    rows = torch.zeros(4, 3)
    rows[0, 0], rows[1, 1], rows[2, 1], rows[3, 2] = 100.0, 3.0, 4.0, 5.0  # bare row 25x the median (4)
    assert float(_reference_norm(rows, None)) == 100.0  # off: the bare row, as published
    assert float(_reference_norm(rows, 8.0)) == 4.0
    assert float(_reference_norm(rows, 30.0)) == 100.0  # within the ratio
    assert float(_reference_norm(rows[:1], 8.0)) == 100.0  # no prefixed rows to compare with


def test_a_key_column_left_out_is_not_ranked_for(tiny_tokenizer) -> None:
    lm = loaded("llama", tiny_tokenizer)
    c0 = {l: torch.eye(lm.model.config.intermediate_size) for l in (1, 2)}
    editor = Editor(lm.model, tiny_tokenizer, TINY_CONFIG.with_overrides(key_columns="contexts"), c0=c0)
    batch, owner = editor._batch(requests())
    fw = editor._forward(batch, editor.layers)
    columns = editor._columns(owner, 2)
    everywhere = torch.ones(4, 2, dtype=torch.bool)
    dropped = everywhere.clone()
    dropped[[0, 2], 1] = False  # both bare columns left out at layer 2
    ranked = editor._select(fw, owner, 2, columns, {}, dropped)
    for row in (0, 3):  # the bare rows' keys weigh nothing: the same as zero keys there
        fw.keys_subject[2][row] = 0.0
    zeroed = editor._select(fw, owner, 2, columns, {}, everywhere)
    assert all(torch.equal(a, b) for a, b in zip(ranked[2], zeroed[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ranked[1], zeroed[1], strict=True))  # layer 1 untouched
    editor.release()


def test_settings_must_be_finite_and_of_a_sane_size() -> None:
    for bad, message in (
        ({"z_lr": "inf"}, "z_lr must be a finite number"),
        ({"z_lr": float("nan")}, "z_lr must be a finite number"),
        ({"stats_tokens": 10**23}, "stats_tokens must be between -1,000,000,000 and 1,000,000,000"),
        ({"z_steps": -(10**10)}, "z_steps must be between"),
        ({"lambda_reg": -5}, "lambda_reg and memit_lambda must be >= 0"),
        ({"z_clamp_norm": -1}, "z_clamp_norm must be > 0"),
        ({"temperature": 0}, "amplification and temperature must be > 0"),
        ({"seed": -1}, "seed must be in"),
    ):
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            EditConfig().with_overrides(**bad)
    assert EditConfig().with_overrides(seed=2**40, z_stop_prob=2.0).seed == 2**40  # > 1: never stop early
    assert EditConfig().with_overrides(memit_lambda=2 * 10**9).memit_lambda == 2e9  # a float: no whole cap


def test_a_refused_setting_is_named_with_the_value_given() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"max_sweeps >= 1.* \(got max_sweeps=-1, sweep_until=0\.5\)"
    ):
        EditConfig(max_sweeps=-1)


def test_unused_names_the_settings_a_method_does_not_read() -> None:
    asked = [
        "max_neurons",
        "grow_budget_to",
        "lambda_reg",
        "memit_lambda",
        "projector_energy",
        "layers",
        "seed",
    ]
    assert list(EditConfig().unused(asked)) == ["lambda_reg", "memit_lambda", "projector_energy"]
    assert list(EditConfig(masked_solve="exact").unused(asked)) == ["memit_lambda"]
    assert list(EditConfig(method="alphaedit").unused(asked)) == [
        "grow_budget_to",
        "max_neurons",
        "memit_lambda",
    ]
    memit = EditConfig(method="memit").unused(asked)
    assert list(memit) == ["grow_budget_to", "lambda_reg", "max_neurons", "projector_energy"]
    assert memit["max_neurons"] == "NMKE only" and memit["lambda_reg"] == "MEMIT takes no null space"
    optimizer = ["z_lr", "z_step", "z_momentum", "bare_weight", "bank_size"]
    assert list(EditConfig().unused(optimizer)) == ["bank_size", "z_lr"]  # normalized steps, no bank
    adam = EditConfig(z_optimizer="adam", key_columns="mean", contrast_bank=8).unused(optimizer)
    assert list(adam) == ["bare_weight", "z_momentum", "z_step"]
    assert list(EditConfig(method="alphaedit").unused(["z_lr"])) == []  # the baselines use Adam
    contrast = ["contrast_weight", "contrast_keep", "contrast_decay", "contrast_words", "contrast_score"]
    assert list(EditConfig(contrast_keep=0.3).unused(contrast)) == []
    assert list(EditConfig(contrast_subjects=0, contrast_bank=4).unused(contrast)) == [
        "contrast_decay",
        "contrast_words",
    ]
    assert list(EditConfig(contrast_subjects=0).unused(contrast)) == sorted(
        contrast
    )  # no contrast keys at all
    ranking = ["neuron_score", "reuse_touched", "contrast_score", "grow_budget_to"]
    assert list(EditConfig().unused(ranking)) == []
    assert list(EditConfig(max_neurons=None).unused(ranking)) == sorted(ranking)  # no budget: no ranking
    assert list(EditConfig(neuron_score="hybrid").unused(ranking)) == ["contrast_score"]
    prefixes = ["bare_weight", "prefix_tokens", "stats_prefix"]
    assert list(EditConfig().unused(prefixes)) == []
    assert list(EditConfig(n_prefixes=0, stats_corpus="text.txt").unused(prefixes)) == prefixes


def test_a_child_on_layers_its_parents_did_not_edit_is_warned_about(tiny_tokenizer, caplog) -> None:
    lm = loaded("llama", tiny_tokenizer)
    parent = create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG.with_overrides(layers=(1,)), name="p")
    with caplog.at_level("WARNING", logger="nmke_patch.create"):
        create_patch(
            requests()[1:], loaded=lm, config=TINY_CONFIG.with_overrides(layers=(1,)), name="c", on=[parent]
        )
    assert "hold no keys" not in caplog.text  # the same layer: protected
    with caplog.at_level("WARNING", logger="nmke_patch.create"):
        create_patch(
            requests()[1:], loaded=lm, config=TINY_CONFIG.with_overrides(layers=(1, 2)), name="c", on=[parent]
        )
    assert "layers [2] hold no keys of the parents' edits" in caplog.text


def test_a_finished_checkpoint_may_go_again_and_a_failed_parent_leaves_nothing(
    tmp_path: Path, tiny_tokenizer
) -> None:
    lm = loaded("llama", tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    first = create_patch(requests(), loaded=lm, config=TINY_CONFIG, name="t", checkpoint_dir=ckpt)
    again = create_patch(requests(), loaded=lm, config=TINY_CONFIG, name="t", checkpoint_dir=ckpt)
    assert again.id == first.id  # the same run, finished: no loss in running it again
    with pytest.raises(InvalidRequestError, match="interrupted run"):  # another run's checkpoint is kept
        create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="t", checkpoint_dir=ckpt)
    other = random_patch(MODEL_FACTORIES["llama"](init_range=0.2, seed=1), name="other", seed=9)
    before = state_copy(lm.model)
    with pytest.raises(PatchMismatchError):  # the second parent does not fit: the first is taken off again
        create_patch(requests()[:1], loaded=lm, config=TINY_CONFIG, name="c", on=[first, other])
    assert not PatchStack.for_model(lm.model).applied
    assert_state_equal(lm.model, before)


def test_edit_records_read_back_what_they_wrote() -> None:
    record = EditRecord(3, None, 0.01, 0.7, 12, {"4": 153, "5": 153}, {"total": 2.5, "z": 1.0})
    assert EditRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    with pytest.raises(KeyError):
        EditRecord.from_json({k: v for k, v in record.to_json().items() if k != "z_steps"})
    for field, bad in [("index", True), ("id", 5), ("p_new_after", "0.7"), ("neurons", {"4": 1.5})]:
        with pytest.raises(TypeError, match=f"field '{field}'"):
            EditRecord.from_json({**record.to_json(), field: bad})


def test_a_diverged_solve_names_an_absurd_parent_state(tiny_tokenizer, tmp_path: Path) -> None:
    """Finite but absurd key rows in a stranger's parent (1e30) make the solve diverge: say where to look."""
    lm = loaded("llama", tiny_tokenizer)
    d_ff = lm.model.config.intermediate_size
    parent = random_patch(lm.model, name="parent", layers=(1, 2))
    parent = replace(parent, state={f"keys.{l}": torch.full((2, d_ff), 1e30) for l in (1, 2)})
    saved = parent.save(tmp_path / "parent.nmke")
    with pytest.raises(
        EditError, match=r"the parents' key state \(--on\) holds values up to 1e\+30: check it"
    ):
        create_patch(requests(), loaded=lm, config=TINY_CONFIG, name="child", on=[saved])


def test_create_runs_a_training_model_in_eval_mode_and_gives_it_back_as_it_was(tiny_tokenizer) -> None:
    """A user's model in train mode (GPT-2's dropout is 0.1) with gradients on, even compiled: the same
    patch as from the model in eval mode, no .grad left behind, every module's mode and flag restored."""
    reference = create_patch(requests(), loaded=loaded("gpt2", tiny_tokenizer), config=TINY_CONFIG, name="t")
    lm = loaded("gpt2", tiny_tokenizer)
    lm.model.train()
    lm.model.requires_grad_(True)
    lm.model.transformer.h[0].eval()  # a module the user set apart stays so
    lm.model.lm_head.requires_grad_(False)
    compiled = LoadedModel(torch.compile(lm.model), lm.tokenizer, lm.info)  # never run: unwrapped first
    patch = create_patch(requests(), loaded=compiled, config=TINY_CONFIG, name="t")
    assert torch.equal(patch.deltas[0].delta, reference.deltas[0].delta)
    assert [d.indices.tolist() for d in patch.deltas] == [d.indices.tolist() for d in reference.deltas]
    assert lm.model.training and not lm.model.transformer.h[0].training and lm.model.transformer.h[1].training
    assert all(p.grad is None for p in lm.model.parameters())
    assert not lm.model.lm_head.weight.requires_grad and lm.model.transformer.wpe.weight.requires_grad


def test_the_null_space_kept_is_reported_per_layer(tiny_tokenizer, caplog) -> None:
    """The projector's threshold is relative to C0 (docs/method.md), so its kept dimension is logged."""
    lm = loaded("llama", tiny_tokenizer)
    config = TINY_CONFIG.with_overrides(method="alphaedit")
    with caplog.at_level("INFO", logger="nmke_patch.methods.nmke.engine"):
        create_patch(requests()[:1], loaded=lm, config=config, name="a")
    kept = re.findall(r"layer (\d+): the null space of C0 keeps (\d+) of 48 dimensions", caplog.text)
    assert [int(layer) for layer, _ in kept] == [1, 2] and all(0 < int(dim) < 48 for _, dim in kept)

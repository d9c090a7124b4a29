"""Metric mechanics of ``nmke_patch.evaluate`` and ``nmke-patch eval`` on tiny in-process models."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_state_equal, random_patch, save_tiny, state_copy
from nmke_patch.cli.main import app
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nmke_patch.errors import InvalidRequestError, NmkePatchError, PatchMismatchError
from nmke_patch.evaluate import (
    compare,
    evaluate,
    evaluate_pair,
    footprint,
    greedy_generate,
    load_unrelated,
    ngram_entropy,
    packaged_unrelated,
    perplexity,
    score_targets,
    words,
)
from nmke_patch.lengths import check_fits
from nmke_patch.requests import EditRequest, Neighbor
from nmke_patch.stack import PatchStack

HELDOUT = ["w5 w6 w7 w8 w9 w10 w11 w12", "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30"]
SMALL_EVALUATION: dict = {  # evaluate_pair settings for tiny models: two texts, one fact, short generations
    "heldout_text": HELDOUT,
    "unrelated": [Neighbor("w7 w8", "w9")],
    "generations": 2,
    "generation_tokens": 6,
}
TOL = {"rtol": 0.0, "atol": 1e-5}  # float32 forward passes of different batch shapes


def _argmax_word(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        best = int(model(input_ids=ids).logits[0, -1].argmax())
    return tokenizer.convert_ids_to_tokens(best)


def _other_word(*avoid: str) -> str:
    return next(f"w{i}" for i in range(3, 60) if f"w{i}" not in avoid)


def _request(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, *, new_is_best: bool) -> EditRequest:
    """A request whose new target is (or is not) the model's greedy answer; its neighbour keeps its own."""
    prompt, neighbour = "w1 w2 w3", "w4 w5 w6"
    best, nb_best = _argmax_word(model, tokenizer, prompt), _argmax_word(model, tokenizer, neighbour)
    other = _other_word(best, nb_best)
    return EditRequest(
        prompt="w1 w2 {}",
        subject="w3",
        target_new=best if new_is_best else other,
        target_true=other if new_is_best else best,
        paraphrases=("w1 w2 w3",),
        neighborhood=(Neighbor(neighbour, nb_best),),
    )


@pytest.mark.parametrize("new_is_best", [True, False])
def test_constructed_metrics(tiny_tokenizer: PreTrainedTokenizerFast, new_is_best: bool) -> None:
    model = MODEL_FACTORIES["llama"]()
    request = _request(model, tiny_tokenizer, new_is_best=new_is_best)
    result = evaluate(model, tiny_tokenizer, [request], heldout_text=HELDOUT, unrelated=(), generations=0)
    m = result["metrics"]
    expected = 1.0 if new_is_best else 0.0
    assert m["efficacy"] == expected and m["generalization"] == expected
    assert m["zsre_accuracy"] == expected and m["zsre_paraphrase_accuracy"] == expected
    assert (m["efficacy_margin"] > 0) == new_is_best
    # The neighbour's own target is its greedy answer, so it beats any other target_new.
    assert m["specificity"] == 1.0 and m["zsre_neighborhood_accuracy"] == 1.0
    assert m["unrelated_accuracy"] is None and m["fluency"] is None


def test_comparisons_hold_where_probabilities_underflow(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """P(new) > P(true) is decided on log-probabilities: far below exp's range both would be 0.0."""
    model = MODEL_FACTORIES["llama"]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e4)  # every token but the argmax: log P far below -745
        logits = model(input_ids=torch.tensor([tiny_tokenizer("w1 w2 w3").input_ids])).logits[0, -1]
    words_only = [
        i
        for i in logits.argsort(descending=True).tolist()
        if tiny_tokenizer.convert_ids_to_tokens(i).startswith("w")
    ]
    second, last = (tiny_tokenizer.convert_ids_to_tokens(i) for i in (words_only[1], words_only[-1]))
    request = EditRequest("w1 w2 {}", "w3", second, last, paraphrases=("w1 w2 w3",))
    result = evaluate(model, tiny_tokenizer, [request], heldout_text=(), unrelated=(), generations=0)
    scores = score_targets(model, tiny_tokenizer, ["w1 w2 w3"] * 2, [second, last])
    assert float(scores.logprob[0]) < -745 and float(scores.prob[0]) == 0.0  # the case at hand
    assert scores.logprob[0] > scores.logprob[1]
    assert result["metrics"]["efficacy"] == 1.0 and result["metrics"]["generalization"] == 1.0


def test_evaluate_reads_a_facts_file_path(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    request = _request(model, tiny_tokenizer, new_is_best=True)
    file = tmp_path / "facts.json"
    file.write_text(json.dumps([request.to_json()]), encoding="utf-8")
    kwargs: dict[str, Any] = {"heldout_text": HELDOUT, "unrelated": (), "generations": 0}
    from_path = evaluate(model, tiny_tokenizer, str(file), **kwargs)
    assert from_path["metrics"] == evaluate(model, tiny_tokenizer, [request], **kwargs)["metrics"]
    assert from_path["metrics"]["efficacy"] == 1.0


def test_compare_with_itself_and_retention(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = MODEL_FACTORIES["llama"]()
    request = _request(model, tiny_tokenizer, new_is_best=True)
    answer = _argmax_word(model, tiny_tokenizer, "w7 w8")
    unrelated = [
        Neighbor("w7 w8", answer),
        Neighbor("w9 w10", _other_word(_argmax_word(model, tiny_tokenizer, "w9 w10"))),
    ]
    result = evaluate(
        model, tiny_tokenizer, [request], heldout_text=HELDOUT, unrelated=unrelated, generations=0
    )
    assert result["metrics"]["unrelated_accuracy"] == 0.5
    same = compare(result, result)
    assert same["zsre_neighborhood_agreement"] == 1.0
    assert same["unrelated_retention"] == 1.0
    assert same["perplexity_drift_pct"] == 0.0
    broken = json.loads(json.dumps(result))
    broken["details"]["unrelated_answered"] = dict.fromkeys(broken["details"]["unrelated_answered"], False)
    broken["details"]["neighborhood_argmax"] = {
        k: [-1] * len(v) for k, v in result["details"]["neighborhood_argmax"].items()
    }
    broken["metrics"]["perplexity"] = result["metrics"]["perplexity"] * 1.1
    drift = compare(result, broken)
    assert drift["unrelated_retention"] == 0.0 and drift["zsre_neighborhood_agreement"] == 0.0
    assert drift["perplexity_drift_pct"] == pytest.approx(10.0)


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_scores_are_padding_invariant_and_exact(family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = MODEL_FACTORIES[family]()
    # Shared openings ("w1 w2", "w1"), a row that is a prefix of another, a duplicate, different lengths.
    prompts = ["w1 w2", "w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11 w12", "w1 w2", "w13", "w1 w2 w5", "w1 w9"]
    targets = ["w3 w4", "w4", "w5 w6", "w3 w4", "w14 w15 w16", "w6 w7", "w3"]
    together = score_targets(model, tiny_tokenizer, prompts, targets)
    plain = score_targets(model, tiny_tokenizer, prompts, targets, share_prefixes=False)
    one_row_per_batch = score_targets(model, tiny_tokenizer, prompts, targets, max_batch_tokens=1)
    for other in (plain, one_row_per_batch):
        torch.testing.assert_close(other.logprob, together.logprob, **TOL)
        assert other.argmax == together.argmax
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        alone = score_targets(model, tiny_tokenizer, [p], [t])
        torch.testing.assert_close(together.logprob[i], alone.logprob[0], **TOL)
        assert together.argmax[i] == alone.argmax[0]
        # Reference: one unpadded forward of the full text, log-softmax at the target positions.
        ids = tiny_tokenizer(f"{p} {t}").input_ids
        n = len(tiny_tokenizer(t).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        ref = sum(float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n))
        assert float(together.logprob[i]) == pytest.approx(ref, abs=1e-4)


def test_ngram_entropy_known_values() -> None:
    # bigrams ab:3 ba:2 -> H2 = H(0.6, 0.4); trigrams aba:2 bab:2 -> H3 = 1 bit
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert ngram_entropy(list("ababab")) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    distinct = [f"t{i}" for i in range(9)]  # 8 distinct bigrams, 7 distinct trigrams
    assert ngram_entropy(distinct) == pytest.approx((2 / 3 * 3.0 + 4 / 3 * math.log2(7)) / 2)
    assert ngram_entropy(["x"] * 20) == 0.0
    assert words("Paris, France.") == ["Paris", ",", "France", "."]


def test_perplexity_matches_the_model_loss(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = MODEL_FACTORIES["gpt2"]()
    ppl, tokens = perplexity(model, tiny_tokenizer, HELDOUT)
    assert math.isfinite(ppl) and ppl > 1.0 and tokens == sum(len(p.split()) - 1 for p in HELDOUT)
    ids = torch.tensor([tiny_tokenizer(HELDOUT[1]).input_ids])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert perplexity(model, tiny_tokenizer, HELDOUT[1:])[0] == pytest.approx(math.exp(loss), rel=1e-5)
    capped, used = perplexity(model, tiny_tokenizer, HELDOUT, max_tokens=5)
    assert used == 4 and math.isfinite(capped)


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_texts_longer_than_the_context(family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = MODEL_FACTORIES[family]()  # 64 positions
    before = state_copy(model)
    long_text = " ".join(f"w{i % 60}" for i in range(150))
    ppl, tokens = perplexity(model, tiny_tokenizer, [long_text])  # cut into windows of 64 tokens
    assert math.isfinite(ppl) and tokens == 63 + 63 + 21
    windows = [" ".join(f"w{i % 60}" for i in range(s, min(s + 64, 150))) for s in (0, 64, 128)]
    assert ppl == pytest.approx(perplexity(model, tiny_tokenizer, windows)[0], rel=1e-5)
    (out,) = greedy_generate(model, tiny_tokenizer, [long_text], 8)  # the prompt is cut from the left
    assert len(out.split()) == 8
    short = EditRequest("w3 w4 {} w5", "w10", "w20", "w21")
    long_prompt = replace(short, paraphrases=("w1 w10",), neighborhood=(Neighbor(long_text, "w9"),))
    with pytest.raises(
        InvalidRequestError,
        match=r"^record 1: its neighbourhood prompt 0, with its answer, needs 150 positions; the model has 64$",
    ):
        evaluate(model, tiny_tokenizer, [short, long_prompt], **SMALL_EVALUATION)
    # create feeds only the edit prompt: a long neighbourhood prompt is eval's business
    check_fits([long_prompt], tiny_tokenizer, 64, scored=False, reserve=7)
    # the boundary: a prompt fed with its answer but the answer's last token, 64 positions, runs
    edge = replace(short, prompt=" ".join(["w5"] * 63) + " {}")  # 63 + subject + answer: 64 fed
    evaluate(model, tiny_tokenizer, [edge], **SMALL_EVALUATION)
    with pytest.raises(InvalidRequestError, match="needs 65 positions"):
        evaluate(model, tiny_tokenizer, [replace(edge, prompt="w6 " + edge.prompt)], **SMALL_EVALUATION)
    with pytest.raises(InvalidRequestError, match="context prefixes take 64 of the model's 64 positions"):
        check_fits([short], tiny_tokenizer, 64, scored=False, reserve=64)
    with pytest.raises(
        InvalidRequestError, match="unrelated facts: fact 2, with its answer, needs 150 positions"
    ):
        evaluate(
            model,
            tiny_tokenizer,
            [short],
            **{**SMALL_EVALUATION, "unrelated": [Neighbor("w7", "w8"), Neighbor(long_text, "w9")]},
        )
    with pytest.raises(InvalidRequestError, match="record 0: its prompt, with its answer"):
        evaluate_pair(
            model, tiny_tokenizer, [replace(short, prompt=long_text + " {}")], [random_patch(model)]
        )
    assert_state_equal(model, before)


def test_packaged_unrelated_facts_too_long_for_the_model_are_skipped(
    tiny_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped set is not the user's input: facts a small-context model cannot take are left out of
    retention with a warning, where the user's own set is refused (above)."""
    model = MODEL_FACTORIES["llama"]()  # 64 positions
    long_text = " ".join(f"w{i % 60}" for i in range(150))
    packaged = [Neighbor("w7 w8", "w9"), Neighbor(long_text, "w9"), Neighbor("w3 w4", "w5")]
    monkeypatch.setattr("nmke_patch.health.load_unrelated", lambda *_: list(packaged))
    monkeypatch.setattr("nmke_patch.evaluate.load_unrelated", lambda *_: list(packaged))
    settings = {**SMALL_EVALUATION, "unrelated": None}
    short = EditRequest("w3 w4 {} w5", "w10", "w20", "w21")
    with caplog.at_level("WARNING", logger="nmke_patch.evaluate"):
        alone = evaluate(model, tiny_tokenizer, [short], **settings)
    assert "1 of the 3 packaged unrelated facts do not fit this model's 64 positions" in caplog.text
    assert alone["counts"]["unrelated"] == 2
    assert sorted(alone["details"]["unrelated_answered"]) == ["w3 w4\tw5", "w7 w8\tw9"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.evaluate"):
        pair = evaluate_pair(model, tiny_tokenizer, [short], [random_patch(model)], cache=False, **settings)
    assert caplog.text.count("do not fit this model's 64 positions") == 1
    assert pair["patched"]["counts"]["unrelated"] == pair["base"]["counts"]["unrelated"] == 2
    assert packaged_unrelated(model, tiny_tokenizer) == [packaged[0], packaged[2]]  # create's health report


def test_evaluate_pair_restores_base_and_counts_footprint(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    model = MODEL_FACTORIES["llama"]()
    before = state_copy(model)
    a = random_patch(model, indices=[0, 1, 2], name="a")
    b = random_patch(model, indices=[2, 3], name="b", seed=1)
    request = _request(model, tiny_tokenizer, new_is_best=False)
    kwargs = SMALL_EVALUATION
    result = evaluate_pair(model, tiny_tokenizer, [request], [a, b], force=True, **kwargs)
    assert_state_equal(model, before)
    assert not result["base_cached"] and len(result["patched"]["details"]["generations"]) == 2
    assert result["base"]["metrics"]["fluency"] is not None
    fp = result["comparison"]["footprint"]
    assert fp["union_neurons"] == 2 * 4  # {0, 1, 2} | {2, 3} on each of two layers
    assert fp["parameters_changed"] == 2 * 4 * 32 and fp["patch_bytes"] == a.nbytes + b.nbytes
    assert fp["mean_share"] == pytest.approx(4 / 48) and fp == footprint([a, b])
    again = evaluate_pair(model, tiny_tokenizer, [request], [a, b], force=True, **kwargs)
    assert again["base_cached"] and again["base"]["metrics"] == result["base"]["metrics"]
    # a setting given at its default value is the same setting (the CLI gives every one)
    explicit = evaluate_pair(
        model, tiny_tokenizer, [request], [a, b], force=True, max_batch_tokens=512, **kwargs
    )
    assert explicit["base_cached"]
    (cache_file,) = (tmp_path / "home" / "eval").glob("base-*.json")
    for damaged in ('{"metrics": 1}', "[]", "{"):  # a damaged cache file is evaluated again, not a KeyError
        cache_file.write_text(damaged)
        fresh = evaluate_pair(model, tiny_tokenizer, [request], [a, b], force=True, **kwargs)
        assert not fresh["base_cached"] and fresh["base"]["metrics"] == result["base"]["metrics"]
    assert not evaluate_pair(model, tiny_tokenizer, [request], [a], max_batch_tokens=64, **kwargs)[
        "base_cached"
    ]


def test_evaluate_pair_refuses_a_patch_that_does_not_fit_before_evaluating(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    model = MODEL_FACTORIES["llama"]()
    before = state_copy(model)
    fits = random_patch(model, name="fits")
    other = random_patch(MODEL_FACTORIES["llama"](seed=1), name="other", seed=1)

    def no_evaluation(*_: object, **__: object) -> None:
        raise AssertionError("evaluated before the patches were checked")

    monkeypatch.setattr("nmke_patch.evaluate.evaluate", no_evaluation)
    request = _request(model, tiny_tokenizer, new_is_best=False)
    with pytest.raises(PatchMismatchError, match="other"):
        evaluate_pair(model, tiny_tokenizer, [request], [fits, other], **SMALL_EVALUATION)
    assert_state_equal(model, before)
    assert not (tmp_path / "home").exists()  # no base result cached


def test_cli_eval_json_and_plot(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    base_dir = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    patch = random_patch(model, name="capitals").save(tmp_path / "capitals.nmke")
    facts = tmp_path / "facts $\\foo{$.jsonl"  # a "$" in a title is not mathtext for the chart
    records = [
        {
            "prompt": "w1 w2 {}",
            "subject": f"w{3 + i}",
            "target_new": "w10 w11",
            "target_true": "w12",
            "paraphrases": [f"w4 w{3 + i} w5"],
            "neighborhood": [{"prompt": "w20 w21", "target": "w22"}],
        }
        for i in range(3)
    ]
    facts.write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "unrelated.jsonl").write_text(json.dumps({"prompt": "w30 w31", "target": "w32"}))
    (tmp_path / "heldout.txt").write_text("\n".join(HELDOUT))
    args = [
        "eval",
        str(patch.path),
        "--facts",
        str(facts),
        "--model",
        str(base_dir),
        "--unrelated",
        str(tmp_path / "unrelated.jsonl"),
        "--heldout",
        str(tmp_path / "heldout.txt"),
        "--generations",
        "2",
        "--no-cache",
    ]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["patches"] == [{"name": "capitals", "id": patch.id}] and out["base"]["counts"]["requests"] == 3
    for key in ("efficacy", "generalization", "specificity", "zsre_accuracy", "perplexity", "fluency"):
        assert key in out["base"]["metrics"] and key in out["patched"]["metrics"]
    fp = out["comparison"]["footprint"]
    assert fp["union_neurons"] == 10 and fp["patch_bytes"] == patch.nbytes
    assert set(out["comparison"]) >= {
        "perplexity_drift_pct",
        "unrelated_retention",
        "zsre_neighborhood_agreement",
    }
    table = CliRunner().invoke(app, [*args, "--plot", str(tmp_path / "chart")])  # no extension: .png added
    assert table.exit_code == 0, table.output
    assert "efficacy" in table.output and "patch bytes" in table.output
    agree = next(line for line in table.output.splitlines() if "agree with base" in line)
    share = out["comparison"]["zsre_neighborhood_agreement"]  # the base agrees with itself
    cells = [cell.strip() for cell in agree.split("│")]
    assert cells[2:5] == ["100.0%", f"{share:.1%}", f"{(share - 1) * 100:+.1f} pt"], agree
    assert "records have target_true" not in table.output  # all three have one
    records[1].pop("target_true")
    facts.write_text("\n".join(json.dumps(r) for r in records))
    partial = CliRunner().invoke(app, args)
    assert partial.exit_code == 0, partial.output
    assert "2 of 3 records have target_true: efficacy and generalization are measured on those only" in (
        " ".join(partial.output.split())
    )
    pytest.importorskip("matplotlib")
    assert f"chart written to {tmp_path / 'chart.png'}" in " ".join(table.output.split())
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    bad = CliRunner().invoke(app, [*args[:-5], "--heldout", str(tmp_path / "latin1.txt"), *args[-3:]])
    assert isinstance(bad.exception, InvalidRequestError) and "not UTF-8" in str(bad.exception), bad.output
    (tmp_path / "empty.txt").write_text("\n  \n")
    for option, why in (("--heldout", "is empty"), ("--unrelated", "holds no facts")):
        given = [*args]
        given[given.index(option) + 1] = str(tmp_path / "empty.txt")
        bad = CliRunner().invoke(app, given)
        assert isinstance(bad.exception, InvalidRequestError) and why in str(bad.exception), bad.output


def test_cli_plot_without_matplotlib_fails_early(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model).save(tmp_path / "p.nmke")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 {}", "subject": "w2", "target_new": "w3"}]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(app, ["eval", str(patch.path), "--facts", str(facts), "--plot", "x.png"])
    assert result.exit_code != 0
    assert "pip install" in str(result.exception) and "matplotlib" in str(result.exception)


def test_cli_plot_into_a_missing_folder_fails_before_evaluating(tmp_path: Path, monkeypatch) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"]()).save(tmp_path / "p.nmke")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 {}", "subject": "w2", "target_new": "w3"}]))

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded before --plot was checked")

    monkeypatch.setattr("nmke_patch.models.load_base", no_model)
    target = tmp_path / "missing" / "chart.png"
    result = CliRunner().invoke(app, ["eval", str(patch.path), "--facts", str(facts), "--plot", str(target)])
    assert isinstance(result.exception, NmkePatchError), result.output
    assert f"folder {target.parent} does not exist" in str(result.exception)
    (tmp_path / "afile").write_text("x")
    for plot, message in (
        (str(tmp_path / "afile" / "x.png"), "afile is a file, not a folder"),
        ("", "needs a file"),
        ("/proc/chart.png", "cannot write in /proc"),  # os.access said yes (root): failed after evaluating
    ):
        result = CliRunner().invoke(app, ["eval", str(patch.path), "--facts", str(facts), "--plot", plot])
        assert isinstance(result.exception, NmkePatchError) and message in str(result.exception), (
            result.output
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"generation_tokens": -3}, "generation_tokens must be an integer >= 1"),
        ({"generations": -1}, "generations must be an integer >= 0"),
        ({"heldout_tokens": -5}, "heldout_tokens must be an integer >= 1"),
        ({"max_batch_tokens": 0}, "max_batch_tokens must be an integer >= 1"),
        ({"generations": 2.5}, "generations must be an integer"),
    ],
)
def test_evaluate_refuses_counts_that_are_not(
    tiny_tokenizer: PreTrainedTokenizerFast, setting: dict[str, Any], message: str
) -> None:
    model = MODEL_FACTORIES["llama"]()
    request = _request(model, tiny_tokenizer, new_is_best=True)
    with pytest.raises(InvalidRequestError, match=message):
        evaluate(model, tiny_tokenizer, [request], heldout_text=HELDOUT, unrelated=(), **setting)
    patch = random_patch(model, seed=3)
    applied: list[Any] = []
    original_apply = PatchStack.apply

    def spy(self: PatchStack, p: Any, **kwargs: Any) -> Any:
        applied.append(p)
        return original_apply(self, p, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PatchStack, "apply", spy)
        with pytest.raises(InvalidRequestError, match=message):  # refused before any patch is applied
            evaluate_pair(
                model, tiny_tokenizer, [request], patch, heldout_text=HELDOUT, unrelated=(), **setting
            )
        with pytest.raises(TypeError):
            evaluate_pair(model, tiny_tokenizer, [request], patch, heldout_txt=HELDOUT)
    assert not applied


def test_unrelated_facts_need_a_prompt_and_an_answer(tmp_path: Path) -> None:
    for line in ('{"prompt": "w3 w4", "target": ""}', '{"prompt": "  ", "target": "w5"}'):
        file = tmp_path / "unrelated.jsonl"
        file.write_text('{"prompt": "w1", "target": "w2"}\n' + line + "\n")
        with pytest.raises(
            InvalidRequestError, match=r"unrelated\.jsonl: line 2 needs non-empty 'prompt' and 'target'"
        ):
            load_unrelated(str(file))


def test_unrelated_facts_may_be_a_json_list_and_a_folder_is_named(tmp_path: Path) -> None:
    listed = tmp_path / "unrelated.json"
    listed.write_text(json.dumps([{"prompt": "w1", "target": "w2"}, {"prompt": "w3 w4", "target": "w5"}]))
    assert load_unrelated(str(listed)) == [
        Neighbor("w1", "w2"),
        Neighbor("w3 w4", "w5"),
    ]  # was "line 1 needs"
    listed.write_text(json.dumps([{"prompt": "w1", "target": "w2"}, {"prompt": "w3"}]))
    with pytest.raises(InvalidRequestError, match=r"unrelated\.json: fact 1 needs non-empty 'prompt'"):
        load_unrelated(str(listed))
    with pytest.raises(InvalidRequestError, match=r"cannot read the unrelated facts .*: Is a directory"):
        load_unrelated(str(tmp_path))  # was a bare "[Errno 21] Is a directory"


def test_cli_eval_forced_says_which_patches_did_not_fit(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = MODEL_FACTORIES["llama"]()
    base_dir = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    fits = random_patch(model, name="fits").save(tmp_path / "fits.nmke")
    other = random_patch(MODEL_FACTORIES["llama"](seed=1), name="other", seed=1).save(tmp_path / "other.nmke")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 w2 {}", "subject": "w3", "target_new": "w10"}]))
    args = ["eval", str(fits.path), str(other.path), "--facts", str(facts), "--model", str(base_dir)]
    args += ["--generations", "0", "--no-cache"]
    assert isinstance(CliRunner().invoke(app, args).exception, PatchMismatchError)
    result = CliRunner().invoke(app, [*args, "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: forced: other did not fit the model" in result.stderr
    out = json.loads(result.stdout)  # stdout stays JSON
    assert out["patches"][1]["name"] == "other" and out["forced"] == ["other"]


def test_cli_eval_on_a_merged_model_says_what_its_base_holds(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = MODEL_FACTORIES["llama"]()
    base_dir = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    first = random_patch(model, name="first", indices=[0, 1]).save(tmp_path / "first.nmke")
    second = random_patch(model, name="second", indices=[5, 6], seed=3).save(tmp_path / "second.nmke")
    merged = tmp_path / "merged"
    applied = CliRunner().invoke(app, ["apply", str(first.path), "-m", str(base_dir), "-o", str(merged)])
    assert applied.exit_code == 0, applied.output
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 w2 {}", "subject": "w3", "target_new": "w10"}]))
    args = ["eval", str(second.path), "--facts", str(facts), "--generations", "0", "--no-cache", "--json"]
    result = CliRunner().invoke(app, [*args, "--model", str(merged)])
    assert result.exit_code == 0, result.output
    assert f"note: {merged} already has first merged" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["model_holds"] == [{"name": "first", "id": first.id}]
    plain = CliRunner().invoke(app, [*args, "--model", str(base_dir)])
    assert plain.exit_code == 0 and "already has" not in plain.stderr
    assert json.loads(plain.stdout)["model_holds"] == []


def test_evaluate_scores_a_training_model_without_dropout_and_takes_plain_unrelated_facts(
    tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = MODEL_FACTORIES["gpt2"]()  # dropout 0.1 in train mode
    request = _request(model, tiny_tokenizer, new_is_best=False)
    settings = {**SMALL_EVALUATION, "unrelated": [{"prompt": "w7 w8", "target": "w9"}]}
    reference = evaluate(model, tiny_tokenizer, [request], **settings)
    model.train()
    trained = evaluate(model, tiny_tokenizer, [request], **settings)
    assert trained["metrics"] == reference["metrics"] and model.training  # its mode given back
    facts = tmp_path / "unrelated.jsonl"
    facts.write_text('{"prompt": "w7 w8", "target": "w9"}\n')
    from_file = evaluate(model, tiny_tokenizer, [request], **{**settings, "unrelated": facts})
    assert from_file["metrics"] == reference["metrics"]
    with pytest.raises(InvalidRequestError, match=r"unrelated\[0\]: expected Neighbor\(prompt, target\)"):
        evaluate(model, tiny_tokenizer, [request], **{**settings, "unrelated": [("w7 w8", "w9")]})
    patch = random_patch(model, name="p")  # evaluate_pair takes them too (it checked lengths on raw records)
    pair = evaluate_pair(
        model, tiny_tokenizer, [request], [patch], cache=False, **{**settings, "unrelated": facts}
    )
    assert pair["base"]["metrics"] == reference["metrics"]


def test_layer_lists_in_the_table_name_every_layer() -> None:
    from nmke_patch.cli.eval_commands import _spans

    assert _spans([4, 5, 6, 7, 8]) == "4-8"
    assert _spans([8, 2, 3, 7]) == "2-3, 7-8" and _spans([5]) == "5" and _spans([1, 3]) == "1, 3"


def test_eval_warns_about_two_answers_for_one_prompt(
    tiny_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    model = MODEL_FACTORIES["llama"]()
    short = EditRequest("w3 w4 {} w5", "w10", "w20", "w21")
    with caplog.at_level("WARNING", logger="nmke_patch.consistency"):
        evaluate_pair(
            model,
            tiny_tokenizer,
            [short, replace(short, target_new="w22")],
            [],
            cache=False,
            **SMALL_EVALUATION,
        )
    assert "facts: 1 pair(s) of records edit one prompt to different answers" in caplog.text


def test_drift_rows_show_no_base_figure_where_there_is_nothing_to_compare() -> None:
    """With no unrelated fact the base answers, retention is n/a on both sides, not 100% against n/a."""
    from nmke_patch.cli.eval_commands import _rows

    metrics = {"unrelated_accuracy": 0.0}
    comparison = {"zsre_neighborhood_agreement": 0.5, "unrelated_retention": None}
    rows = {
        k: (b, p)
        for k, _, b, p in _rows(
            {"base": {"metrics": metrics}, "patched": {"metrics": metrics}, "comparison": comparison}
        )
    }
    assert rows["unrelated_retention"] == (None, None)
    assert rows["zsre_neighborhood_agreement"] == (1.0, 0.5)


def test_a_tokenizer_that_gives_no_tokens_is_named_not_an_index_error(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """A tokenizer that does not know the text (another model's, or one transformers rebuilt from a config)
    turned every prompt into nothing, and create failed with an IndexError deep in the engine."""

    class Silent:
        def __call__(self, texts: list[str]) -> Any:
            return type("Encoding", (), {"input_ids": [[] for _ in texts]})()

    request = EditRequest("w3 w4 {} w5", "w10", "w20")
    for limit in (None, 64):
        with pytest.raises(InvalidRequestError, match=r"^record 0: the tokenizer turns its prompt with its"):
            check_fits([request], Silent(), limit, scored=False)
    check_fits([request], tiny_tokenizer, None, scored=False)  # a tokenizer that knows the words passes


def test_more_generations_than_distinct_prompts_are_said_not_silently_capped(
    tiny_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    from nmke_patch.evaluate import FLUENCY_PROMPTS

    model = MODEL_FACTORIES["llama"]()
    requests = [EditRequest("w1 w2 {}", "w3", "w4"), EditRequest("w5 {}", "w6", "w7")]
    with caplog.at_level("WARNING", logger="nmke_patch.evaluate"):
        result = evaluate(
            model,
            tiny_tokenizer,
            requests,
            heldout_text=(),
            unrelated=(),
            generations=100,
            generation_tokens=2,
        )
    made = len(requests) + len(FLUENCY_PROMPTS)
    assert result["counts"]["generations"] == len(result["details"]["generations"]) == made
    assert f"100 generations asked, but there are only {made} distinct prompts" in caplog.text

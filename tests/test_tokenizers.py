"""Tokenizer variants the tiny word-level tokenizer does not cover: one that appends an end-of-text token
(``add_eos_token=True``, as some Llama-family checkpoints ship) and one whose added pad id lies outside
the model's embedding. Both must edit and score exactly as the plain tokenizer does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from test_engine import TINY_CONFIG, loaded
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from nmke_patch.create import LoadedModel, create_patch
from nmke_patch.evaluate import evaluate
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.methods.nmke.prompts import encode
from nmke_patch.models import BaseModelInfo
from nmke_patch.requests import EditRequest
from nmke_patch.tokens import appended_specials, last_text_id, text_ids

WORDS = ["<unk>", "<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(VOCAB - 4)]


def word_tokenizer(
    *, bos: bool = False, eos: bool = False, pad: str | None = "<pad>"
) -> PreTrainedTokenizerFast:
    """The tests' word-level tokenizer, optionally putting ``<bos>`` before and ``<eos>`` after each text."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join([*(["<bos>"] if bos else []), "$A", *(["<eos>"] if eos else [])])
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", 3), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token=pad, eos_token="<eos>", bos_token="<bos>"
    )


def requests() -> list[EditRequest]:
    return [
        EditRequest("w1 w2 {} w3", "w4", "w5", target_true="w6", paraphrases=("w20 w4 w21",)),
        EditRequest("{} w8", "w9 w10", "w11 w12", target_true="w13"),  # the subject opens the prompt
    ]


@pytest.mark.parametrize("bos", [False, True])
def test_an_appended_end_token_is_never_part_of_a_target_or_a_prompt(bos: bool) -> None:
    plain, eos = word_tokenizer(bos=bos), word_tokenizer(bos=bos, eos=True)
    assert appended_specials(plain) == 0 and appended_specials(eos) == 1
    assert text_ids(eos, "w1 w2") == text_ids(plain, "w1 w2") == [3] * bos + [4 + 1, 4 + 2]
    assert last_text_id(eos, "w7") == WORDS.index("w7")
    prompts, subjects = ["w1 w2 w4 w3", "w9 w10 w8"], ["w4", "w9 w10"]
    for targets in (["w5", "w11 w12"], [None, None]):
        a, b = encode(plain, prompts, subjects, targets), encode(eos, prompts, subjects, targets)
        assert a.target_ids == b.target_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.last_pos, b.last_pos) and torch.equal(a.subject_pos, b.subject_pos)
    assert b.target_ids == [[], []] and b.last_pos.tolist() == [3 + bos, 2 + bos]  # "w3" and "w8"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tokenizer_that_appends_an_end_token_edits_and_scores_as_without_it(arch: str) -> None:
    """Targets, prompts' last tokens, sampling starts, preservation text and contrast subjects all read
    the text's own tokens: the patch and every metric equal the plain tokenizer's, bit for bit."""
    config = EditConfig(**{**TINY_CONFIG.to_json(), "contrast_subject_first": True})
    patches, reports = [], []
    for tok in (word_tokenizer(), word_tokenizer(eos=True)):
        setup = loaded(arch, tok)
        patches.append(create_patch(requests(), loaded=setup, config=config, name="p"))
        reports.append(evaluate(setup.model, tok, requests(), heldout_text="w1 w2 w3 w4 w5", generations=2))
    for a, b in zip(patches[0].deltas, patches[1].deltas, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.delta, b.delta)
    assert reports[0]["metrics"] == reports[1]["metrics"]


def test_a_pad_id_outside_the_embedding_is_never_fed_to_the_model(tmp_path: Path) -> None:
    """``add_special_tokens({"pad_token": ...})`` without resizing the embedding: the pad id is the
    vocabulary's size. Padded positions are masked, so they hold id 0 instead."""
    plain = word_tokenizer(pad=None)
    padded = word_tokenizer(pad=None)
    padded.add_special_tokens({"pad_token": "<newpad>"})
    assert padded.pad_token_id == VOCAB  # one past the tiny models' embedding
    setup = loaded("llama", plain)
    assert setup.model.get_input_embeddings().num_embeddings == VOCAB
    kwargs = {"heldout_text": "w1 w2 w3\nw4 w5 w6 w7 w8", "generations": 2}
    expected = evaluate(setup.model, plain, requests(), **kwargs)["metrics"]
    assert evaluate(setup.model, padded, requests(), **kwargs)["metrics"] == expected  # was an IndexError
    info = BaseModelInfo("tiny", None, type(setup.model).__name__, setup.model.config.model_type)
    patch = create_patch(
        requests(), loaded=LoadedModel(setup.model, padded, info), config=TINY_CONFIG, name="p"
    )
    assert patch.deltas


def test_preserved_text_opens_with_the_bos_as_the_edited_prompts_do(tmp_path: Path) -> None:
    """Llama 2/3 and Mistral put a BOS in front of every prompt; the key statistics are read on text that
    opens the same way (sampled after it, and each corpus chunk), cached apart from text without it."""
    from nmke_patch.stats import corpus_rows, sample_text

    model = loaded("llama", word_tokenizer()).model
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{4 + i % 50}" for i in range(40)))
    for bos in (False, True):
        tok = word_tokenizer(bos=bos)
        sampled = sample_text(model, tok, 60, seed=0, seq_len=8)
        chunks = corpus_rows(tok, str(corpus), 1000, seq_len=8)
        for rows in (sampled, chunks):
            assert all(len(r) <= 8 + bos and (r[0] == 3) == bos for r in rows)
        assert [w for r in chunks for w in r if w != 3] == tok("x " + corpus.read_text()).input_ids[1 + bos :]

"""``stats_corpus``: a bad path is one clear ModelLoadError naming it, raised before anything is computed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_llama
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nmke_patch.errors import ModelLoadError
from nmke_patch.methods.nmke.config import EditConfig
from nmke_patch.stats import StatsSource, check_corpus, corpus_rows, load_statistics

SEP = os.pathsep


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("w3 w4 w5 w6 w7\n" * 20, encoding="utf-8")
    return path


def _refused(corpus: str, culprit: str) -> None:
    for check in (lambda: check_corpus(corpus), lambda: StatsSource(corpus, 100, 0)):
        with pytest.raises(ModelLoadError) as info:
            check()
        message = str(info.value)
        assert f"cannot read stats corpus file {culprit!r}" in message, message
        assert f"several joined with os.pathsep ({SEP!r} here)" in message and "\n" not in message


def test_missing_file_directory_and_empty_entry_are_named(tmp_path: Path, corpus: Path) -> None:
    missing = str(tmp_path / "missing.txt")
    _refused(missing, missing)
    _refused(f"{corpus}{SEP}{missing}", missing)  # the second of two files
    _refused(str(tmp_path), str(tmp_path))  # a directory
    _refused(f"{corpus}{SEP}", "")  # a trailing separator leaves an empty entry
    _refused(f"{corpus},{corpus}", f"{corpus},{corpus}")  # joined with the wrong separator


def test_readable_corpus_is_accepted(corpus: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    check_corpus(None)
    check_corpus(f"{corpus}{SEP}{corpus}")
    source = StatsSource(str(corpus), 50, 0)
    assert source.key.startswith("corpus-") and source.key == StatsSource(str(corpus), 50, 0).key
    rows = corpus_rows(tiny_tokenizer, [str(corpus)], 50, seq_len=16)
    assert sum(len(r) for r in rows) >= 50


def test_load_statistics_refuses_before_computing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def heavy(*args: object, **kwargs: object) -> None:
        raise AssertionError("ran before the corpus was checked")

    for name in ("model_fingerprint", "sample_text", "corpus_rows", "key_second_moments"):
        monkeypatch.setattr(f"nmke_patch.stats.{name}", heavy)
    config = EditConfig().with_overrides(stats_corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(ModelLoadError, match=r"cannot read stats corpus file '.*missing\.txt': No such file"):
        load_statistics(tiny_llama(), None, [1], [config])


def test_cli_create_names_the_corpus(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    from nmke_patch.cli.main import app

    model_dir = save_tiny(tiny_llama(dtype=torch.float32), tiny_tokenizer, tmp_path / "model")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w3 {} w4", "subject": "w5", "target_new": "w6"}]))
    args = ["create", str(facts), "-o", str(tmp_path / "p.nmke"), "--model", str(model_dir), "--layers", "1"]
    for bad in (str(tmp_path / "missing.txt"), str(tmp_path)):
        result = CliRunner().invoke(app, [*args, "--stats-corpus", bad])
        assert isinstance(result.exception, ModelLoadError), result.output
        assert f"cannot read stats corpus file {bad!r}" in str(result.exception)
    assert not (tmp_path / "p.nmke").exists()

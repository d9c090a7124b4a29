"""``stats_corpus``: a bad path is one clear ModelLoadError naming it, raised before anything is computed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_llama
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nmke_patch.dataset_corpus import DatasetCorpus
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
    rows = corpus_rows(tiny_tokenizer, str(corpus), 50, seq_len=16)
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


# -- a `datasets` data set (offline here: a local folder of data files, as load_dataset takes) ----------------


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "wiki"
    folder.mkdir()
    rows = [{"id": i, "body": f"w{3 + i % 5} w{4 + i % 7} w{5 + i % 3} w6 w7"} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return folder


def test_dataset_corpus_is_streamed_into_rows(
    dataset_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    pytest.importorskip("datasets")
    spec = f"dataset:{dataset_dir}?field=body"
    check_corpus(spec)
    rows = corpus_rows(tiny_tokenizer, spec, 30, seq_len=4)
    assert sum(len(r) for r in rows) >= 30 and len(rows) < 40  # only as much as asked for is read
    assert rows[0] == tiny_tokenizer("w3 w4 w5 w6 w7").input_ids[:4]
    auto = corpus_rows(
        tiny_tokenizer, f"dataset:{dataset_dir}", 30, seq_len=4
    )  # no 'text': first string column
    assert auto == rows
    source = StatsSource(spec, 30, 0)
    assert source.key.startswith("dataset-") and source.key == StatsSource(f"{spec}&split=train", 30, 0).key
    assert source.key != StatsSource(f"dataset:{dataset_dir}?field=id", 30, 0).key
    before = source.key
    (dataset_dir / "train.jsonl").write_text(json.dumps({"body": "w9"}), encoding="utf-8")
    assert source.key != before  # edited files are other text


def test_dataset_rows_are_joined_into_one_stream(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "lines"
    folder.mkdir()
    lines = ["w3 w4", "", "   ", "w5", "w6 w7 w8"]  # one line per row, blank ones among them
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines), encoding="utf-8")
    rows = corpus_rows(tiny_tokenizer, f"dataset:{folder}", 100, seq_len=4)
    assert rows == [tiny_tokenizer("w3 w4 w5 w6").input_ids, tiny_tokenizer("w7 w8").input_ids]


def test_dataset_values_parse_like_their_documentation() -> None:
    pytest.importorskip("datasets")
    parsed = DatasetCorpus.parse("dataset:org/wiki%3Fx?config=a%26b&split=train+validation&field=%20body%20")
    assert (parsed.name, parsed.config, parsed.split, parsed.field) == (
        "org/wiki?x",
        "a&b",
        "train+validation",
        "body",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dataset:", "no data set name after 'dataset:'"),
        (
            "dataset:wiki?colour=red",
            "'colour=red' is not one of config, split, field, revision=VALUE, once each",
        ),
        ("dataset:wiki?split=a&split=b", "'split=b' is not one of"),
        ("dataset:wiki?split=", "'split=' is not one of"),
        ("dataset:wiki?config=a&", "'' is not one of"),
        ("dataset:wiki?config", "'config' is not one of"),
    ],
)
def test_bad_dataset_values_are_refused_before_loading(spec: str, message: str) -> None:
    pytest.importorskip("datasets")
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        check_corpus(spec)


def test_unreadable_dataset_names_it(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    pytest.importorskip("datasets")
    with pytest.raises(ModelLoadError, match=r"cannot read stats corpus data set '.*nowhere'"):
        corpus_rows(tiny_tokenizer, f"dataset:{tmp_path / 'nowhere'}", 30)
    folder = tmp_path / "numbers"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"n": 1}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"no text in field 'text' \(columns: \['n'\]\)"):
        corpus_rows(tiny_tokenizer, f"dataset:{folder}", 30)


def test_missing_datasets_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name: str, *args: object, **kwargs: object) -> object:
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(
        ModelLoadError, match=r"needs the 'datasets' package: pip install 'nmke-patch\[datasets\]'"
    ):
        check_corpus("dataset:wikitext")


def test_corpus_files_are_read_as_far_as_needed_and_a_short_one_is_said(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    from nmke_patch.stats import _pieces

    text = "w3 w4\nw5 " * 5 + "w6" * 10
    pieces = list(_pieces(text, size=12))
    assert "".join(pieces) == text and all(len(p) <= 12 for p in pieces)
    assert all(p.endswith(("\n", " ")) for p in pieces[:-2])  # cut at line ends or spaces...
    assert pieces[-2:] == ["w6" * 6, "w6" * 4]  # ...and at the size where there is neither
    assert any(p.endswith("\n") for p in pieces)  # a line end is preferred to a space
    assert list(_pieces("short", size=12)) == ["short"]
    big = tmp_path / "big.txt"
    big.write_text("w3 w4 w5 w6 w7\n" * 200_000)  # 3 MB: three pieces, and only the first is tokenized
    calls: list[int] = []
    real = type(tiny_tokenizer).__call__

    def counting(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(text))
        return real(self, text, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(tiny_tokenizer), "__call__", counting)
        rows = corpus_rows(tiny_tokenizer, str(big), 500, seq_len=16)
    assert sum(len(r) for r in rows) >= 500
    pieces_read = [n for n in calls if n > 1]  # not nmke_patch.tokens' one-letter probe of the specials
    assert len(pieces_read) == 1 and pieces_read[0] <= 1 << 20  # one piece of at most 1 MB, not the 3 MB file
    short = tmp_path / "short.txt"
    short.write_text("w3 w4 w5")
    with caplog.at_level("WARNING", logger="nmke_patch.stats"):
        rows = corpus_rows(tiny_tokenizer, str(short), 200, seq_len=16)
    assert (
        sum(len(r) for r in rows) < 200 and "holds only" in caplog.text and "of the 200 tokens" in caplog.text
    )


def test_a_short_corpus_is_said_again_when_its_statistics_come_from_the_cache(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    short = tmp_path / "short.txt"
    short.write_text("w3 w4 w5 w6 w7 w8")
    config = EditConfig().with_overrides(stats_corpus=str(short), stats_tokens=200)
    model = tiny_llama()
    for run in ("computed", "cached"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="nmke_patch.stats"):
            load_statistics(model, tiny_tokenizer, [1, 2], [config])
        said = [r.getMessage() for r in caplog.records if "holds only" in r.getMessage()]
        assert len(said) == 1 and "of the 200 tokens asked for" in said[0], (run, caplog.text)

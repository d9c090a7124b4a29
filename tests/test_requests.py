"""Facts files from strangers: the accepted layouts, ZsRE records, and one clear error for anything else."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import COUNTERFACT_RECORD

from nmke_patch.consistency import conflicts, refuse_conflicts, warn_conflicts
from nmke_patch.errors import InvalidRequestError
from nmke_patch.requests import EditRequest, Neighbor, as_requests, parse_request, read_requests

RECORD = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris"}
ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "rephrase": "What university did Watts Humphrey take part in?",
}


def _write(tmp_path: Path, text: str | bytes, name: str = "facts.json") -> Path:
    file = tmp_path / name
    if isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text, encoding="utf-8")
    return file


@pytest.mark.parametrize(
    "text",
    [
        "\ufeff" + json.dumps([RECORD]),  # a byte-order mark (Windows editors write one)
        "\ufeff" + json.dumps(RECORD) + "\n",  # ... before JSONL
        json.dumps(RECORD, indent=2),  # one pretty-printed object
        json.dumps(RECORD),  # one object on one line (JSONL of one record)
    ],
    ids=["bom-list", "bom-jsonl", "pretty-object", "one-line-object"],
)
def test_accepted_layouts(text: str, tmp_path: Path) -> None:
    (request,) = read_requests(_write(tmp_path, text))
    assert (request.text, request.target_new, request.target_true) == (
        "The capital of France is",
        "Rome",
        "Paris",
    )


def test_jsonl_keeps_reading_line_by_line(tmp_path: Path) -> None:
    other = {**RECORD, "subject": "Spain"}
    assert [
        r.subject for r in read_requests(_write(tmp_path, f"{json.dumps(RECORD)}\n\n{json.dumps(other)}\n"))
    ] == [
        "France",
        "Spain",
    ]
    with pytest.raises(InvalidRequestError, match=r"facts\.json: line 3 is not valid JSON \(Expecting"):
        read_requests(_write(tmp_path, f"{json.dumps(RECORD)}\n\n{{\n"))
    bad = {**RECORD, "subject": ""}  # records count from 0; in JSONL the line is named too
    with pytest.raises(InvalidRequestError, match=r"facts\.json: record 1: field 'subject' .* \(line 3\)$"):
        read_requests(_write(tmp_path, f"{json.dumps(RECORD)}\n\n{json.dumps(bad)}\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 200_000, r"facts\.json is not valid JSON \(nested more than 64 levels deep\)"),
        ("[" + "1" * 5000 + "]", r"facts\.json is not valid JSON \(an integer of 5000 digits"),
        (
            json.dumps(RECORD) + '\n{"a": ' + "[" * 200_000,
            r"facts\.json: line 2 is not valid JSON \(nested more than",
        ),
        ('{"a": ' + "9" * 5000 + "}\n", r"facts\.json: line 1 is not valid JSON \(an integer of 5000 digits"),
        ('[{"prompt": "{} is", "subject": "A", "target_new": NaN}]', r"\(NaN is not a JSON number\)"),
        (
            "{\n  " + json.dumps(RECORD)[1:-1] + ",\n}",
            r"facts\.json is not valid JSON .*expected a JSON list",
        ),
        ('[{"prompt": "{} is", "subject": "A\\ud800", "target_new": "B"}]', r"lone surrogate"),
        (
            '[{"prompt": "{} is", "subject": "A", "target_new": "B", "target_new": "C"}]',
            r"\(the key 'target_new' appears twice in one object\)",
        ),
    ],
    ids=[
        "deep-list",
        "huge-int",
        "deep-jsonl-line",
        "huge-int-jsonl",
        "nan",
        "broken-pretty-object",
        "surrogate",
        "duplicate-key",
    ],
)
def test_hostile_json_is_one_clear_error(text: str, message: str, tmp_path: Path) -> None:
    """Deep nesting and huge integers used to escape as RecursionError / ValueError tracebacks."""
    with pytest.raises(InvalidRequestError, match=message):
        read_requests(_write(tmp_path, text))


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
def test_utf16_files_are_named_as_not_utf8(encoding: str, tmp_path: Path) -> None:
    """Without a byte-order mark, UTF-16 of ASCII text is valid UTF-8 full of NULs, not a JSON error."""
    with pytest.raises(InvalidRequestError, match=r"facts\.json: not UTF-8 text"):
        read_requests(_write(tmp_path, json.dumps([RECORD]).encode(encoding)))


def test_devices_and_endless_pipes_are_refused_without_reading_them_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/zero as a facts file used to fill memory (MemoryError traceback); a pipe is read up to the cap."""
    from nmke_patch import jsonio

    with pytest.raises(InvalidRequestError, match=r"/dev/zero: a device, not a text file"):
        read_requests("/dev/zero")
    monkeypatch.setattr(jsonio, "MAX_TEXT_BYTES", 1000)
    fifo = tmp_path / "facts.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b" " * 5000), daemon=True)
    writer.start()
    with pytest.raises(InvalidRequestError, match=r"facts\.jsonl: larger than 1,000 bytes"):
        read_requests(fifo)
    writer.join(timeout=1)


def _zsre(tmp_path: Path, **fields: Any) -> Path:
    record = {k: v for k, v in {**ZSRE, **fields}.items() if v is not None}
    return _write(tmp_path, json.dumps([record]))


def test_zsre_answers_and_rephrase_as_string_or_list(tmp_path: Path) -> None:
    (r,) = read_requests(_zsre(tmp_path, answers="Illinois Institute of Technology", rephrase=["A", "B"]))
    assert r.target_true == "Illinois Institute of Technology"  # was 'I', the first character
    assert r.paraphrases == ("A", "B")  # a list used to be dropped
    (r,) = read_requests(_zsre(tmp_path, answers=[], rephrase=None))
    assert (r.target_true, r.paraphrases) == (None, ())
    (r,) = read_requests(_write(tmp_path, json.dumps([ZSRE])))
    assert r.prompt == "What university did {} attend?" and r.target_new == "University of Michigan"
    assert r.paraphrases == ("What university did Watts Humphrey take part in?",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alt": None}, r"record 0: ZsRE field 'alt' \(the new answer\) must be a non-empty string"),
        ({"alt": ""}, r"record 0: ZsRE field 'alt'"),
        ({"answers": [5]}, r"record 0: ZsRE field 'answers' must be a non-empty string or a list"),
        ({"answers": ""}, r"record 0: ZsRE field 'answers'"),
        ({"answers": {"a": 1}}, r"record 0: ZsRE field 'answers'"),
        ({"rephrase": 7}, r"record 0: ZsRE field 'rephrase' must be a non-empty string or a list"),
        ({"rephrase": ["ok", ""]}, r"record 0: ZsRE field 'rephrase'"),
    ],
    ids=[
        "alt-missing",
        "alt-empty",
        "answers-int",
        "answers-empty",
        "answers-object",
        "rephrase-int",
        "rephrase-blank",
    ],
)
def test_bad_zsre_records_name_the_field(fields: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        read_requests(_zsre(tmp_path, **fields))


def test_zsre_subject_twice_keys_the_occurrence_encode_uses(tmp_path: Path) -> None:
    (r,) = read_requests(
        _zsre(tmp_path, src="Was Watts Humphrey the son of Watts Humphrey?", subject="Watts Humphrey")
    )
    assert r.prompt == "Was Watts Humphrey the son of {}?"  # encode() keys a subject at its last occurrence


def test_prompts_end_before_the_answer(tmp_path: Path) -> None:
    record = {
        "prompt": "The capital of {} is  ",
        "subject": " Spain ",
        "target_new": " Lisbon",
        "paraphrases": ["Spain's capital is\n"],
        "neighborhood": [{"prompt": "The capital of Peru is ", "target": " Lima"}],
    }
    (r,) = read_requests(_write(tmp_path, json.dumps([record])))
    assert r.text == "The capital of Spain is" and r.target_new == "Lisbon"  # not 'is   Lisbon' when scored
    assert r.paraphrases == ("Spain's capital is",)
    assert r.neighborhood[0].prompt == "The capital of Peru is" and r.neighborhood[0].target == "Lima"
    blank = {**record, "neighborhood": [{"prompt": "The capital of Peru is", "target": "  "}]}
    with pytest.raises(InvalidRequestError, match=r"record 0: field 'neighborhood\[0\]'"):
        read_requests(_write(tmp_path, json.dumps([blank])))


def test_a_subject_repeated_after_the_placeholder_is_refused(tmp_path: Path) -> None:
    record = {"prompt": "In {}, the city of Paris is", "subject": "Paris", "target_new": "big"}
    with pytest.raises(InvalidRequestError, match=r"record 0: field 'subject' \('Paris'\) also occurs after"):
        read_requests(_write(tmp_path, json.dumps([record])))
    (r,) = read_requests(
        _write(tmp_path, json.dumps([{**record, "prompt": "Paris is big. The mayor of {} is"}]))
    )
    assert r.text == "Paris is big. The mayor of Paris is"  # before the placeholder: the last one is keyed
    overlapping = {"prompt": "{} Bora is an island in", "subject": "Bora Bora", "target_new": "Japan"}
    with pytest.raises(InvalidRequestError, match=r"'subject' \('Bora Bora'\) also occurs after"):
        read_requests(_write(tmp_path, json.dumps([overlapping])))  # "Bora Bora Bora": last match is not {}


def test_a_prompt_without_placeholder_is_refused_with_the_templated_form(tmp_path: Path) -> None:
    """EasyEdit-style records write the subject into the prompt; the error shows the prompt to write."""
    record = {
        "prompt": "What university did Watts Humphrey attend?",
        "subject": "Watts Humphrey",
        "target_new": "B",
    }
    with pytest.raises(
        InvalidRequestError,
        match=r"record 0: field 'prompt' must contain exactly one '\{\}'.*write it as 'What university did \{\} attend\?'",
    ):
        read_requests(_write(tmp_path, json.dumps([record])))
    with pytest.raises(
        InvalidRequestError, match=r"exactly one '\{\}' where the subject goes \(got 'x y'\)$"
    ):
        read_requests(_write(tmp_path, json.dumps([{**record, "prompt": "x y"}])))  # no subject: no hint


def test_zsre_locality_question_with_its_answer(tmp_path: Path) -> None:
    loc = {"loc": "nq question: who wrote hey jude"}
    for answer in ("Paul McCartney", ["Paul McCartney", "Lennon-McCartney"]):
        (r,) = read_requests(_zsre(tmp_path, **loc, loc_ans=answer))
        assert [(n.prompt, n.target) for n in r.neighborhood] == [("who wrote hey jude", "Paul McCartney")]
    for fields in ({**loc}, {"loc_ans": "Paul McCartney"}, {**loc, "loc_ans": []}, {**loc, "loc_ans": 3}):
        with pytest.raises(InvalidRequestError, match=r"record 0: ZsRE field"):  # was dropped silently
            read_requests(_zsre(tmp_path, **fields))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"], "prompt": "no placeholder"}},
            "requested_rewrite.prompt",
        ),
        (
            {"requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"], "subject": ""}},
            "requested_rewrite.subject",
        ),
        (
            {"requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"], "target_new": {"str": ""}}},
            "requested_rewrite.target_new.str",
        ),
        (
            {"requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"], "target_new": " "}},
            "requested_rewrite.target_new",
        ),
        (
            {"requested_rewrite": {**COUNTERFACT_RECORD["requested_rewrite"], "target_true": ["Paris"]}},
            "requested_rewrite.target_true",
        ),
        ({"paraphrase_prompts": "one string"}, "paraphrase_prompts"),
        ({"neighborhood_prompts": [{"prompt": "x", "target": "y"}]}, "neighborhood_prompts"),
    ],
    ids=[
        "prompt",
        "subject",
        "target_new",
        "target_new-string",
        "target_true-list",
        "paraphrases",
        "neighborhood",
    ],
)
def test_counterfact_errors_name_the_field_as_written(
    change: dict[str, Any], field: str, tmp_path: Path
) -> None:
    file = _write(tmp_path, json.dumps([RECORD, {**COUNTERFACT_RECORD, **change}]))
    with pytest.raises(InvalidRequestError) as info:
        read_requests(file)
    assert str(info.value).startswith(f"{file}: record 1: field {field!r}")
    (r,) = read_requests(_write(tmp_path, json.dumps([COUNTERFACT_RECORD])))
    assert [(n.prompt, n.target) for n in r.neighborhood] == [
        ("The mother tongue of Jean Gabin is", "French")
    ]
    rewrite = COUNTERFACT_RECORD[
        "requested_rewrite"
    ]  # plain strings, as some CounterFact variants write them
    plain = {
        **rewrite,
        "target_new": rewrite["target_new"]["str"],
        "target_true": rewrite["target_true"]["str"],
    }
    (s,) = read_requests(_write(tmp_path, json.dumps([{**COUNTERFACT_RECORD, "requested_rewrite": plain}])))
    assert s == r


def test_python_entry_points_take_a_path_a_record_or_a_list(tmp_path: Path) -> None:
    file = _write(tmp_path, json.dumps([RECORD, ZSRE]))
    from_file = read_requests(file)
    assert as_requests(str(file)) == from_file
    assert as_requests(file) == from_file
    assert as_requests(RECORD) == from_file[:1]
    assert as_requests([from_file[0], ZSRE]) == from_file  # requests and records mixed
    assert as_requests(from_file[1]) == from_file[1:]


def test_python_entry_points_refuse_anything_else() -> None:
    with pytest.raises(InvalidRequestError, match="not int"):
        as_requests(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"record 1.*target_new"):
        as_requests([RECORD, {"prompt": "The capital of {} is", "subject": "Peru"}])


def test_a_misspelled_field_is_named_with_a_suggestion(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = {**RECORD, "paraphrase": ["France's capital city is"]}
    typo.pop("target_true")
    typo["target_ture"] = "Paris"
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        (request,) = read_requests(_write(tmp_path, json.dumps([typo])))
    assert request.target_true is None and request.paraphrases == ()
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "'target_ture' in record(s) 0; did you mean 'target_true'?" in said
    assert "'paraphrase' in record(s) 0; did you mean 'paraphrases'?" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):  # beside the field itself: named, not
        read_requests(_write(tmp_path, json.dumps([{**RECORD, "Target_New": "Lima"}])))  # target_true
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "'Target_New' in record(s) 0; did you mean 'target_new'? (field names are lower case)" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        read_requests(
            _write(
                tmp_path,
                json.dumps(
                    [
                        {**RECORD, "relation": "capital", "subject_id": 7, "prompt_id": 2, "uid": "a1"},
                        {
                            **RECORD,
                            "subject": "Peru",
                            "target": "Rome",
                            "neighborhoods": "v2",
                            "neighborhood": [],
                        },
                        ZSRE,
                        COUNTERFACT_RECORD,
                    ]
                ),
            )
        )
    assert not caplog.records  # metadata, fields beside the one they resemble, CounterFact and ZsRE extras


def test_a_paraphrase_with_a_placeholder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"record 0: field 'paraphrases'\[1\] contains '\{\}'"):
        read_requests(
            _write(tmp_path, json.dumps([{**RECORD, "paraphrases": ["ok", "The capital of {} is"]}]))
        )


def test_a_record_asking_for_its_true_answer_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    same = {**RECORD, "subject": "Peru", "target_new": " Lima", "target_true": "Lima"}
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        assert len(read_requests(_write(tmp_path, json.dumps([RECORD, same])))) == 2  # kept, with a word
        as_requests([same])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("record(s) " in m and "target_new == target_true" in m for m in said)
    assert "record(s) 1 (0-based) ask" in said[0] and "record(s) 0 (0-based) ask" in said[1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        as_requests(as_requests([RECORD, same])[::-1])  # parsed requests are not warned of again
    assert len(caplog.records) == 1 and "record(s) 1 (0-based)" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        as_requests([RECORD])
    assert not caplog.records


def test_a_limit_reads_and_warns_about_the_records_it_keeps_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    same = {**RECORD, "subject": "Peru", "target_new": "Lima", "target_true": "Lima"}
    typo = {**RECORD, "subject": "Chile", "target_ture": "Santiago"}
    del typo["target_true"]
    bad = {**RECORD, "subject": ""}
    file = _write(tmp_path, "\n".join(json.dumps(r) for r in [RECORD, same, typo, bad]))
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        assert len(read_requests(file, limit=1)) == 1
    assert not caplog.records  # the dropped records are neither warned about nor validated
    with caplog.at_level("WARNING", logger="nmke_patch.requests"):
        assert len(read_requests(file, limit=3)) == 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "'target_ture'" in said[0] and "record(s) 1 (0-based)" in said[1]
    with pytest.raises(InvalidRequestError, match=r"record 3: field 'subject'"):
        read_requests(file, limit=4)
    with pytest.raises(InvalidRequestError, match="limit must be at least 1"):
        read_requests(file, limit=0)


def test_python_built_requests_are_checked_like_records() -> None:
    with pytest.raises(InvalidRequestError, match=r"record 0: field 'prompt'"):
        as_requests(EditRequest("w7 w8", "w9", "w11"))  # no {} for the subject
    with pytest.raises(InvalidRequestError, match=r"record 1: field 'subject'"):
        as_requests([RECORD, EditRequest("w7 {} w8", "", "w11")])
    with pytest.raises(InvalidRequestError, match=r"record 0: field 'target_new'"):
        as_requests([EditRequest("w7 {} w8", "w9", " ")])
    good = EditRequest("w7 {} w8", "w9", "w11", "w12", ("w9 w8",), (Neighbor("w1 w8", "w2"),), "id-1")
    assert as_requests(good) == [good]
    with pytest.raises(
        InvalidRequestError, match=r"record 0: ZsRE field 'subject' must be a non-empty string"
    ):
        parse_request({"src": "w1 w2", "subject": "", "alt": "w3"}, 0)


def test_two_answers_for_one_prompt_are_refused_and_overlaps_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One patch cannot make one prompt give two answers: create refuses them, naming both records (eval
    warns: one of them must fail). Repeats and neighbourhood prompts about edited facts are warned about
    when read (the metric would count a legitimate change against the patch); other files read quietly."""
    other = {**RECORD, "subject": "Spain", "target_new": "Oslo", "target_true": "Madrid"}
    berlin = {**RECORD, "prompt": "The  capital of {} is ", "target_new": " Berlin"}  # spacing differs
    file = _write(tmp_path, json.dumps([RECORD, other, berlin]))
    read = read_requests(file)
    with pytest.raises(
        InvalidRequestError,
        match=r"^facts.json: 1 pair\(s\) of records edit one prompt to different answers \(0-based\): records 0 "
        r"and 2 edit "
        r"'The  capital of France is' to 'Rome' and 'Berlin'; one patch holds one answer per prompt",
    ):
        refuse_conflicts(read, "facts.json")
    with caplog.at_level("WARNING", logger="nmke_patch.consistency"):
        warn_conflicts(read, "facts.json")
    assert (
        "1 pair(s) of records edit one prompt to different answers" in caplog.text
        and "one of each pair" in caplog.text
    )
    assert conflicts(read[:2]) == []
    assert [c[:16] for c in conflicts([*read, *read])] == ["records 0 and 2 ", "records 0 and 5 "]  # not 3, 4
    caplog.clear()
    # a repeat, and neighbourhood prompts that are an edited prompt or name an edited subject
    neighbours = [
        {"prompt": "The capital of Spain is", "target": "Madrid"},
        {"prompt": "Flights to Spain land in", "target": "Madrid"},
        {"prompt": "The capital of Spainland is", "target": "X"},  # a longer word: not Spain
        {"prompt": "The capital of Italy is", "target": "Rome"},
    ]
    with caplog.at_level("WARNING", logger="nmke_patch.consistency"):
        read = read_requests(
            _write(tmp_path, json.dumps([{**RECORD, "neighborhood": neighbours}, other, RECORD]))
        )
    assert len(read) == 3
    assert "record(s) repeated (the repeat edits nothing new): 2 repeats 0" in caplog.text
    assert "2 neighbourhood prompt(s) are about facts these records edit" in caplog.text
    assert "record 0's neighbourhood prompt 0 is record 1's edit prompt" in caplog.text
    assert "record 0's neighbourhood prompt 1 names record 1's subject 'Spain'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nmke_patch.consistency"):
        as_requests(read)  # parsed requests (create and eval pass them on) are not warned about again
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="nmke_patch.consistency"):
        read_requests(_write(tmp_path, json.dumps([{**RECORD, "neighborhood": neighbours[2:]}, other])))
    assert caplog.text == ""

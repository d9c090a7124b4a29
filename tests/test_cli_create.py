"""``nmke-patch create`` end to end on a tiny model saved to disk: the patch, its table and the landing report."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_patch, save_tiny, tiny_llama
from nmke_patch.cli.main import app
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nmke_patch.errors import InvalidRequestError, PatchMismatchError
from nmke_patch.merged import MergedPatch, write_record
from nmke_patch.patch import load_patch


@pytest.fixture
def setup(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))  # statistics cached here, not in ~/.cache
    model_dir = save_tiny(tiny_llama(dtype=torch.float32), tiny_tokenizer, tmp_path / "model")
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            [
                {"prompt": "w3 {} w4", "subject": "w5", "target_new": "w6"},
                {"prompt": "w7 w8 {} w9", "subject": "w10 w11", "target_new": "w12"},
            ]
        )
    )
    return ["create", str(facts), "--model", str(model_dir), "--layers", "1", "--stats-tokens", "200"]


def test_create_writes_a_patch_and_reports_every_edit(setup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "p.nmke"
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--set", "sweep_until=0.0"])
    assert result.exit_code == 0, result.output
    patch = load_patch(out)
    assert len(patch.manifest.requests) == 2 and len(patch.manifest.metrics) == 2
    assert "patch written to" in result.output and "w3 w5 w4" in result.output
    assert "2 of 2 edit(s) reach P(new) >= 0 after all edits" in result.output
    assert "held-out perplexity (without -> with this patch): " in result.output
    kept = re.search(
        r"unrelated facts kept: (\d+) of the (\d+) the model answers without this patch", result.output
    )
    assert kept and int(kept[1]) <= int(kept[2]), result.output
    assert "warning" not in result.output


def test_create_shows_a_stranger_s_name_escaped(setup: list[str], tmp_path: Path) -> None:
    name = "ab\x1b[2Jcd\u202exyz"
    result = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "p.nmke"), "--name", name])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output  # the table's title had them raw
    assert "ab\\x1b[2Jcd\\u202exyz: 2 edit(s)" in result.output


def test_create_warns_when_held_out_perplexity_rises(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nmke_patch.health

    readings = iter([(20.0, 1024), (31.0, 1024)])  # without, then with the patch
    monkeypatch.setattr(nmke_patch.health, "perplexity", lambda *a, **k: next(readings))
    result = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "p.nmke")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "held-out perplexity (without -> with this patch): 20.00 -> 31.00 (+55.0%)" in text
    assert "warning: held-out perplexity rose +55.0%" in text


def test_create_warns_about_edits_below_the_landing_threshold(setup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "p.nmke"
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--set", "sweep_until=1.0"])
    assert result.exit_code == 0, (
        result.output
    )  # the patch is still written: a weak edit is reported, not lost
    finals = [m["p_new_final"] for m in load_patch(out).manifest.metrics]
    assert all(p < 1.0 for p in finals)
    text = " ".join(result.output.split())
    assert "0 of 2 edit(s) reach P(new) >= 1 after all edits" in text
    assert f"warning: 2 edit(s) below P(new) 1: #0 ({finals[0]:.3f}), #1 ({finals[1]:.3f})" in text
    assert "z_stop_whole" not in text  # one-token answers: the per-token stop is the whole answer's
    facts = tmp_path / "long.json"
    facts.write_text(json.dumps([{"prompt": "w3 {} w4", "subject": "w5", "target_new": "w6 w7 w8"}]))
    args = ["create", str(facts), *setup[2:], "-o", str(tmp_path / "long.nmke"), "--set", "sweep_until=1.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "#0 answer with several tokens" in " ".join(result.output.split())
    assert "`--set z_stop_whole=true` aims at the whole answer" in " ".join(result.output.split())
    memit = CliRunner().invoke(
        app, [*args[:-4], "-o", str(tmp_path / "m.nmke"), "--method", "memit", *args[-2:]]
    )
    assert memit.exit_code == 0 and "below P(new)" in memit.output
    assert "z_stop_whole" not in memit.output  # NMKE only: not advised where --set would refuse it


def test_create_with_a_dataset_as_stats_corpus(setup: list[str], tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [json.dumps({"text": f"w{3 + i % 9} w{4 + i % 5} w6 w7 w8"}) for i in range(60)]
    (folder / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "p.nmke"
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--stats-corpus", f"dataset:{folder}"])
    assert result.exit_code == 0, result.output
    assert load_patch(out).manifest.method["config"]["stats_corpus"] == f"dataset:{folder}"
    home = tmp_path / "home" / "stats"
    assert any(p.name.startswith("dataset-") for p in home.glob("*/*")), list(home.glob("*/*"))


def test_create_reports_sampling_the_statistics_the_first_time_only(setup: list[str], tmp_path: Path) -> None:
    first = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "a.nmke")])
    assert first.exit_code == 0, first.output
    assert "sampling 200 tokens of preservation text" in " ".join(first.output.split())
    again = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "b.nmke")])  # cached now
    assert again.exit_code == 0, again.output
    assert "preservation text" not in again.output


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("notes", "holds files that are not a patch's (notes.txt)"),
        ("file", "is not a patch directory"),
        ("under-file", "is a file, not a directory"),
        ("readme-only", "has no manifest.json, so it is not a patch"),
        ("broken-link", "is a broken link"),
    ],
)
def test_create_overwrite_replaces_only_a_patch(
    setup: list[str], tmp_path: Path, layout: str, message: str
) -> None:
    precious = tmp_path / "precious"
    if layout in ("notes", "readme-only"):
        precious.mkdir()
        kept = precious / ("notes.txt" if layout == "notes" else "README.md")  # a patch file's name, alone
        kept.write_text("keep me")
        out = precious
    elif layout == "broken-link":
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        out, kept = tmp_path / "link" / "x.nmke", precious
        kept.write_text("keep me")
    else:
        precious.write_text("keep me")
        out, kept = (precious if layout == "file" else precious / "x.nmke"), precious
    result = CliRunner().invoke(
        app, [*setup, "-o", str(out), "--overwrite", "--model", str(tmp_path / "none")]
    )
    assert result.exit_code != 0 and message in " ".join(str(result.exception).split())
    assert kept.read_text() == "keep me"  # refused before the (missing) model was looked at


def test_create_overwrite_replaces_an_existing_patch(setup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "p.nmke"
    assert CliRunner().invoke(app, [*setup, "-o", str(out)]).exit_code == 0
    refused = CliRunner().invoke(app, [*setup, "-o", str(out)])
    assert refused.exit_code != 0 and "already exists" in str(refused.exception)
    again = CliRunner().invoke(app, [*setup, "-o", str(out), "--overwrite", "--set", "seed=1"])
    assert again.exit_code == 0, again.output
    assert load_patch(out).manifest.method["config"]["seed"] == 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--method", "alphaedit", "--max-neurons", "0.05"], "--max-neurons (NMKE only)"),
        (
            ["--method", "memit", "--set", "grow_budget_to=0.4"],
            "--set grow_budget_to (NMKE only)",
        ),
        (
            ["--set", "memit_lambda=10"],
            "--set memit_lambda (MEMIT only)",
        ),
        (["--set", "z_lr=0.1"], "--set z_lr (z_optimizer 'adam' only (this is 'normalized'))"),
    ],
)
def test_create_refuses_settings_the_method_does_not_read(
    setup: list[str], tmp_path: Path, extra: list[str], named: str
) -> None:
    out = tmp_path / "p.nmke"
    result = CliRunner().invoke(app, [*setup, "-o", str(out), *extra])
    assert result.exit_code != 0 and named in str(result.exception)
    assert not out.exists()


def test_an_interrupted_run_is_never_overwritten_and_a_parent_never_replaced(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "p.nmke"
    checkpoint = tmp_path / "p.nmke.checkpoint"
    _interrupt_after_one_edit(setup, out, monkeypatch)
    saved = (checkpoint / "progress.json").read_text()
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, [*setup, "-o", str(out)])  # --resume forgotten
    assert isinstance(result.exception, InvalidRequestError), result.output
    assert "holds the checkpoint of an interrupted run (1 edits done): add --resume" in str(result.exception)
    assert (checkpoint / "progress.json").read_text() == saved  # not touched
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--resume"])
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    assert not checkpoint.exists() and load_patch(out).manifest.name
    # a child written over its own parent would lose the parent it names
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--on", str(out), "--overwrite"])
    assert isinstance(result.exception, FileExistsError) and "is (or holds) the parent" in str(
        result.exception
    )
    assert load_patch(out).manifest.parents == []


def test_empty_layers_are_refused_not_taken_for_the_default(setup: list[str], tmp_path: Path) -> None:
    args = [a for a in setup if a not in ("--layers", "1")]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "p.nmke"), "--layers", ""])
    assert isinstance(result.exception, InvalidRequestError) and "--layers must look like" in str(
        result.exception
    )
    assert not (tmp_path / "p.nmke").exists()


def test_method_and_mode_choices_are_the_configs(tmp_path: Path) -> None:
    from typing import get_args, get_type_hints

    from nmke_patch.cli.create_commands import MethodChoice, ModeChoice

    from nmke_patch.methods.nmke.config import EditConfig, Method

    assert [m.value for m in MethodChoice] == list(get_args(Method))
    assert [m.value for m in ModeChoice] == list(get_args(get_type_hints(EditConfig)["mode"]))
    facts = tmp_path / "facts.json"
    facts.write_text('[{"prompt": "{} is", "subject": "a", "target_new": "b"}]', encoding="utf-8")
    bad = CliRunner().invoke(app, ["create", str(facts), "-o", str(tmp_path / "p.nmke"), "--method", "rome"])
    assert bad.exit_code == 2 and "nmke" in bad.output and "alphaedit" in bad.output
    assert not (tmp_path / "p.nmke").exists()
    assert EditConfig().method == MethodChoice.nmke.value


def test_a_parent_merged_into_the_model_is_refused_before_loading(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = Path(setup[setup.index("--model") + 1])
    parent = random_patch(tiny_llama(dtype=torch.float32), name="merged-one").save(tmp_path / "p.nmke")
    write_record(model_dir, [MergedPatch.of(parent)])  # as `apply --out` leaves it

    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the model loaded before the parents were checked")

    monkeypatch.setattr("nmke_patch.models.load_base", no_model)
    result = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "c.nmke"), "--on", str(parent.path)])
    assert isinstance(result.exception, PatchMismatchError), result.output
    assert "has merged-one merged already" in str(result.exception)
    assert not (tmp_path / "c.nmke").exists()


def test_a_damaged_checkpoint_is_named_on_resume(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "p.nmke"
    checkpoint = tmp_path / "p.nmke.checkpoint"
    _interrupt_after_one_edit(setup, out, monkeypatch)
    progress = json.loads((checkpoint / "progress.json").read_text())
    state = (checkpoint / "state.safetensors").read_bytes()
    damages = {
        "cut short": lambda: (checkpoint / "progress.json").write_text(json.dumps(progress)[:40]),
        "edits beyond the run": lambda: (checkpoint / "progress.json").write_text(
            json.dumps({**progress, "next_index": 99})
        ),
        "records missing": lambda: (checkpoint / "progress.json").write_text(
            json.dumps({**progress, "records": []})
        ),
        "a record field of the wrong type": lambda: (checkpoint / "progress.json").write_text(
            json.dumps({**progress, "records": [{**progress["records"][0], "neurons": "many"}]})
        ),
        "a record that is not an object": lambda: (checkpoint / "progress.json").write_text(
            json.dumps({**progress, "records": [1]})
        ),
        "no state": lambda: (checkpoint / "state.safetensors").unlink(),
        "state bytes changed on disk": lambda: (checkpoint / "state.safetensors").write_bytes(
            state[:-1] + bytes([state[-1] ^ 1])
        ),
        "a state tensor missing": lambda: (checkpoint / "state.safetensors").write_bytes(
            _changed_state(state, lambda t: t.pop(sorted(t)[0]))
        ),
        "a state tensor of another shape": lambda: (checkpoint / "state.safetensors").write_bytes(
            _changed_state(
                state, lambda t: t.update({k: t[k][:-1] for k in t if k.startswith(("cum.", "c_past."))})
            )
        ),
        "non-finite state": lambda: (checkpoint / "state.safetensors").write_bytes(
            _changed_state(
                state, lambda t: t.update({k: t[k] * float("nan") for k in t if k.startswith("cum.")})
            )
        ),
    }
    for what, damage in damages.items():
        (checkpoint / "progress.json").write_text(json.dumps(progress))
        (checkpoint / "state.safetensors").write_bytes(state)
        damage()
        written = checkpoint / "state.safetensors"
        if what.startswith("a state") or what.startswith("non-finite"):  # past the hash, to the tensor checks
            sha = hashlib.sha256(written.read_bytes()).hexdigest()
            (checkpoint / "progress.json").write_text(json.dumps({**progress, "state_sha256": sha}))
        result = CliRunner().invoke(app, [*setup, "-o", str(out), "--resume"])
        assert isinstance(result.exception, InvalidRequestError), (what, result.output)
        assert f"checkpoint {checkpoint} is damaged" in str(result.exception), what
        assert not out.exists()


def _changed_state(data: bytes, change: Callable[[dict[str, torch.Tensor]], object]) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    change(tensors)
    return save({k: v.contiguous() for k, v in tensors.items()})


def _interrupt_after_one_edit(setup: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CLI's create into ``out`` and stop it after the first of two edits, as after Ctrl-C."""
    import nmke_patch.create

    real = nmke_patch.create.create_patch
    with monkeypatch.context() as m:
        m.setattr(nmke_patch.create, "create_patch", lambda *a, **k: real(*a, **{**k, "stop_after": 1}))
        assert CliRunner().invoke(app, [*setup, "-o", str(out), "--checkpoint-every", "1"]).exit_code == 130


@pytest.mark.parametrize("layers", ["0-999999999", "5-2"])
def test_a_layer_range_out_of_reason_is_refused_before_it_is_built(
    layers: str, setup: list[str], tmp_path: Path
) -> None:
    """`0-999999999` used to build a billion-number tuple (MemoryError traceback)."""
    args = [a for a in setup if a not in ("--layers", "1")]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "p.nmke"), "--layers", layers])
    assert isinstance(result.exception, InvalidRequestError)
    assert f"--layers {layers}: a range FIRST-LAST of layer numbers" in str(result.exception)
    assert not (tmp_path / "p.nmke").exists()


def test_no_budget_and_python_spellings_reach_the_config(setup: list[str], tmp_path: Path) -> None:
    """`--max-neurons none` is the published mask size; --set reads None/True/False as null/true/false."""
    out = tmp_path / "p.nmke"
    args = [
        *setup,
        "-o",
        str(out),
        "--max-neurons",
        "none",
        "--set",
        "sink_ratio=None",
        "--set",
        "z_stop_whole=True",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = load_patch(out).manifest.method["config"]
    assert config["max_neurons"] is None and config["sink_ratio"] is None and config["z_stop_whole"] is True
    result = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "q.nmke"), "--max-neurons", "a tenth"])
    assert isinstance(result.exception, InvalidRequestError)
    assert "--max-neurons takes a fraction of a layer's neurons, e.g. 0.1, or none (got 'a tenth')" in str(
        result.exception
    )


def test_a_file_where_the_checkpoint_folder_goes_is_refused_before_any_edit(
    setup: list[str], tmp_path: Path
) -> None:
    """It used to fail at the first checkpoint write, after the statistics and the first edits."""
    (tmp_path / "p.nmke.checkpoint").write_text("notes")
    result = CliRunner().invoke(app, [*setup, "-o", str(tmp_path / "p.nmke")])
    assert isinstance(result.exception, InvalidRequestError)
    assert "p.nmke.checkpoint is a file where the run keeps its checkpoint folder" in str(result.exception)
    assert not (tmp_path / "home" / "stats").exists()  # refused before the statistics


def test_a_second_create_on_an_output_being_written_is_refused_at_once(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on one -o raced to the checkpoint: the second was told to --resume the first's, and the
    loser's checkpoint blocked later runs. The output's lock is taken before anything else."""
    from nmke_patch.paths import sole_writer

    out = tmp_path / "p.nmke"
    monkeypatch.chdir(tmp_path)
    with sole_writer(Path("p.nmke"), "nmke-patch create"):  # the first run, holding the output as spelled
        result = CliRunner().invoke(app, [*setup, "-o", str(out)])
    assert isinstance(result.exception, FileExistsError), result.output
    assert f"another nmke-patch create is writing {out} right now" in str(result.exception)
    assert not out.exists() and not (tmp_path / "p.nmke.checkpoint").exists()
    result = CliRunner().invoke(app, [*setup, "-o", str(out)])  # the lock goes with the first run
    assert result.exit_code == 0, result.output
    assert load_patch(out).manifest.metrics


def test_ctrl_c_while_the_patch_is_saved_keeps_the_checkpoint_and_says_so(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmke_patch.patch import Patch

    out = tmp_path / "p.nmke"

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Patch, "save", interrupted)
        result = CliRunner().invoke(app, [*setup, "-o", str(out)])
    assert result.exit_code == 130 and not out.exists()
    checkpoint = tmp_path / "p.nmke.checkpoint"
    assert "--resume continues from it" in " ".join(result.output.split())
    assert json.loads((checkpoint / "progress.json").read_text())["next_index"] == 2
    result = CliRunner().invoke(app, [*setup, "-o", str(out), "--resume"])
    assert result.exit_code == 0 and load_patch(out).manifest.metrics, result.output
    assert not checkpoint.exists()


def test_warnings_suggest_only_settings_not_already_given(
    setup: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nmke_patch.health

    def run(out: str, *extra: str) -> str:
        readings = iter([(20.0, 1024), (31.0, 1024)])  # a perplexity rise, for its warning
        monkeypatch.setattr(nmke_patch.health, "perplexity", lambda *a, **k: next(readings))
        result = CliRunner().invoke(
            app, [*setup, "-o", str(tmp_path / out), "--set", "sweep_until=1.0", *extra]
        )
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    plain = run("a.nmke")
    assert "--set grow_budget_to=0.4" in plain and "--set min_preservation=300" in plain
    given = run("b.nmke", "--set", "grow_budget_to=0.3", "--set", "min_preservation=300")
    assert "warning: 2 edit(s) below P(new) 1" in given and "warning: held-out perplexity rose" in given
    assert "grow_budget_to=0.4" not in given and "min_preservation=300`" not in given

"""``nmke-patch inspect | apply | revert | verify`` on tiny models saved to disk.

Success paths run in-process through ``typer.testing.CliRunner``. The error contract (one line on stderr,
non-zero exit, no traceback) is checked on the installed ``nmke-patch`` console script in a subprocess, and,
for errors that need a model, on its entry point ``nmke_patch.cli.main.run`` in-process (a subprocess
per case would cost seconds of imports each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES, random_patch, save_tiny
from nmke_patch.cli.main import app, run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

import nmke_patch
from nmke_patch.errors import InvalidPatchError, ModelLoadError, PatchMismatchError
from nmke_patch.hub import build_pack
from nmke_patch.patch import DELTAS_FILE, Patch
from nmke_patch.stack import PatchStack

runner = CliRunner()


def _patch_dir(patch: Patch) -> str:
    assert patch.path is not None
    return str(patch.path)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory, straight from its safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {model_dir}"
    return tensors


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture
def llama_setup(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> tuple[Path, Patch]:
    """A tiny Llama saved to ``base/`` and a patch made on it."""
    model = MODEL_FACTORIES["llama"]()
    base = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    patch = random_patch(model, name="capitals").save(tmp_path / "capitals.nmke")
    return base, patch


# -- inspect ---------------------------------------------------------------------------------------------


def test_inspect_table(llama_setup: tuple[Path, Patch]) -> None:
    _, patch = llama_setup
    result = runner.invoke(app, ["inspect", _patch_dir(patch)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "capitals" in out and patch.id[:16] in out
    assert "model.layers.1.mlp.down_proj.weight" in out and "model.layers.2.mlp.down_proj.weight" in out
    assert "5/48" in out and f"{patch.deltas[0].nbytes:,}" in out
    assert f"total: 10 neuron value vectors, {patch.nbytes:,} bytes of payload" in out
    assert "The capital of X is" in out  # the fact, subject filled in


def test_inspect_json(llama_setup: tuple[Path, Patch], tmp_path: Path) -> None:
    _, patch = llama_setup
    result = runner.invoke(app, ["inspect", _patch_dir(patch), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["name"] == "capitals" and data["id"] == patch.id and data["path"] == _patch_dir(patch)
    assert data["total_neurons"] == 10 and data["payload_bytes"] == patch.nbytes
    assert [t["name"] for t in data["tensors"]] == [d.name for d in patch.deltas]
    assert [(t["neurons"], t["of_neurons"], t["dtype"]) for t in data["tensors"]] == [(5, 48, "float32")] * 2
    assert data["requests"] == list(patch.manifest.requests)
    assert data["base_model"]["model_type"] == "llama" and data["parents"] == []

    other = random_patch(MODEL_FACTORIES["llama"](), name="other", seed=3).save(tmp_path / "other.nmke")
    both = runner.invoke(app, ["inspect", _patch_dir(patch), _patch_dir(other), "--json"])
    assert both.exit_code == 0, both.output
    assert [p["name"] for p in json.loads(both.output)] == ["capitals", "other"]
    build_pack([patch], tmp_path / "pack-of-one")  # a pack is a list, however many patches it holds
    one = runner.invoke(app, ["inspect", str(tmp_path / "pack-of-one"), "--json"])
    assert one.exit_code == 0 and [p["id"] for p in json.loads(one.output)] == [patch.id]


def test_inspect_bad_path_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.nmke")])
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidPatchError)
    assert "not a patch directory" in str(result.exception)


# -- apply / revert --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_apply_out_then_revert_is_bit_identical(
    arch: str, dtype: torch.dtype, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    model = MODEL_FACTORIES[arch](dtype=dtype)
    base = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    a = random_patch(model, name="a", indices=[1, 2, 3], seed=1).save(tmp_path / "a.nmke")
    b = random_patch(model, name="b", indices=[3, 4], seed=2).save(tmp_path / "b.nmke")
    merged, base2 = tmp_path / "merged", tmp_path / "base2"

    result = runner.invoke(
        app, ["apply", _patch_dir(a), _patch_dir(b), "--model", str(base), "--out", str(merged)]
    )
    assert result.exit_code == 0, result.output
    assert "overlap:" in result.output  # a and b share neuron 3 of both tensors

    # the merged model is a plain transformers checkpoint: base + a + b, exactly as the Python API makes it
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert AutoTokenizer.from_pretrained(merged)("w1 w2")["input_ids"] == tiny_tokenizer("w1 w2")["input_ids"]
    expected = MODEL_FACTORIES[arch](dtype=dtype)
    stack = PatchStack.for_model(expected)
    stack.apply(a)
    stack.apply(b)
    _assert_equal(_state(plain), _state(expected))
    base_weights, merged_weights = _weights(base), _weights(merged)
    changed = {k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])}
    assert changed == {d.name for d in a.deltas}
    recorded = json.loads((merged / "nmke_patches.json").read_text())["applied"]
    assert [p["id"] for p in recorded] == [a.id, b.id]
    result = runner.invoke(app, ["inspect", str(merged)])  # a merged model given where a patch goes: said so
    assert isinstance(
        result.exception, InvalidPatchError
    ) and f"is a merged model ({a.name}, {b.name} merged into it)" in str(result.exception)

    result = runner.invoke(
        app, ["revert", _patch_dir(a), _patch_dir(b), "--model", str(merged), "--out", str(base2)]
    )
    assert result.exit_code == 0, result.output
    _assert_equal(_weights(base2), base_weights)  # every tensor, bit for bit
    _assert_equal(_state(AutoModelForCausalLM.from_pretrained(base2)), _state(model))


def test_revert_of_a_patch_not_in_the_merged_model_is_refused(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, a = llama_setup
    b = random_patch(MODEL_FACTORIES["llama"](), name="b", seed=7).save(tmp_path / "b.nmke")
    merged = tmp_path / "merged"
    args = ["--model", str(base), "--out", str(merged)]
    assert runner.invoke(app, ["apply", _patch_dir(a), *args]).exit_code == 0
    result = runner.invoke(
        app, ["revert", _patch_dir(b), "--model", str(merged), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, PatchMismatchError)
    assert "has capitals merged (nmke_patches.json)" in str(result.exception)  # refused before loading
    assert not (tmp_path / "x").exists()
    (merged / "nmke_patches.json").unlink()  # without the record, the weights themselves tell
    result = runner.invoke(
        app, ["revert", _patch_dir(b), "--model", str(merged), "--out", str(tmp_path / "x")]
    )
    assert isinstance(result.exception, PatchMismatchError)
    assert "cannot revert exactly" in str(result.exception)
    assert not (tmp_path / "x").exists()


def _chain(tmp_path: Path) -> tuple[Patch, Patch]:
    """Patches a and b (made on top of a, sharing neurons 2-4 with it) for the tiny Llama of ``llama_setup``."""
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, name="a", seed=3, indices=[0, 1, 2, 3, 4]).save(tmp_path / "a.nmke")
    stack = PatchStack.for_model(model)
    stack.apply(a)
    b = random_patch(model, name="b", seed=4, parents=(a,), indices=[2, 3, 4, 5, 6]).save(tmp_path / "b.nmke")
    stack.unload_all()
    return a, b


def _flat(output: str) -> str:
    """Console output with Rich's line wrapping undone."""
    return " ".join(output.split())


def _record(model_dir: Path) -> list[str]:
    return [e["name"] for e in json.loads((model_dir / "nmke_patches.json").read_text())["applied"]]


def test_the_merged_record_says_what_stays_after_a_partial_revert(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, _ = llama_setup
    a, b = _chain(tmp_path)
    ab, only_a = tmp_path / "ab", tmp_path / "only_a"
    assert (
        runner.invoke(app, ["apply", _patch_dir(a), _patch_dir(b), "-m", str(base), "-o", str(ab)]).exit_code
        == 0
    )
    assert _record(ab) == ["a", "b"]
    assert runner.invoke(app, ["apply", _patch_dir(a), "-m", str(base), "-o", str(only_a)]).exit_code == 0
    # reverting b leaves a: the weights are base + a, and the record and the message say so
    result = runner.invoke(app, ["revert", _patch_dir(b), "-m", str(ab), "-o", str(tmp_path / "rev")])
    assert result.exit_code == 0, result.output
    assert "still has a merged" in _flat(result.output) and "base model saved" not in _flat(result.output)
    assert _record(tmp_path / "rev") == ["a"]
    _assert_equal(_weights(tmp_path / "rev"), _weights(only_a))
    # then a: the base, bit for bit, and an empty record
    result = runner.invoke(
        app, ["revert", _patch_dir(a), "-m", str(tmp_path / "rev"), "-o", str(tmp_path / "b0")]
    )
    assert result.exit_code == 0 and "base model saved" in _flat(result.output)
    assert _record(tmp_path / "b0") == []
    _assert_equal(_weights(tmp_path / "b0"), _weights(base))
    # a merged model refuses, before loading, a patch it holds and a revert out of order
    result = runner.invoke(app, ["apply", _patch_dir(a), "-m", str(ab), "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, PatchMismatchError) and "already has a merged" in str(
        result.exception
    )
    result = runner.invoke(app, ["revert", _patch_dir(a), "-m", str(ab), "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, PatchMismatchError) and "has a, b merged" in str(result.exception)
    assert not (tmp_path / "x").exists()
    # forced anyway: the weights are neither the base nor a recorded state, and nothing claims they are
    result = runner.invoke(
        app, ["revert", _patch_dir(a), "-m", str(ab), "-o", str(tmp_path / "f"), "--force"]
    )
    assert (
        result.exit_code == 0 and "forced" in result.output and "base model saved" not in _flat(result.output)
    )
    assert not (tmp_path / "f" / "nmke_patches.json").exists()
    # a child of what a merged model holds goes on top of it: base + a + b, recorded, and it reverts
    child = tmp_path / "a_then_b"
    result = runner.invoke(app, ["apply", _patch_dir(b), "-m", str(only_a), "-o", str(child)])
    assert result.exit_code == 0, result.output
    _assert_equal(_weights(child), _weights(ab))
    assert _record(child) == ["a", "b"]
    assert runner.invoke(app, ["verify", _patch_dir(b), "-m", str(only_a)]).exit_code == 0
    result = runner.invoke(app, ["revert", _patch_dir(b), "-m", str(child), "-o", str(tmp_path / "a_again")])
    assert result.exit_code == 0 and _record(tmp_path / "a_again") == ["a"]
    _assert_equal(_weights(tmp_path / "a_again"), _weights(only_a))
    loaded, _ = nmke_patch.load_model(only_a, patches=[b])  # the Python API reads the record too
    live = loaded.state_dict()
    _assert_equal({k: live[k] for k in _weights(ab)}, _weights(ab))
    stack = PatchStack.for_model(loaded)
    assert [m.name for m in stack.merged] == ["a"] and [p.name for p in stack.unload_all()] == ["b"]
    _assert_equal({k: live[k] for k in _weights(only_a)}, _weights(only_a))
    # on the base, or after a model that lacks a, the child is refused before loading
    result = runner.invoke(app, ["apply", _patch_dir(b), "-m", str(base), "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, PatchMismatchError) and "made on top of a (not given)" in str(
        result.exception
    )
    assert not (tmp_path / "x").exists()
    # forced past the record's order where the weights still revert exactly (c and a share no neuron):
    # the record, less what was reverted, still says what stays
    c = random_patch(MODEL_FACTORIES["llama"](), name="c", seed=5, indices=[10, 11]).save(tmp_path / "c.nmke")
    ac = tmp_path / "ac"
    result = runner.invoke(app, ["apply", _patch_dir(a), _patch_dir(c), "-m", str(base), "-o", str(ac)])
    assert result.exit_code == 0 and "overlap" not in result.output
    result = runner.invoke(
        app, ["revert", _patch_dir(a), "-m", str(ac), "-o", str(tmp_path / "c_only"), "--force"]
    )
    assert result.exit_code == 0 and "still has c merged" in _flat(result.output)
    assert _record(tmp_path / "c_only") == ["c"]
    # an unrelated patch on a's neurons is reported as an overlap; b, made on top of a, is not
    d = random_patch(MODEL_FACTORIES["llama"](), name="d", seed=6, indices=[0, 1]).save(tmp_path / "d.nmke")
    args = [
        "apply",
        _patch_dir(a),
        _patch_dir(b),
        _patch_dir(d),
        "-m",
        str(base),
        "-o",
        str(tmp_path / "abd"),
    ]
    overlaps = [line for line in _flat(runner.invoke(app, args).output).split("overlap:")[1:]]
    assert overlaps and all(line.strip().startswith("d and a") for line in overlaps), overlaps
    # a patch forced onto weights it was not made on: applied as asked, and no record claims otherwise
    foreign = random_patch(MODEL_FACTORIES["llama"](seed=1), name="foreign", indices=[7]).save(
        tmp_path / "f.nmke"
    )
    args = ["apply", _patch_dir(foreign), "-m", str(base), "-o", str(tmp_path / "forced")]
    assert isinstance(runner.invoke(app, args).exception, PatchMismatchError)
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0 and "forced: foreign" in _flat(result.output)
    assert not (tmp_path / "forced" / "nmke_patches.json").exists()
    # a record that is not one is an error, not ignored
    (ab / "nmke_patches.json").write_text('{"applied": [1]}')
    result = runner.invoke(app, ["revert", _patch_dir(b), "-m", str(ab), "-o", str(tmp_path / "y")])
    assert isinstance(result.exception, ModelLoadError) and "not a record of merged patches" in str(
        result.exception
    )
    twice = {"name": "b", "id": "0" * 64}
    (ab / "nmke_patches.json").write_text(json.dumps({"applied": [twice, twice]}))
    result = runner.invoke(app, ["apply", _patch_dir(b), "-m", str(ab), "-o", str(tmp_path / "z")])
    assert isinstance(result.exception, ModelLoadError) and "lists b more than once" in str(result.exception)
    assert not (tmp_path / "z").exists()


def test_an_interrupted_save_leaves_the_output_as_it_was(
    llama_setup: tuple[Path, Patch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, patch = llama_setup
    out = tmp_path / "merged"
    assert runner.invoke(app, ["apply", _patch_dir(patch), "-m", str(base), "-o", str(out)]).exit_code == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    shutil.copytree(out, tmp_path / "copy")
    # over an existing merged model (--overwrite), and into a new folder
    for model, target in ((tmp_path / "copy", out), (out, tmp_path / "new")):
        args = ["revert", _patch_dir(patch), "-m", str(model), "-o", str(target), "--overwrite"]
        assert runner.invoke(app, args).exit_code == 130  # Ctrl-C's exit status
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


# -- verify ----------------------------------------------------------------------------------------------


def test_verify_ok_and_wrong_model(
    llama_setup: tuple[Path, Patch], tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    base, patch = llama_setup
    result = runner.invoke(app, ["verify", _patch_dir(patch), "--model", str(base)])
    assert result.exit_code == 0, result.output
    assert f"ok {patch.describe()}" in result.output

    other = save_tiny(MODEL_FACTORIES["llama"](seed=1), tiny_tokenizer, tmp_path / "other")
    result = runner.invoke(app, ["verify", _patch_dir(patch), "--model", str(other)])
    assert result.exit_code != 0
    assert isinstance(result.exception, PatchMismatchError)
    assert "capitals" in str(result.exception) and "differ" in str(result.exception)

    gpt2 = save_tiny(MODEL_FACTORIES["gpt2"](), tiny_tokenizer, tmp_path / "gpt2")
    result = runner.invoke(app, ["verify", _patch_dir(patch), "--model", str(gpt2)])
    assert isinstance(result.exception, PatchMismatchError)
    assert "not an editable MLP output projection" in str(result.exception)


def test_verify_catches_a_difference_outside_the_touched_neurons(
    llama_setup: tuple[Path, Patch], tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    base, patch = llama_setup
    model = AutoModelForCausalLM.from_pretrained(base)
    name = patch.deltas[0].name
    untouched = next(i for i in range(48) if i not in patch.deltas[0].indices.tolist())
    with torch.no_grad():
        model.get_parameter(name)[:, untouched] += 1.0
    near = save_tiny(model, tiny_tokenizer, tmp_path / "near")
    result = runner.invoke(app, ["verify", _patch_dir(patch), "--model", str(near)])
    assert isinstance(result.exception, PatchMismatchError)
    assert "fingerprint mismatch" in str(result.exception)


# -- the error contract of the console script ----------------------------------------------------------

_PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm progress line from transformers (not an error message)


def _assert_one_line_error(returncode: int, stderr: str, *expected: str) -> None:
    assert returncode != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]


def test_console_script_bad_patch_path(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    script = shutil.which("nmke-patch", path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert script, "the nmke-patch console script is not installed (pip install -e .)"
    missing = tmp_path / "nowhere" / "missing.nmke"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [script, "inspect", str(missing)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.stdout == ""
    _assert_one_line_error(proc.returncode, proc.stderr, str(missing), "not a patch directory")


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """``nmke-patch ARGS`` through the console-script entry point, in-process."""
    monkeypatch.setattr(sys, "argv", ["nmke-patch", *args])
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as info:
        run()
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def test_entry_point_errors_are_one_line(
    llama_setup: tuple[Path, Patch],
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, patch = llama_setup
    tampered = random_patch(MODEL_FACTORIES["llama"](), name="t").save(tmp_path / "t.nmke")
    deltas = Path(_patch_dir(tampered)) / DELTAS_FILE
    deltas.write_bytes(deltas.read_bytes()[:-4])
    out = tmp_path / "merged"
    code, err = _run_main(
        monkeypatch, capsys, "apply", _patch_dir(tampered), "--model", str(base), "--out", str(out)
    )
    _assert_one_line_error(code, err, "sha256", "tampered with or truncated")
    assert not out.exists()

    other = save_tiny(MODEL_FACTORIES["llama"](seed=1), tiny_tokenizer, tmp_path / "other")
    code, err = _run_main(monkeypatch, capsys, "verify", _patch_dir(patch), "--model", str(other))
    _assert_one_line_error(code, err, "capitals", "model.layers.1.mlp.down_proj.weight", "differ")

    code, err = _run_main(monkeypatch, capsys, "verify", _patch_dir(patch), "--model", str(tmp_path / "nope"))
    _assert_one_line_error(code, err, "could not load model", "does not exist")
    monkeypatch.chdir(tmp_path)  # a relative path that does not exist is not taken for a Hub id
    code, err = _run_main(monkeypatch, capsys, "verify", _patch_dir(patch), "--model", "./nope")
    _assert_one_line_error(code, err, "could not load model './nope': does not exist")
    code, err = _run_main(
        monkeypatch, capsys, "verify", _patch_dir(patch), "--model", _patch_dir(patch) + "/manifest.json"
    )
    _assert_one_line_error(code, err, "is not a directory")

    code, err = _run_main(
        monkeypatch, capsys, "verify", _patch_dir(patch), "--model", str(base), "--device", "tpu:9"
    )
    _assert_one_line_error(code, err, "unknown device 'tpu:9'")
    if not torch.cuda.is_available():
        code, err = _run_main(
            monkeypatch, capsys, "verify", _patch_dir(patch), "--model", str(base), "--device", "cuda"
        )
        _assert_one_line_error(code, err, "no CUDA device available")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["inspect"], "Missing argument"),
        (["inspect", "x.nmke", "--bogus"], "No such option: --bogus"),
        (["no-such-command"], "No such command"),
        (["create", "missing.json", "-o", "x.nmke"], "does not exist"),
        (["export-peft", "x.nmke", "--out", "o", "--format", "xyz"], "'xyz' is not one of"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(
    args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err and expected in err, err


def test_ctrl_c_exits_130(
    llama_setup: tuple[Path, Patch], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("nmke_patch.cli.patch_commands.resolve_patches", interrupted)
    code, err = _run_main(monkeypatch, capsys, "inspect", _patch_dir(llama_setup[1]))
    assert code == 130 and err.strip() == "interrupted"


def test_untrusted_names_are_printed_as_text_not_markup(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    hidden = random_patch(model, name="a[black on black] (hidden)[/]").save(tmp_path / "hidden.nmke")
    closing = random_patch(model, name="b[/]", seed=1).save(tmp_path / "closing.nmke")
    for patch, name in ((hidden, "a[black on black] (hidden)[/]"), (closing, "b[/]")):
        result = runner.invoke(app, ["inspect", _patch_dir(patch)])
        assert result.exit_code == 0, result.output
        assert name in result.output


def test_apply_refuses_to_write_over_its_model_or_a_full_directory(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, patch = llama_setup
    before = _weights(base)
    patch_files = sorted(p.name for p in Path(_patch_dir(patch)).iterdir())
    result = runner.invoke(app, ["apply", _patch_dir(patch), "--model", str(base), "--out", str(base)])
    assert isinstance(result.exception, FileExistsError) and "is the model being read" in str(
        result.exception
    )
    _assert_equal(_weights(base), before)
    result = runner.invoke(
        app, ["apply", _patch_dir(patch), "--model", str(base), "--out", _patch_dir(patch)]
    )
    assert isinstance(result.exception, FileExistsError) and "--overwrite" in str(result.exception)
    result = runner.invoke(
        app, ["apply", _patch_dir(patch), "--model", str(base), "--out", _patch_dir(patch), "--overwrite"]
    )
    assert isinstance(result.exception, FileExistsError) and "holds manifest.json (a patch or a pack)" in str(
        result.exception
    )
    assert sorted(p.name for p in Path(_patch_dir(patch)).iterdir()) == patch_files
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    args = ["apply", _patch_dir(patch), "--model", str(base), "--out", str(full)]
    assert isinstance(runner.invoke(app, args).exception, FileExistsError)
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert (full / "notes.txt").read_text() == "mine" and (full / "nmke_patches.json").exists()


def test_create_options_that_contradict_or_do_nothing_are_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 {} w2", "subject": "w3", "target_new": "w4"}]))
    out = str(tmp_path / "x.nmke")
    nowhere = str(tmp_path / "no-model")  # never loaded: every refusal comes first
    cases = [
        (["--batch-size", "3"], 1, "--batch-size needs --mode batch"),
        (["--name", " "], 1, "--name is blank"),
        (["--max-neurons", "0.1", "--set", "max_neurons=0.2"], 1, "use --max-neurons instead"),
        (["--set", "mode=batch"], 1, "use --mode instead"),
        (["--checkpoint-every", "0"], 2, "--checkpoint-every"),
    ]
    for extra, expected_code, message in cases:
        code, err = _run_main(
            monkeypatch, capsys, "create", str(facts), "-o", out, "--model", nowhere, *extra
        )
        assert code == expected_code and message in err and "Traceback" not in err, err
    assert not Path(out).exists()


def test_apply_notes_a_patch_recorded_in_a_narrower_dtype(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, same = llama_setup
    narrow = random_patch(MODEL_FACTORIES["llama"](dtype=torch.bfloat16), name="bf16made", seed=3)
    narrow_dir = _patch_dir(narrow.save(tmp_path / "bf16made.nmke"))
    result = runner.invoke(app, ["apply", narrow_dir, "--model", str(base), "--out", str(tmp_path / "m1")])
    assert result.exit_code == 0, result.output
    assert "bf16made recorded weights in a narrower dtype" in " ".join(result.output.split())
    result = runner.invoke(
        app, ["apply", _patch_dir(same), "--model", str(base), "--out", str(tmp_path / "m2")]
    )
    assert result.exit_code == 0 and "narrower dtype" not in result.output


def test_library_warnings_are_shown_escaped() -> None:
    """Library warnings (logging) quote patch and file names: they reached the terminal with raw ESC and
    U+202E."""
    import logging

    from nmke_patch.cli.common import ShownFormatter

    record = logging.LogRecord(
        "nmke_patch.pack", logging.WARNING, "", 0, "patches %s", ("a\x1b[2J\u202eb",), None
    )
    assert ShownFormatter("%(message)s").format(record) == "patches a\\x1b[2J\\u202eb"


def test_control_characters_in_names_are_shown_escaped(tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"](), name="a\x1b[31mRED\x1b[0m\r\nforged line")
    patch.manifest.base_model["name_or_path"] = "org/\x1b[2Jwiped"
    result = runner.invoke(app, ["inspect", _patch_dir(patch.save(tmp_path / "ctrl.nmke"))])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert "a\\x1b[31mRED\\x1b[0m\\x0d\\x0aforged line" in result.output
    assert "base: org/\\x1b[2Jwiped" in result.output


def test_bidirectional_controls_in_names_are_shown_escaped(tmp_path: Path) -> None:
    """U+202E reverses what follows it on screen: "evil\u202etxt.exe" would read as "evilexe.txt"."""
    patch = random_patch(MODEL_FACTORIES["llama"](), name="evil\u202etxt.exe\u2066x\u2069\u200f")
    result = runner.invoke(app, ["inspect", _patch_dir(patch.save(tmp_path / "bidi.nmke"))])
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\u202e\u2066\u2069\u200f")
    assert "evil\\u202etxt.exe\\u2066x\\u2069\\u200f" in result.output


def test_a_manifest_cannot_make_its_display_grow_quadratically(tmp_path: Path) -> None:
    """Each request's prompt gets its subject in the first ``{}`` only: 2,000 ``{}`` and a 5,000-character
    subject (a 14 KB manifest) would otherwise print and write cards of 10 MB each."""
    patch = random_patch(MODEL_FACTORIES["llama"](), name="amp")
    patch.manifest.requests[:] = [{"prompt": "{}" * 2000, "subject": "S" * 5000, "target_new": "x"}]
    folder = patch.save(tmp_path / "amp.nmke").path
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert len(result.output) < 40_000
    card = (folder / "README.md").read_text()
    pack_card = (build_pack([folder], tmp_path / "pack") / "README.md").read_text()
    for text in (card, pack_card):
        assert len(text) < 40_000 and text.count("S" * 5000) == 1 and "S" * 5000 + "{}" * 1999 in text


def test_every_message_shows_control_characters_escaped(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    """Not only the messages that escape names themselves: `revert` names what stays merged from the
    merged model's own record."""
    base, _ = llama_setup
    model = MODEL_FACTORIES["llama"]()
    evil = _patch_dir(random_patch(model, name="\x1b[2J\x1b[31mEVIL", seed=5).save(tmp_path / "e.nmke"))
    plain = _patch_dir(random_patch(model, name="plain", seed=6).save(tmp_path / "p.nmke"))
    merged, out = str(tmp_path / "m"), str(tmp_path / "r")
    assert runner.invoke(app, ["apply", evil, plain, "--model", str(base), "--out", merged]).exit_code == 0
    result = runner.invoke(app, ["revert", plain, "--model", merged, "--out", out])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "still has \\x1b[2J\\x1b[31mEVIL merged" in " ".join(
        result.stdout.split()
    )


def test_non_finite_settings_and_full_export_dirs_are_refused_first(
    llama_setup: tuple[Path, Patch],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "w1 {} w2", "subject": "w3", "target_new": "w4"}]))
    nowhere = str(tmp_path / "no-model")
    code, err = _run_main(
        monkeypatch, capsys, "create", str(facts), "-o", str(tmp_path / "x.nmke"), "--model", nowhere,
        "--set", "z_clamp_norm=Infinity",
    )  # fmt: skip
    assert code == 1 and "z_clamp_norm must be a finite number (got 'Infinity')" in err, err
    full = tmp_path / "adapter"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, err = _run_main(monkeypatch, capsys, "export-peft", _patch_dir(llama_setup[1]), "--out", str(full))
    assert code == 1 and "--overwrite" in err and sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_inspect_shows_p_new_right_after_each_edit_and_after_all(tmp_path: Path) -> None:
    made = random_patch(MODEL_FACTORIES["llama"](), name="two")
    metrics = [{"index": 0, "p_new_before": 0.01, "p_new_after": 0.9, "p_new_final": 0.35}]
    patch = dataclasses.replace(made, manifest=dataclasses.replace(made.manifest, metrics=metrics))
    result = runner.invoke(app, ["inspect", _patch_dir(patch.save(tmp_path / "two.nmke"))])
    assert result.exit_code == 0, result.output
    assert re.search(r"0\.010\s*│\s*0\.900\s*│\s*0\.350", result.output), result.output


def test_verify_notes_a_manifest_whose_base_is_another_architecture(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, patch = llama_setup
    copy = Path(shutil.copytree(_patch_dir(patch), tmp_path / "renamed.nmke"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["base_model"] |= {"architecture": "GPT2LMHeadModel", "model_type": "gpt2"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(copy), "--model", str(base)])
    assert result.exit_code == 0, result.output  # the weights decide the fit (docs/format.md)
    text = " ".join(result.output.split())
    assert "records its base as GPT2LMHeadModel (gpt2), this model is LlamaForCausalLM (llama)" in text
    plain = runner.invoke(app, ["verify", _patch_dir(patch), "--model", str(base)])
    assert plain.exit_code == 0 and "records its base" not in plain.output
    del manifest["base_model"]["architecture"]  # optional (docs/format.md): nothing to compare
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bare = runner.invoke(app, ["verify", str(copy), "--model", str(base)])
    assert bare.exit_code == 0 and "records its base" not in bare.output


def test_apply_writes_weights_other_users_can_read(llama_setup: tuple[Path, Patch], tmp_path: Path) -> None:
    base, patch = llama_setup
    old = os.umask(0o022)
    try:
        result = runner.invoke(
            app, ["apply", _patch_dir(patch), "--model", str(base), "--out", str(tmp_path / "m")]
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "m").glob("*.safetensors"))
    assert files and all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def test_pack_builds_a_pack_folder_offline(llama_setup: tuple[Path, Patch], tmp_path: Path) -> None:
    base, patch = llama_setup
    model = MODEL_FACTORIES["llama"]()
    PatchStack.for_model(model).apply(patch)  # the second is made on top of the first
    second = random_patch(model, name="second", seed=5, parents=(patch,))
    second_dir = _patch_dir(second.save(tmp_path / "second.nmke"))
    out = tmp_path / "pack"
    result = runner.invoke(app, ["pack", _patch_dir(patch), second_dir, "-o", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "pack.json").read_text())["patches"]
    assert [e["id"] for e in entries] == [patch.id, second.id]
    verified = runner.invoke(app, ["verify", str(out), "--model", str(base)])
    assert verified.exit_code == 0 and verified.output.count("ok ") == 2, verified.output
    again = runner.invoke(app, ["pack", _patch_dir(patch), "-o", str(out)])
    assert again.exit_code != 0 and "is not empty" in str(again.exception)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    linked = runner.invoke(app, ["pack", _patch_dir(patch), "-o", str(tmp_path / "link")])
    assert linked.exit_code != 0 and "is a file or a link" in str(linked.exception)


def test_a_failed_pack_leaves_nothing_behind(
    llama_setup: tuple[Path, Patch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nmke_patch.export.peft

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("export failed")

    monkeypatch.setattr(nmke_patch.export.peft, "export_peft", broken)  # after patches/ and pack.json
    _, patch = llama_setup
    result = runner.invoke(app, ["pack", _patch_dir(patch), "-o", str(tmp_path / "pack"), "--with-peft"])
    assert result.exit_code != 0 and "export failed" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir() if "pack" in p.name) == []


def test_a_patch_file_that_is_not_a_regular_file_is_named_as_such(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    _, patch = llama_setup
    copy = Path(shutil.copytree(_patch_dir(patch), tmp_path / "odd.nmke"))
    (copy / DELTAS_FILE).unlink()
    (copy / DELTAS_FILE).symlink_to("/dev/zero")
    result = runner.invoke(app, ["inspect", str(copy)])
    assert result.exit_code != 0 and f"{DELTAS_FILE} is not a regular file" in str(result.exception)
    (copy / DELTAS_FILE).unlink()
    result = runner.invoke(app, ["inspect", str(copy)])
    assert f"{DELTAS_FILE} is missing" in str(result.exception)


def test_version_names_the_package_the_format_and_the_libraries() -> None:
    from nmke_patch.version import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"nmke-patch {__version__} (patch format nmke-patch/1); torch ")
    assert "transformers " in result.output and "safetensors " in result.output


@pytest.mark.parametrize("command", ["apply", "verify", "eval", "load_model"])
def test_a_broken_chain_is_refused_before_the_model_loads(command: str, tmp_path: Path) -> None:
    """The model path does not exist: a refusal that names the chain proves the check ran first."""
    import nmke_patch

    model = MODEL_FACTORIES["llama"]()
    parent = random_patch(model, name="parent").save(tmp_path / "parent.nmke")
    child = random_patch(model, name="child", seed=1, parents=(parent,)).save(tmp_path / "child.nmke")
    missing_model = str(tmp_path / "no-model")
    if command == "load_model":
        with pytest.raises(PatchMismatchError, match="made on top of parent"):
            nmke_patch.load_model(missing_model, patches=[child.path])
        return
    facts = tmp_path / "facts.json"
    facts.write_text('[{"prompt": "{} is", "subject": "a", "target_new": "b"}]', encoding="utf-8")
    args = {
        "apply": ["apply", _patch_dir(child), "--model", missing_model, "--out", str(tmp_path / "out")],
        "verify": ["verify", _patch_dir(child), "--model", missing_model],
        "eval": ["eval", _patch_dir(child), "--facts", str(facts), "--model", missing_model],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, PatchMismatchError), result.output
    assert "made on top of parent" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_independent_patches_on_shared_neurons_are_reverted_together(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, _ = llama_setup
    model = MODEL_FACTORIES["llama"]()
    x = random_patch(model, name="x", seed=7, indices=[0, 1, 2]).save(tmp_path / "x.nmke")
    y = random_patch(model, name="y", seed=8, indices=[2, 3]).save(
        tmp_path / "y.nmke"
    )  # made on the base too
    xy = tmp_path / "xy"
    result = runner.invoke(app, ["apply", _patch_dir(x), _patch_dir(y), "-m", str(base), "-o", str(xy)])
    assert result.exit_code == 0 and "takes y off the saved model only together with x" in _flat(
        result.output
    )
    result = runner.invoke(app, ["revert", _patch_dir(y), "-m", str(xy), "-o", str(tmp_path / "y_off")])
    assert isinstance(result.exception, PatchMismatchError)
    assert "If y shares neurons with x, merged before it" in str(result.exception)
    assert "passing their patches too, oldest first (x, then these)" in str(result.exception)
    assert not (tmp_path / "y_off").exists()
    result = runner.invoke(
        app, ["revert", _patch_dir(x), _patch_dir(y), "-m", str(xy), "-o", str(tmp_path / "b0")]
    )
    assert result.exit_code == 0, result.output
    _assert_equal(_weights(tmp_path / "b0"), _weights(base))


def test_a_chain_merged_in_a_narrower_dtype_says_its_child_reverts_with_its_parents(
    llama_setup: tuple[Path, Patch], tmp_path: Path
) -> None:
    base, _ = llama_setup
    a, b = _chain(tmp_path)
    out = tmp_path / "ab_bf16"
    args = ["apply", _patch_dir(a), _patch_dir(b), "-m", str(base), "-o", str(out), "--dtype", "bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recorded a wider dtype than this model's torch.bfloat16" in _flat(result.output)
    result = runner.invoke(app, ["revert", _patch_dir(b), "-m", str(out), "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, PatchMismatchError)
    assert "oldest first (a, then these)" in str(result.exception)
    result = runner.invoke(
        app, ["revert", _patch_dir(a), _patch_dir(b), "-m", str(out), "-o", str(tmp_path / "y")]
    )
    assert result.exit_code == 0, result.output


def test_out_is_probed_where_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing --out folder (maybe a mount point under a read-only parent) is written into, so it is
    probed itself; a new one is created beside its siblings, so its parent is."""
    import nmke_patch.cli.common as common

    import nmke_patch.paths as paths

    probed: list[Path] = []
    monkeypatch.setattr(common, "check_writable", lambda target, folder: probed.append(folder))
    monkeypatch.setattr(paths, "check_writable", lambda target, folder: probed.append(folder))
    (tmp_path / "exists").mkdir()
    common.check_out_dir(tmp_path / "exists")
    common.check_out_dir(tmp_path / "new")
    assert probed == [tmp_path / "exists", tmp_path]

"""Patch format v1 on disk (docs/format.md): golden bytes, round trip, atomic write, validation of untrusted files.

Every refusal is checked twice: the error is an :class:`InvalidPatchError` (or :class:`PatchMismatchError`
for file-valid patches that do not fit the model) naming what is wrong, and the model it was about to be
applied to is ``torch.equal`` to before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_state_equal, random_patch, state_copy
from safetensors.torch import load_file, save, save_file

from nmke_patch.delta import TensorDelta, make_delta
from nmke_patch.errors import InvalidPatchError, PatchMismatchError
from nmke_patch.hub import build_pack
from nmke_patch.models import tensor_fingerprint
from nmke_patch.patch import (
    CARD_FILE,
    DELTAS_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    Manifest,
    ParentRef,
    Patch,
    check_patch_target,
    load_patch,
    serialize_deltas,
)
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack

Corruption = Callable[[Path], object]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- golden bytes ----------------------------------------------------------------------------------------

L0 = "model.layers.0.mlp.down_proj.weight"
L2 = "model.layers.2.mlp.down_proj.weight"
# Llama orientation: down_proj.weight is [d_model=3, d_ff=4]; neurons are columns (neuron_axis 1).
W0 = torch.tensor(
    [[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0], [0.5, 0.25, 0.125, 0.0625]], dtype=torch.bfloat16
)
W2 = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4).to(torch.bfloat16)
D0 = torch.tensor([[0.5, -0.5, 0.25], [1.0, 0.0, -0.125]])  # new-minus-old of neurons 1 and 3
D2 = torch.tensor([[0.25, 0.25, 0.25]])  # new-minus-old of neuron 0

GOLDEN_DELTAS_SHA256 = "2ace084fba67994a3ff21bef588750782e2466909ddfb82cbd9621615af1e3b5"
GOLDEN_MANIFEST_SHA256 = "59c1e4204eee34bbb6bfa9a426ad9ebf43038d476185a62f5abdcf2214516109"


def _bf16_bytes(values: list[float]) -> bytes:
    """Little-endian bfloat16 of exactly representable values: the high half of their float32."""
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def _fingerprint(dtype: str, shape: tuple[int, int], raw: bytes) -> str:
    return "sha256:" + _sha256(f"torch.{dtype}|{shape}|".encode() + raw)


def golden_patch() -> Patch:
    d0 = make_delta(L0, W0, 1, torch.tensor([1, 3]), D0, tensor_fingerprint(W0))
    d2 = make_delta(L2, W2, 1, torch.tensor([0]), D2, tensor_fingerprint(W2))
    manifest = Manifest(
        name="golden",
        base_model={
            "name_or_path": "tiny-llama",
            "revision": None,
            "architecture": "LlamaForCausalLM",
            "model_type": "llama",
        },
        method={"name": "manual", "config": {"layers": [0, 2]}},
        requests=[
            {
                "prompt": "{} is located in",
                "subject": "Zürich",
                "target_new": "Japan",
                "target_true": "Switzerland",
            }
        ],
        metrics=[{"index": 0, "p_new_before": 0.01, "p_new_after": 0.9}],
        parents=[ParentRef("older", "ab" * 32)],
        created_at="2026-01-01T00:00:00+00:00",
        tool_version="0.1.0",
        notes="golden test patch",
    )
    return Patch(manifest=manifest, deltas=(d0, d2))


def expected_deltas_bytes() -> bytes:
    """deltas.safetensors of the golden patch, assembled by hand from the spec and safetensors' layout."""
    f32 = lambda vals: struct.pack(f"<{len(vals)}f", *vals)  # noqa: E731
    i32 = lambda vals: struct.pack(f"<{len(vals)}i", *vals)  # noqa: E731
    # safetensors lays tensors out by dtype (widest alignment first), then by name
    parts = [
        (f"{L0}::delta", "F32", [2, 3], f32([0.5, -0.5, 0.25, 1.0, 0.0, -0.125])),
        (f"{L2}::delta", "F32", [1, 3], f32([0.25, 0.25, 0.25])),
        (f"{L0}::indices", "I32", [2], i32([1, 3])),
        (f"{L2}::indices", "I32", [1], i32([0])),
        (f"{L0}::original", "BF16", [2, 3], _bf16_bytes([2.0, -2.0, 0.25, 4.0, -4.0, 0.0625])),
        (f"{L2}::original", "BF16", [1, 3], _bf16_bytes([0.0, 1.0, 2.0])),
    ]
    header: dict[str, Any] = {"__metadata__": {"format": "nmke-patch/1"}}
    offset = 0
    for key, dtype, shape, raw in parts:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(raw for *_, raw in parts)


def expected_manifest(deltas_sha256: str) -> dict[str, Any]:
    fp0 = _fingerprint("bfloat16", (3, 4), _bf16_bytes([float(x) for x in W0.flatten().tolist()]))
    fp2 = _fingerprint("bfloat16", (3, 4), _bf16_bytes([i / 4 for i in range(12)]))
    return {
        "format": "nmke-patch",
        "format_version": 1,
        "tool_version": "0.1.0",
        "name": "golden",
        "created_at": "2026-01-01T00:00:00+00:00",
        "base_model": {
            "name_or_path": "tiny-llama",
            "revision": None,
            "architecture": "LlamaForCausalLM",
            "model_type": "llama",
        },
        "tensors": [
            {
                "name": L0,
                "shape": [3, 4],
                "neuron_axis": 1,
                "dtype": "bfloat16",
                "num_neurons": 2,
                "fingerprint": fp0,
            },
            {
                "name": L2,
                "shape": [3, 4],
                "neuron_axis": 1,
                "dtype": "bfloat16",
                "num_neurons": 1,
                "fingerprint": fp2,
            },
        ],
        "method": {"name": "manual", "config": {"layers": [0, 2]}},
        "requests": [
            {
                "prompt": "{} is located in",
                "subject": "Zürich",
                "target_new": "Japan",
                "target_true": "Switzerland",
            }
        ],
        "metrics": [{"index": 0, "p_new_before": 0.01, "p_new_after": 0.9}],
        "parents": [{"name": "older", "id": "ab" * 32}],
        "deltas_file": "deltas.safetensors",
        "deltas_sha256": deltas_sha256,
        "notes": "golden test patch",
    }


def test_golden_patch_tensors_are_neuron_major_rows() -> None:
    patch = golden_patch()
    d0, d2 = patch.deltas
    assert d0.indices.dtype == torch.int32 and d0.indices.tolist() == [1, 3]
    # row i is the value vector of neuron indices[i]: column indices[i] of the [d_model, d_ff] weight
    assert torch.equal(d0.original, W0[:, [1, 3]].t())
    assert torch.equal(d0.original.float(), torch.tensor([[2.0, -2.0, 0.25], [4.0, -4.0, 0.0625]]))
    assert d0.original.dtype == torch.bfloat16 and d0.delta.dtype == torch.float32
    assert torch.equal(d0.delta, D0) and torch.equal(d2.delta, D2)
    assert torch.equal(d2.original.float(), torch.tensor([[0.0, 1.0, 2.0]]))
    assert patch.nbytes == (2 + 1) * 4 + (6 + 3) * 4 + (6 + 3) * 2


def test_golden_bytes(tmp_path: Path) -> None:
    patch = golden_patch()
    saved = patch.save(tmp_path / "golden.nmke")
    root = tmp_path / "golden.nmke"
    assert sorted(p.name for p in root.iterdir()) == sorted([CARD_FILE, DELTAS_FILE, MANIFEST_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden.nmke"]  # no staging left behind

    deltas_bytes = (root / DELTAS_FILE).read_bytes()
    assert deltas_bytes == expected_deltas_bytes()
    assert _sha256(deltas_bytes) == GOLDEN_DELTAS_SHA256
    assert serialize_deltas(patch.deltas) == deltas_bytes
    assert patch.id == saved.id == GOLDEN_DELTAS_SHA256  # the patch id is the sha256 of deltas.safetensors

    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    expected = expected_manifest(GOLDEN_DELTAS_SHA256)
    assert json.loads(manifest_bytes) == expected
    assert list(json.loads(manifest_bytes)) == list(expected)  # key order is part of the bytes
    assert manifest_bytes == (json.dumps(expected, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    assert "Zürich".encode() in manifest_bytes  # UTF-8, not \u escapes
    assert _sha256(manifest_bytes) == GOLDEN_MANIFEST_SHA256

    # round trip: reading gives the same patch, and writing what was read gives the same bytes
    loaded = load_patch(root)
    assert loaded.id == GOLDEN_DELTAS_SHA256 and loaded.path == root
    assert loaded.manifest == saved.manifest
    assert_deltas_equal(loaded.deltas, patch.deltas)
    again = loaded.save(tmp_path / "again.nmke")
    assert (tmp_path / "again.nmke" / DELTAS_FILE).read_bytes() == deltas_bytes
    assert (tmp_path / "again.nmke" / MANIFEST_FILE).read_bytes() == manifest_bytes
    assert again.id == GOLDEN_DELTAS_SHA256


def assert_deltas_equal(got: tuple[TensorDelta, ...], want: tuple[TensorDelta, ...]) -> None:
    assert [d.name for d in got] == [d.name for d in want]
    for g, w in zip(got, want, strict=True):
        assert (g.shape, g.neuron_axis, g.fingerprint) == (w.shape, w.neuron_axis, w.fingerprint)
        for a, b in ((g.indices, w.indices), (g.delta, w.delta), (g.original, w.original)):
            assert a.dtype == b.dtype and torch.equal(a, b)


# -- round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_save_load_round_trip(arch: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = MODEL_FACTORIES[arch](dtype=dtype)
    parent = random_patch(model, name="parent", seed=1)
    patch = random_patch(model, name="child", layers=(0, 2, 3), neurons=9, seed=2, parents=(parent,))
    saved = patch.save(tmp_path / "child.nmke")
    loaded = load_patch(tmp_path / "child.nmke")
    data = (tmp_path / "child.nmke" / DELTAS_FILE).read_bytes()
    assert patch.id == saved.id == loaded.id == _sha256(data)
    assert loaded.manifest == patch.manifest
    assert loaded.parent_ids == [parent.id]
    assert_deltas_equal(loaded.deltas, patch.deltas)
    assert all(d.original.dtype == dtype for d in loaded.deltas)
    entries = json.loads((tmp_path / "child.nmke" / MANIFEST_FILE).read_text())["tensors"]
    assert [e["dtype"] for e in entries] == [str(dtype).removeprefix("torch.")] * 3
    # neuron-major rows whatever the orientation: [k, d_model]
    for d in loaded.deltas:
        assert tuple(d.delta.shape) == (9, 32) and d.shape[d.neuron_axis] == 48
    assert "# child" in (tmp_path / "child.nmke" / CARD_FILE).read_text()


def test_created_at_is_filled_in_when_empty(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model)
    blank = Patch(manifest=Manifest(name="blank", base_model={}, method={"name": "x"}), deltas=patch.deltas)
    saved = blank.save(tmp_path / "blank.nmke", card=False)
    assert saved.manifest.created_at.endswith("+00:00")
    assert load_patch(tmp_path / "blank.nmke").manifest.created_at == saved.manifest.created_at
    assert not (tmp_path / "blank.nmke" / CARD_FILE).exists()


def test_unknown_manifest_fields_warn_but_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = random_patch(MODEL_FACTORIES["llama"]()).save(tmp_path / "p.nmke").path
    assert root is not None
    _edit_manifest(root, lambda m: m.update(future_field={"x": 1}))
    with caplog.at_level(logging.WARNING, logger="nmke_patch.patch"):
        load_patch(root)
    # one log line (the CLI prints it as "WARNING nmke_patch.patch: ..."), not a UserWarning with source
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: ignoring unknown manifest fields ['future_field']"
    ]


def test_saved_files_and_directory_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        root = random_patch(MODEL_FACTORIES["llama"]()).save(tmp_path / "p.nmke").path
    finally:
        os.umask(old)
    assert root is not None
    assert root.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 used to stick to the patch directory
    assert {f.stat().st_mode & 0o777 for f in root.iterdir()} == {0o644}


def test_non_finite_numbers_are_never_written(tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"]())
    bad = replace(
        patch, manifest=replace(patch.manifest, metrics=[{"index": 0, "p_new_before": float("nan")}])
    )
    with pytest.raises(InvalidPatchError, match=r"p\.nmke: the manifest holds NaN or Infinity"):
        bad.save(tmp_path / "p.nmke")
    assert list(tmp_path.iterdir()) == []


def test_what_a_reader_would_refuse_is_never_written(tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"]())
    deep: list[Any] = []
    for _ in range(70):
        deep = [deep]
    cases = {
        "an integer of 71 digits": [{"x": 10**70}],
        "nested more than 64 levels deep": [{"x": deep}],
        "a lone surrogate": [{"x": "\ud800"}],
        "more than readers accept": [{"x": "a" * (64 << 20)}],
        "requests": {"not": "a list"},
    }
    for message, requests in cases.items():
        bad = replace(patch, manifest=replace(patch.manifest, requests=requests))
        with pytest.raises(InvalidPatchError, match=rf"p\.nmke: the manifest.*{message}"):
            bad.save(tmp_path / "p.nmke")
        assert list(tmp_path.iterdir()) == [], message
    for method in ({"name": "x", "lr": torch.tensor(1.0)}, {"name": "x", "where": Path("a")}):
        bad = replace(patch, manifest=replace(patch.manifest, method=method))
        with pytest.raises(InvalidPatchError, match=r"p\.nmke: the manifest holds a value JSON cannot hold"):
            bad.save(tmp_path / "p.nmke")
        assert list(tmp_path.iterdir()) == []


# -- the apply rule --------------------------------------------------------------------------------------


def test_apply_rule_is_one_float32_add_then_one_rounding() -> None:
    """bf16 1.0 + fp32 (2^-8 + 2^-16): one rounding gives 1 + 2^-7; rounding the delta to bf16 first gives 1.0."""
    model = MODEL_FACTORIES["llama"](dtype=torch.bfloat16)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = model.get_parameter(name)
    with torch.no_grad():
        weight[:, 5] = 1.0
    before = state_copy(model)
    delta = torch.zeros(1, 32)
    delta[0, 0] = 2.0**-8 + 2.0**-16
    patch = Patch(
        manifest=Manifest(name="rounding", base_model={}, method={"name": "manual"}),
        deltas=(make_delta(name, weight, 1, torch.tensor([5]), delta),),
    )
    stack = PatchStack.for_model(model)
    stack.apply(patch)
    assert weight[0, 5].item() == 1.0 + 2.0**-7  # not 1.0 (two roundings)
    assert torch.equal(weight[1:, 5], torch.ones(31, dtype=torch.bfloat16))  # + 0.0 leaves values as they are
    stack.unload(patch)
    assert_state_equal(model, before)


# -- atomic write ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["os.fsync", "nmke_patch.card.patch_card", "os.rename"], ids=["deltas", "card", "rename"]
)
def test_failed_write_leaves_no_patch(target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"]())
    seen: list[bool] = []

    def crash(*_: Any, **__: Any) -> Any:
        seen.append((tmp_path / "p.nmke").exists())  # what a reader would find at the moment of the crash
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(target, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        patch.save(tmp_path / "p.nmke")
    assert seen == [False]
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory


def test_failed_overwrite_keeps_the_old_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODEL_FACTORIES["llama"]()
    old = random_patch(model, name="old", seed=1).save(tmp_path / "p.nmke")
    with pytest.raises(FileExistsError):
        random_patch(model, name="new", seed=2).save(tmp_path / "p.nmke")
    seen: list[str] = []

    def crash(*_: Any, **__: Any) -> Any:
        seen.append(load_patch(tmp_path / "p.nmke").id)  # mid-write, the old patch is intact
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("nmke_patch.card.patch_card", crash)
    with pytest.raises(RuntimeError):
        random_patch(model, name="new", seed=2).save(tmp_path / "p.nmke", overwrite=True)
    monkeypatch.undo()
    assert seen == [old.id]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.nmke"]
    assert load_patch(tmp_path / "p.nmke").id == old.id
    new = random_patch(model, name="new", seed=2).save(tmp_path / "p.nmke", overwrite=True)
    assert load_patch(tmp_path / "p.nmke").id == new.id != old.id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.nmke"]


def test_failed_final_rename_on_overwrite_keeps_the_old_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MODEL_FACTORIES["llama"]()
    old = random_patch(model, name="old", seed=1).save(tmp_path / "p.nmke")
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".p.nmke.tmp-"):
            raise OSError("simulated rename failure")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        random_patch(model, name="new", seed=2).save(tmp_path / "p.nmke", overwrite=True)
    monkeypatch.undo()
    assert load_patch(tmp_path / "p.nmke").id == old.id


def test_a_write_removes_what_killed_writes_to_the_same_output_left(tmp_path: Path) -> None:
    """A killed save leaves its hidden staging folder (for `apply`, a whole model copy); the next write to that
    output removes it, and leaves a running process's, another machine's and a look-alike name alone."""
    import subprocess
    import sys

    from nmke_patch.paths import aside_name, remove_leftovers

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = int(done.stdout)  # a process that has ended
    mine = aside_name(".p.nmke.tmp")  # this process: running
    host, pid = mine.split("-")[-3], str(os.getpid())
    names = {
        "killed": mine.replace(f"-{pid}-", f"-{dead}-"),
        "killed backup": aside_name(".p.nmke.old").replace(f"-{pid}-", f"-{dead}-"),
        "running": mine,
        "another machine": mine.replace(f"-{host}-", "-elsewhere-").replace(f"-{pid}-", f"-{dead}-"),
        "another output": aside_name(".q.nmke.tmp").replace(f"-{pid}-", f"-{dead}-"),
        "not ours": f".p.nmke.tmp-{dead}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    model = MODEL_FACTORIES["llama"]()
    random_patch(model, name="a", seed=1).save(tmp_path / "p.nmke")
    assert not (tmp_path / names["killed"]).exists()
    assert (tmp_path / names["killed backup"]).exists()  # only a replace sweeps backups: the output existed
    random_patch(model, name="b", seed=2).save(tmp_path / "p.nmke", overwrite=True)
    assert not (tmp_path / names["killed backup"]).exists()
    left = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert left == {"running", "another machine", "another output", "not ours"}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["p.nmke"]
    stats = tmp_path / (aside_name(".c04").replace(f"-{pid}-", f"-{dead}-") + ".tmp")  # a statistics file
    stats.write_bytes(b"x")
    remove_leftovers(tmp_path, ".c04", suffix=".tmp")
    assert not stats.exists() and (tmp_path / names["running"]).exists()


# -- validation of untrusted files -----------------------------------------------------------------------

T1 = "model.layers.1.mlp.down_proj.weight"  # first tensor of the patch under test (tiny Llama: [32, 48])


def _manifest(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    return data


def _write_manifest(root: Path, data: Any) -> None:
    (root / MANIFEST_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    data = _manifest(root)
    edit(data)
    _write_manifest(root, data)


def _rehash(root: Path) -> None:
    sha = _sha256((root / DELTAS_FILE).read_bytes())
    _edit_manifest(root, lambda m: m.update(deltas_sha256=sha))


def set_field(key: str, value: Any) -> Corruption:
    return lambda root: _edit_manifest(root, lambda m: m.update({key: value}))


def drop_field(key: str) -> Corruption:
    return lambda root: _edit_manifest(root, lambda m: m.pop(key))


def set_entry(key: str, value: Any) -> Corruption:
    """Set a field of the first entry of the manifest's ``tensors``."""
    return lambda root: _edit_manifest(root, lambda m: m["tensors"][0].update({key: value}))


def manifest_text(raw: bytes) -> Corruption:
    return lambda root: (root / MANIFEST_FILE).write_bytes(raw)


def tensors(edit: Callable[[dict[str, torch.Tensor]], Any]) -> Corruption:
    """Rewrite deltas.safetensors with edited tensors and a matching manifest hash (passes the hash check)."""

    def corrupt(root: Path) -> None:
        data = load_file(root / DELTAS_FILE)
        edit(data)
        save_file(data, root / DELTAS_FILE, metadata={"format": "nmke-patch/1"})
        _rehash(root)

    return corrupt


def set_item(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda data: data.update({key: value})


def put(key: str, pos: tuple[int, ...], value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(data: dict[str, torch.Tensor]) -> None:
        data[key][pos] = value

    return edit


def truncate(root: Path) -> None:
    raw = (root / DELTAS_FILE).read_bytes()
    (root / DELTAS_FILE).write_bytes(raw[: len(raw) // 2])


def flip_last_byte(root: Path) -> None:
    raw = bytearray((root / DELTAS_FILE).read_bytes())
    raw[-1] ^= 0x01
    (root / DELTAS_FILE).write_bytes(bytes(raw))


def then_rehash(corrupt: Corruption) -> Corruption:
    def both(root: Path) -> None:
        corrupt(root)
        _rehash(root)

    return both


def break_header(root: Path) -> None:
    raw = bytearray((root / DELTAS_FILE).read_bytes())
    raw[8] = ord("[")  # the header JSON must be an object
    (root / DELTAS_FILE).write_bytes(bytes(raw))


def swap_first_indices(data: dict[str, torch.Tensor]) -> None:
    idx = data[f"{T1}::indices"]
    idx[[0, 1]] = idx[[1, 0]]


def duplicate_first_index(data: dict[str, torch.Tensor]) -> None:
    data[f"{T1}::indices"][1] = data[f"{T1}::indices"][0]


def unlink(name: str) -> Corruption:
    return lambda root: (root / name).unlink()


def dup_entry(root: Path) -> None:
    _edit_manifest(root, lambda m: m["tensors"].append(dict(m["tensors"][0])))


CASES: list[tuple[str, Corruption, str]] = [
    ("truncated", truncate, r"deltas\.safetensors does not match the manifest's sha256"),
    ("truncated-rehashed", then_rehash(truncate), r"deltas\.safetensors could not be read"),
    ("flipped-byte", flip_last_byte, r"does not match the manifest's sha256 \(file tampered"),
    ("broken-header-rehashed", then_rehash(break_header), r"could not be read"),
    ("manifest-hash-edited", set_field("deltas_sha256", "0" * 64), r"does not match the manifest's sha256"),
    ("manifest-hash-not-string", set_field("deltas_sha256", 7), r"'deltas_sha256' has the wrong type"),
    ("manifest-hash-missing", drop_field("deltas_sha256"), r"missing required field 'deltas_sha256'"),
    ("deltas-missing", unlink(DELTAS_FILE), r"deltas\.safetensors is missing"),
    ("manifest-missing", unlink(MANIFEST_FILE), r"manifest\.json is missing"),
    (
        "extra-tensor-key",
        tensors(set_item(f"{T1}::extra", torch.zeros(1))),
        r"tensors do not match the manifest \(unexpected \['model\.layers\.1\.mlp\.down_proj\.weight::extra'\], missing \[\]",
    ),
    (
        "missing-tensor-key",
        tensors(lambda d: d.pop(f"{T1}::original")),
        r"unexpected \[\], missing \['model\.layers\.1\.mlp\.down_proj\.weight::original'\]",
    ),
    (
        "delta-float16",
        tensors(lambda d: d.update({f"{T1}::delta": d[f"{T1}::delta"].half()})),
        r"'model\.layers\.1\.mlp\.down_proj\.weight': delta must be float32 of shape \[5, 32\]",
    ),
    (
        "original-wrong-dtype",
        tensors(lambda d: d.update({f"{T1}::original": d[f"{T1}::original"].bfloat16()})),
        r"original must be float32 of shape \[5, 32\]",
    ),
    (
        "indices-int64",
        tensors(lambda d: d.update({f"{T1}::indices": d[f"{T1}::indices"].long()})),
        r"indices must be int32 of length 5",
    ),
    (
        "index-out-of-range",
        tensors(put(f"{T1}::indices", (4,), 48)),
        r"neuron indices out of range \[0, 48\)",
    ),
    ("index-negative", tensors(put(f"{T1}::indices", (0,), -1)), r"neuron indices out of range \[0, 48\)"),
    ("indices-unsorted", tensors(swap_first_indices), r"neuron indices must be strictly ascending"),
    ("indices-duplicated", tensors(duplicate_first_index), r"neuron indices must be strictly ascending"),
    ("nan-delta", tensors(put(f"{T1}::delta", (0, 0), float("nan"))), r"non-finite values"),
    ("inf-original", tensors(put(f"{T1}::original", (2, 3), float("inf"))), r"non-finite values"),
    (
        "delta-wrong-shape",
        tensors(lambda d: d.update({f"{T1}::delta": d[f"{T1}::delta"][:, :-1].contiguous()})),
        r"delta must be float32 of shape \[5, 32\]",
    ),
    ("num-neurons-mismatch", set_entry("num_neurons", 4), r"indices must be int32 of length 4"),
    ("num-neurons-too-many", set_entry("num_neurons", 49), r"claims 49 neurons of 48"),
    ("format-version-2", set_field("format_version", 2), r"format version 2 is not supported.*upgrade"),
    (
        "format-version-string",
        set_field("format_version", "1"),
        r"'format_version' has the wrong type \(str\)",
    ),
    (
        "format-version-bool",
        set_field("format_version", True),
        r"'format_version' has the wrong type \(bool\)",
    ),
    ("format-missing", drop_field("format"), r"not an nmke-patch manifest \(format=None\)"),
    ("format-other", set_field("format", "safetensors"), r"not an nmke-patch manifest"),
    ("format-huge", set_field("format", "x" * 2_000_000), r"\(format='xxxx[x]*\.\.\.\)$"),
    (
        "name-huge",
        set_field("name", "n" * 5_000_000),
        r"the patch name is 5,000,000 characters long; at most 256$",
    ),
    ("not-json", manifest_text(b'{"format": "nmke-patch",'), r"manifest\.json is not valid JSON"),
    ("not-utf8", manifest_text(b"\xff\xfe{}"), r"manifest\.json is not valid JSON"),
    ("manifest-is-a-list", manifest_text(b"[]"), r"manifest\.json must hold a JSON object"),
    ("manifest-is-a-string", manifest_text(b'"nmke-patch"'), r"manifest\.json must hold a JSON object"),
    ("name-missing", drop_field("name"), r"missing required field 'name'"),
    ("tensors-not-a-list", set_field("tensors", {}), r"'tensors' has the wrong type \(dict\)"),
    ("requests-not-a-list", set_field("requests", "x"), r"'requests' must be a list of objects"),
    ("request-not-an-object", set_field("requests", ["x"]), r"'requests' must be a list of objects"),
    (
        "metric-index-not-int",
        set_field("metrics", [{"index": "0"}]),
        r"metrics\[0\]\.index must be an integer",
    ),
    ("deltas-file-renamed", set_field("deltas_file", "../x.safetensors"), r"deltas_file must be"),
    ("tensor-entry-not-object", set_field("tensors", [1]), r"each entry of 'tensors' must be an object"),
    ("shape-3d", set_entry("shape", [32, 48, 1]), r"invalid shape \[32, 48, 1\]"),
    ("shape-negative", set_entry("shape", [32, -48]), r"invalid shape"),
    ("neuron-axis-2", set_entry("neuron_axis", 2), r"neuron_axis 2, expected 0 or 1"),
    ("dtype-int8", set_entry("dtype", "int8"), r"unsupported dtype 'int8'"),
    ("fingerprint-not-string", set_entry("fingerprint", 5), r"fingerprint must be null or 'sha256:'"),
    ("fingerprint-malformed", set_entry("fingerprint", "md5:xx"), r"fingerprint must be null or 'sha256:'"),
    ("tensor-listed-twice", dup_entry, r"a tensor is listed twice"),
    ("parent-malformed", set_field("parents", [{"name": "p"}]), r"each parent must be an object"),
    (
        "shape-huge",  # export-peft used to allocate the declared [32, 10**12] weight's one-hot rows
        set_entry("shape", [32, 10**12]),
        r"declares shape \[32, 1000000000000\]: larger than any supported weight",
    ),
    ("shape-too-many-elements", set_entry("shape", [2**20, 2**20]), r"larger than any supported weight"),
    ("shape-not-a-list", set_entry("shape", "32x48"), r"invalid shape '32x48'"),
    (
        "tensor-name-missing",
        lambda root: _edit_manifest(root, lambda m: m["tensors"][0].pop("name")),
        r": tensors\[0\] is missing required field 'name'",
    ),
    (
        "fingerprint-missing",
        lambda root: _edit_manifest(root, lambda m: m["tensors"][1].pop("fingerprint")),
        r": tensors\[1\] \('model\.layers\.2\.mlp\.down_proj\.weight'\) is missing required field 'fingerprint'",
    ),
    (
        "deeply-nested",
        manifest_text(b"[" * 200_000),
        r"manifest\.json is not valid JSON \(nested more than 64 levels deep\)",
    ),
    (
        "huge-integer",
        manifest_text(b'{"format": "nmke-patch", "format_version": 1' + b"0" * 5000 + b"}"),
        r"manifest\.json is not valid JSON \(an integer of 5001 digits",
    ),
    (
        "duplicate-key",  # a reviewer would see one id and a loader use the other
        manifest_text(b'{"format": "nmke-patch", "format": "nmke-patch", "format_version": 1}'),
        r"manifest\.json is not valid JSON \(the key 'format' appears twice in one object\)",
    ),
    (
        "nan-anywhere",
        set_field("method", {"name": "x", "config": {"lr": float("nan")}}),
        r"manifest\.json is not valid JSON \(NaN is not a JSON number\)",
    ),
    (
        "metric-infinity",
        set_field("metrics", [{"index": 0, "p_new_before": float("inf")}]),
        r"not valid JSON \(Infinity is not a JSON number\)",
    ),
    (
        "method-name-number",
        set_field("method", {"name": 3}),
        r"method field 'name' has the wrong type \(int\)",
    ),
    (
        "metric-string",
        set_field("metrics", [{"index": 0, "p_new_before": "abc"}]),
        r"metrics\[0\]\.p_new_before must be a finite number or null",
    ),
    (
        "metric-list",
        set_field("metrics", [{"index": 0, "p_new_after": [1]}]),
        r"metrics\[0\]\.p_new_after must be a finite number or null",
    ),
]


@pytest.fixture
def llama() -> torch.nn.Module:
    return MODEL_FACTORIES["llama"]()


@pytest.mark.parametrize(("corrupt", "message"), [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_invalid_patch_refused_and_model_untouched(
    corrupt: Corruption, message: str, llama: torch.nn.Module, tmp_path: Path
) -> None:
    good = random_patch(llama, name="good", layers=(3,)).save(tmp_path / "good.nmke")
    bad = random_patch(llama, name="bad", layers=(1, 2)).save(tmp_path / "bad.nmke")
    assert good.path is not None and bad.path is not None
    assert load_patch(bad.path).id == bad.id  # valid before the corruption
    corrupt(bad.path)
    before = state_copy(llama)
    stack = PatchStack.for_model(llama)
    with pytest.raises(InvalidPatchError, match=message) as info:
        for patch in resolve_patches([good.path, bad.path]):  # every patch is validated before any apply
            stack.apply(patch)
    assert str(bad.path) in str(info.value)  # the message names the file
    assert stack.applied == []
    assert_state_equal(llama, before)


def test_not_a_patch_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidPatchError, match=r"not a patch directory"):
        load_patch(tmp_path / "missing.nmke")
    (tmp_path / "file.nmke").write_text("x")
    with pytest.raises(InvalidPatchError, match=r"not a patch directory"):
        load_patch(tmp_path / "file.nmke")
    from nmke_patch.hub import build_pack

    pack = build_pack([random_patch(MODEL_FACTORIES["llama"](), name="p")], tmp_path / "pack")
    with pytest.raises(InvalidPatchError, match=r"pack: an edit pack, not a patch: .*resolve_patches"):
        load_patch(pack)


# -- file-valid patches that do not fit the model ---------------------------------------------------------


def _fitting_then(model: torch.nn.Module, extra: TensorDelta, name: str) -> Patch:
    """A patch whose first tensor fits ``model`` and whose second is ``extra``."""
    fits = random_patch(model, name=name, layers=(1,))
    return Patch(manifest=fits.manifest, deltas=(*fits.deltas, extra))


def _saved_and_reloaded(patch: Patch, tmp_path: Path) -> Patch:
    saved = patch.save(tmp_path / f"{patch.name}.nmke")
    assert saved.path is not None
    return load_patch(saved.path)  # passes every file check


def test_wrong_model_refused_before_any_weight_changes(llama: torch.nn.Module, tmp_path: Path) -> None:
    other = MODEL_FACTORIES["llama"](seed=1)
    extra = random_patch(other, layers=(2,)).deltas[0]
    patch = _saved_and_reloaded(_fitting_then(llama, extra, "mixed"), tmp_path)
    before = state_copy(llama)
    stack = PatchStack.for_model(llama)
    with pytest.raises(
        PatchMismatchError, match=r"mixed.*model\.layers\.2\.mlp\.down_proj\.weight.*5 of 5.*differ"
    ):
        stack.apply(patch)
    assert stack.applied == []
    assert_state_equal(llama, before)


@pytest.mark.parametrize("force", [False, True])
def test_wrong_architecture_refused_even_with_force(force: bool, tmp_path: Path) -> None:
    gpt2 = MODEL_FACTORIES["gpt2"]()
    patch = _saved_and_reloaded(random_patch(MODEL_FACTORIES["llama"](), name="llama-patch"), tmp_path)
    before = state_copy(gpt2)
    with pytest.raises(PatchMismatchError, match=r"llama-patch.*not an editable MLP output projection"):
        PatchStack.for_model(gpt2).apply(patch, force=force)
    assert_state_equal(gpt2, before)


@pytest.mark.parametrize("force", [False, True])
def test_index_out_of_range_for_this_model_refused_even_with_force(
    force: bool, llama: torch.nn.Module, tmp_path: Path
) -> None:
    # valid as a file (index 60 < 96 neurons claimed by the manifest) but this model has only 48 neurons
    wide = TensorDelta(
        name="model.layers.2.mlp.down_proj.weight",
        shape=(32, 96),
        neuron_axis=1,
        indices=torch.tensor([5, 60], dtype=torch.int32),
        delta=torch.full((2, 32), 0.5),
        original=torch.zeros(2, 32),
    )
    patch = _saved_and_reloaded(_fitting_then(llama, wide, "wide"), tmp_path)
    before = state_copy(llama)
    stack = PatchStack.for_model(llama)
    with pytest.raises(
        PatchMismatchError, match=r"has shape \[32, 48\] in the model but \[32, 96\] in the patch"
    ):
        stack.apply(patch, force=force)
    assert stack.applied == []
    assert_state_equal(llama, before)


@pytest.mark.parametrize("force", [False, True])
def test_wrong_orientation_refused_even_with_force(
    force: bool, llama: torch.nn.Module, tmp_path: Path
) -> None:
    # same shape as the model's weight, but claims neurons on axis 0 (GPT-2's), which Llama does not use
    rows = TensorDelta(
        name="model.layers.2.mlp.down_proj.weight",
        shape=(32, 48),
        neuron_axis=0,
        indices=torch.tensor([3], dtype=torch.int32),
        delta=torch.full((1, 48), 0.5),
        original=torch.zeros(1, 48),
    )
    patch = _saved_and_reloaded(_fitting_then(llama, rows, "rows"), tmp_path)
    before = state_copy(llama)
    with pytest.raises(
        PatchMismatchError, match=r"says neuron axis 0, but llama models keep neurons on axis 1"
    ):
        PatchStack.for_model(llama).apply(patch, force=force)
    assert_state_equal(llama, before)


# -- packs -----------------------------------------------------------------------------------------------


def test_local_pack_is_verified_like_a_pulled_one(llama: torch.nn.Module, tmp_path: Path) -> None:
    a = random_patch(llama, name="a", seed=1).save(tmp_path / "a.nmke")
    b = random_patch(llama, name="b", seed=2).save(tmp_path / "b.nmke")
    pack = build_pack([b, a], tmp_path / "pack")
    assert [p.id for p in resolve_patches([pack])] == [b.id, a.id]
    good = json.loads((pack / "pack.json").read_text())
    cases = {
        "outside": (
            {**good, "patches": [{**good["patches"][0], "path": "../a.nmke"}]},
            "not a plain relative",
        ),
        "empty": ({**good, "patches": []}, "must list at least one patch"),
        "swapped ids": (
            {
                **good,
                "patches": [
                    {**e, "id": o["id"]} for e, o in zip(good["patches"], good["patches"][::-1], strict=True)
                ],
            },
            "the pack was modified",
        ),
        "no format": ({"patches": good["patches"]}, "not an nmke-patch pack"),
        "string entries": (
            {**good, "patches": [e["path"] for e in good["patches"]]},
            "entry must be an object",
        ),
        "wrong name": (
            {**good, "patches": [{**good["patches"][0], "name": "other"}, good["patches"][1]]},
            "pack.json calls it 'other'",
        ),
        "version 1.0": ({**good, "format_version": 1.0}, r"pack format version 1\.0 is not supported"),
    }
    for data, message in cases.values():
        (pack / "pack.json").write_text(json.dumps(data))
        with pytest.raises(InvalidPatchError, match=message):
            resolve_patches([pack])

    for text, reason in [
        ("{", "Expecting property name"),
        ("[" * 200_000, "nested more than 64 levels deep"),
        ('{"format": "nmke-pack", "format_version": 1' + "0" * 5000 + "}", "an integer of 5001 digits"),
    ]:
        (pack / "pack.json").write_text(text)
        with pytest.raises(InvalidPatchError, match=rf"pack\.json is not valid JSON \({reason}"):
            resolve_patches([pack])


def _with_state_keys(root: Path, keys: list[str]) -> None:
    """Replace the saved patch's state.safetensors by ``keys`` (float32 [1, 48]) with a matching hash."""
    raw = save({k: torch.zeros(1, 48) for k in keys})
    (root / STATE_FILE).write_bytes(raw)
    _edit_manifest(root, lambda m: m.update(state_sha256=_sha256(raw)))


@pytest.mark.parametrize(
    "key", ["keys.\u00b2", "keys.\u0661", "keys.01", "keys.10000", "keys.-1", "keys", "cum.1"]
)
def test_state_keys_must_be_plain_layer_numbers(key: str, llama: torch.nn.Module, tmp_path: Path) -> None:
    """``str.isdigit`` accepted ``keys.²`` and ``create --on`` then died in ``int()``."""
    saved = replace(random_patch(llama), state={"keys.1": torch.zeros(1, 48)}).save(tmp_path / "p.nmke")
    assert saved.path is not None
    _with_state_keys(saved.path, ["keys.1", "contrast.1", "keys.0", key])
    with pytest.raises(
        InvalidPatchError, match=rf"p\.nmke: unexpected tensor {re.escape(repr(key))} in state"
    ):
        load_patch(saved.path)
    _with_state_keys(saved.path, ["keys.1", "contrast.1", "keys.0", "keys.9999"])
    assert sorted(load_patch(saved.path).state) == ["contrast.1", "keys.0", "keys.1", "keys.9999"]


def test_fingerprint_may_be_null_but_not_missing(llama: torch.nn.Module, tmp_path: Path) -> None:
    root = random_patch(llama).save(tmp_path / "p.nmke").path
    assert root is not None
    _edit_manifest(root, lambda m: m["tensors"][0].update(fingerprint=None))
    assert load_patch(root).deltas[0].fingerprint is None


# -- regressions of fixed bugs ----------------------------------------------------------------------------


def test_make_delta_keeps_rows_with_their_neurons() -> None:
    weight = torch.zeros(2, 4)
    d = make_delta("w", weight, 1, torch.tensor([3, 1]), torch.tensor([[30.0, 30.0], [10.0, 10.0]]))
    assert d.indices.tolist() == [1, 3]
    assert d.delta.tolist() == [[10.0, 10.0], [30.0, 30.0]]


def _broken(patch: Patch, how: str) -> Patch:
    """``patch`` built in memory with one rule of the format broken."""
    d = patch.deltas[0]
    if how == "tensor-twice":
        return replace(patch, deltas=patch.deltas + patch.deltas[:1], id="")
    if how == "nan-delta":
        delta = d.delta.clone()
        delta[0, 0] = float("nan")
        return replace(patch, deltas=(replace(d, delta=delta), *patch.deltas[1:]), id="")
    if how == "unsorted":
        return replace(patch, deltas=(replace(d, indices=d.indices.flip(0)), *patch.deltas[1:]), id="")
    if how == "out-of-range":
        indices = d.indices.clone()
        indices[-1] = d.shape[d.neuron_axis]
        return replace(patch, deltas=(replace(d, indices=indices), *patch.deltas[1:]), id="")
    raise AssertionError(how)


BROKEN = {
    "tensor-twice": "listed twice",
    "nan-delta": "non-finite",
    "unsorted": "strictly ascending",
    "out-of-range": "out of range",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_what_load_refuses_is_neither_saved_nor_applied(how: str, tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    bad = _broken(random_patch(model), how)
    with pytest.raises(InvalidPatchError, match=BROKEN[how]):
        bad.save(tmp_path / "bad.nmke")
    assert not list(tmp_path.iterdir())  # nothing written, no staging folder left
    before = state_copy(model)
    with pytest.raises(InvalidPatchError, match=BROKEN[how]):
        PatchStack.for_model(model).apply(bad)
    assert_state_equal(model, before)
    assert not PatchStack.for_model(model).applied


def test_a_patch_that_names_itself_or_a_parent_twice_is_refused(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    parent = random_patch(model, name="parent")
    twice = replace(
        random_patch(model, name="child", seed=1),
        manifest=replace(
            random_patch(model).manifest,
            parents=[ParentRef(parent.name, parent.id), ParentRef(parent.name, parent.id)],
        ),
    )
    with pytest.raises(InvalidPatchError, match="parent is listed twice"):
        twice.save(tmp_path / "twice.nmke")
    saved = random_patch(model, name="self").save(tmp_path / "self.nmke")
    manifest = json.loads((saved.path / "manifest.json").read_text())
    manifest["parents"] = [{"name": "self", "id": saved.id}]
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidPatchError, match="lists itself as a parent"):
        load_patch(saved.path)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where nothing can be created")
def test_a_place_nothing_can_be_written_in_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"^/proc/x\.nmke: cannot write in /proc \(.+\); choose another place$"):
        check_patch_target(Path("/proc/x.nmke"))
    check_patch_target(tmp_path / "new" / "x.nmke")  # a folder that will be created in a writable one
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_a_writer_that_finds_its_output_filled_meanwhile_leaves_it_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes writing one -o at once: the check at the start passed for both; the later one used to
    move the first one's output aside and delete it, and both said they had written it."""
    from nmke_patch import pack as pack_module
    from nmke_patch.hub import build_pack
    from nmke_patch.paths import move_into_place

    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    (staging / "new").write_text("mine")
    target.mkdir()
    (target / "theirs").write_text("theirs")
    with pytest.raises(FileExistsError, match="written by something else while this ran"):
        move_into_place(staging, target, replace=False)
    assert [f.name for f in target.iterdir()] == ["theirs"]
    empty = tmp_path / "empty"
    empty.mkdir()
    move_into_place(staging, empty, replace=False)  # an empty folder is what the check allowed
    assert [f.name for f in empty.iterdir()] == ["new"]

    patch = random_patch(MODEL_FACTORIES["llama"](), name="p")
    lay_out = pack_module._lay_out_pack

    def meanwhile(*args: Any, **kwargs: Any) -> None:
        lay_out(*args, **kwargs)
        monkeypatch.setattr(pack_module, "_lay_out_pack", lay_out)
        build_pack([patch], tmp_path / "pack")  # another process, finishing first

    monkeypatch.setattr(pack_module, "_lay_out_pack", meanwhile)
    with pytest.raises(FileExistsError, match="written by something else"):
        build_pack([patch], tmp_path / "pack")
    assert (tmp_path / "pack" / "pack.json").is_file()  # the first one's pack, whole

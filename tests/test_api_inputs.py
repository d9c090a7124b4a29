"""The Python API takes patches the way users hold them (a Patch, a folder path as str or Path, one or a list)
and refuses anything else with a clear error, before it changes anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_state_equal, random_patch, save_tiny, state_copy
from transformers import PreTrainedTokenizerFast

import nmke_patch
from nmke_patch.errors import ExportError, InvalidPatchError, InvalidRequestError, PatchNotAppliedError
from nmke_patch.evaluate import footprint
from nmke_patch.export.peft import export_peft
from nmke_patch.hub import build_pack
from nmke_patch.patch import Patch, load_patch
from nmke_patch.sources import resolve_patches
from nmke_patch.stack import PatchStack


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Patch, Patch]:
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, name="a", layers=(1,)).save(tmp_path / "a.nmke")
    b = random_patch(model, name="b", layers=(2,), seed=1).save(tmp_path / "b.nmke")
    return model, a, b


def test_stack_takes_a_path_or_a_patch(saved: tuple[torch.nn.Module, Patch, Patch]) -> None:
    model, a, b = saved
    before = state_copy(model)
    stack = PatchStack.for_model(model)
    assert stack.check(str(a.path)) == []
    stack.apply(str(a.path))
    stack.apply(b.path)
    assert [p.id for p in stack.applied] == [a.id, b.id]
    stack.unload(b.id[:12])  # the short id every message shows
    stack.unload_all()
    assert_state_equal(model, before)
    with pytest.raises(TypeError, match="not int"):
        stack.apply(3)  # type: ignore[arg-type]
    for several in ([a, b], [], None):  # one patch at a time, said so (was a bare os.fspath error)
        with pytest.raises(TypeError, match=r"expected one patch .*apply several one by one"):
            stack.apply(several)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"expected one patch"):
            stack.check(several)  # type: ignore[arg-type]
    assert not stack.applied


def test_stack_refuses_a_pack_of_several_and_an_ambiguous_name(
    saved: tuple[torch.nn.Module, Patch, Patch], tmp_path: Path
) -> None:
    model, a, b = saved
    pack = build_pack([a.path, b.path], tmp_path / "pack")  # paths are taken here too
    stack = PatchStack.for_model(model)
    with pytest.raises(InvalidRequestError, match="holds 2 patches where one is expected"):
        stack.apply(pack)
    twin = random_patch(model, name="a", layers=(3,), seed=2)  # another patch named "a"
    stack.apply(a)
    stack.apply(twin)
    with pytest.raises(PatchNotAppliedError, match="names 2 applied patches"):
        stack.unload("a")
    stack.unload(twin.id)
    assert [p.id for p in stack.applied] == [a.id]
    stack.unload_all()


def test_sources_refuse_what_is_not_a_patch() -> None:
    assert resolve_patches(None) == []
    with pytest.raises(TypeError, match="not bytes"):
        resolve_patches(b"a.nmke")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not int"):
        resolve_patches([1])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="empty path"):
        resolve_patches([""])
    with pytest.raises(InvalidPatchError, match="empty patch path"):
        load_patch("")


def test_load_model_with_patches_none(
    saved: tuple[torch.nn.Module, Patch, Patch], tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    model, a, _ = saved
    folder = save_tiny(model, tiny_tokenizer, tmp_path / "model")
    loaded, _ = nmke_patch.load_model(folder, patches=None)
    assert not PatchStack.for_model(loaded).applied
    loaded, _ = nmke_patch.load_model(folder, patches=a.path)
    assert [p.id for p in PatchStack.for_model(loaded).applied] == [a.id]


def test_export_and_footprint_take_paths(saved: tuple[torch.nn.Module, Patch, Patch], tmp_path: Path) -> None:
    _, a, b = saved
    one = export_peft(a.path, tmp_path / "one")
    two = export_peft([str(a.path), b], tmp_path / "two")
    assert one.modules != two.modules and len(two.modules) == 2
    assert footprint([a.path, b])["union_neurons"] == a.num_neurons + b.num_neurons
    for one_alone in (a, a.path, str(a.path)):  # one patch alone, not the characters of its path
        assert footprint(one_alone) == footprint([a])
    assert footprint(a.deltas[0])["union_neurons"] == len(a.deltas[0].indices)
    with pytest.raises(TypeError, match="None is not a patch"):
        footprint([a, None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="None is not a patch"):
        footprint(None)  # type: ignore[arg-type]


def test_a_loaded_patch_changed_in_memory_is_checked_again(
    saved: tuple[torch.nn.Module, Patch, Patch],
) -> None:
    model, a, _ = saved
    before = state_copy(model)
    bad = a.deltas[0]
    nan = bad.delta.clone()
    nan[0, 0] = float("nan")
    changed = dataclasses.replace(a, deltas=(dataclasses.replace(bad, delta=nan), *a.deltas[1:]))
    assert changed.path == a.path  # replace keeps the path of the file it was loaded from
    stack = PatchStack.for_model(model)
    with pytest.raises(InvalidPatchError, match="non-finite"):
        stack.apply(changed)
    with pytest.raises(InvalidPatchError, match="non-finite"):
        stack.adopt([changed])
    assert_state_equal(model, before)
    assert not stack.applied


@pytest.mark.parametrize("rank", [True, 2.5, "3", 0])
def test_export_refuses_a_rank_that_is_not_a_positive_integer(
    saved: tuple[torch.nn.Module, Patch, Patch], tmp_path: Path, rank: object
) -> None:
    with pytest.raises(ExportError, match="rank must be an integer >= 1"):
        export_peft([saved[1]], tmp_path / "out", rank=rank)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_file_a_patch_or_a_model_as_its_folder(
    saved: tuple[torch.nn.Module, Patch, Patch], tmp_path: Path
) -> None:
    _, a, b = saved
    file = tmp_path / "facts.json"
    file.write_text("[]")
    for out, named in ((file, "is a file"), (b.path, "holds manifest.json")):
        assert out is not None
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        with pytest.raises(ExportError, match=named):
            export_peft([a], out)
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def test_misused_api_arguments_are_named_not_failed_deep_inside(tmp_path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from nmke_patch import PatchStack, load_model
    from nmke_patch.errors import InvalidRequestError, UnsupportedArchitectureError
    from nmke_patch.requests import as_requests
    from nmke_patch.sources import resolve_patches

    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(TypeError, match=r"takes a model directory, a Hub id or None, not LlamaForCausalLM"):
        load_model(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"applied in order: give a list, not a dict"):
        resolve_patches({"a.nmke": 1})  # type: ignore[arg-type]
    with pytest.raises(
        InvalidRequestError, match=r"no such facts file \(a prompt\? give one record as a dict"
    ):
        as_requests("The capital of {} is")
    with pytest.raises(UnsupportedArchitectureError, match=r"wrapped in DataParallel: .*model\.module"):
        PatchStack.for_model(torch.nn.DataParallel(model))
    wrapped = get_peft_model(MODEL_FACTORIES["llama"](), LoraConfig(target_modules=["down_proj"], r=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"a PEFT model: apply patches to the base model"):
        PatchStack.for_model(wrapped)

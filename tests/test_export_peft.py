"""export_peft: LoRA/SHiRA adapters load with plain PeftModel and reproduce the PatchStack-patched model.

Tolerances (fp32, CPU):
- Merged weights (``merge_and_unload``) of one patch, or of stacked patches touching disjoint neurons, are
  ``torch.equal`` to the patched weights: ``B @ A`` with one-hot ``A`` reproduces every delta entry exactly
  (one non-zero product per sum), scaling is ``k / k = 1.0``, and the merge is one fp32 add, the same
  rounding as :func:`nmke_patch.delta.add_delta` (also bit-exact on bf16/fp16 bases: PEFT adds the fp32
  delta and rounds once).
- Where stacked patches overlap, the export holds ``d1 + d2`` (one rounding) and merging gives
  ``W + (d1 + d2)`` while the stack computes ``(W + d1) + d2``: they may differ by rounding, bounded
  here by 2 ulp of ``|W| + |d1| + |d2|`` (measured: at most 3e-8 absolute on the tiny models).
- Unmerged LoRA forward computes ``W x + B (A x)`` instead of ``(W + D) x``: logits agree to
  ``LOGITS_ATOL`` (measured ~1e-7 on the tiny models; 4.4e-5 on the 30-layer default model, whose logits
  reach ~33, hence ``DEFAULT_MODEL_LOGITS_ATOL``). SHiRA's unmerged forward builds ``W + D`` itself
  and gives bit-identical logits for one patch.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import MODEL_FACTORIES, random_patch, save_tiny
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save
from typer.testing import CliRunner

from nmke_patch.architectures import spec_for_model
from nmke_patch.delta import scatter_neurons
from nmke_patch.errors import ExportError, InvalidPatchError, PatchMismatchError
from nmke_patch.export.peft import CONFIG_FILE, WEIGHTS_FILE, export_peft
from nmke_patch.patch import Patch, load_patch
from nmke_patch.stack import PatchStack

LOGITS_ATOL = 1e-5
DEFAULT_MODEL_LOGITS_ATOL = 2e-4  # 30 layers, logits up to ~33: LoRA measured 4.4e-5, SHiRA 0
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def patched_copy(arch: str, patches: list[Patch]) -> torch.nn.Module:
    model = MODEL_FACTORIES[arch]()
    stack = PatchStack.for_model(model)
    for p in patches:
        stack.apply(p)
    return model


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids).logits


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS_FILE)


def ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def dense(patch: Patch, name: str) -> torch.Tensor:
    """The patch's delta for weight ``name`` as a full tensor (zeros elsewhere)."""
    d = next(d for d in patch.deltas if d.name == name)
    out = torch.zeros(d.shape)
    scatter_neurons(out, d.neuron_axis, d.indices, d.delta)
    return out


def assert_state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_lora_export_is_exact(arch: str, tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES[arch](), neurons=7, layers=(1, 3))
    ref = patched_copy(arch, [patch])
    report = export_peft([patch], tmp_path / "adapter")
    assert report.exact and report.format == "lora" and report.rank == 7
    spec = spec_for_model(ref)
    modules = [spec.weight_name(i).removesuffix(".weight") for i in (1, 3)]
    assert list(report.modules) == modules and report.ranks == dict.fromkeys(modules, 7)
    assert report.adapter_bytes == (tmp_path / "adapter" / WEIGHTS_FILE).stat().st_size

    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == modules
    assert config["rank_pattern"] == config["alpha_pattern"] == dict.fromkeys(modules, 7)
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["base_model_name_or_path"] == "tiny"

    # key names and shapes mirror what PEFT itself saves for the same config
    real = get_peft_model(
        MODEL_FACTORIES[arch](),
        LoraConfig(
            r=7, lora_alpha=7, target_modules=modules, fan_in_fan_out=arch == "gpt2", init_lora_weights=False
        ),
    )
    real.save_pretrained(tmp_path / "real")
    ours, theirs = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tmp_path / "real")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model), logits(ref), rtol=0, atol=LOGITS_ATOL)
    merged = peft_model.merge_and_unload()
    assert_state_equal(merged, ref)
    assert torch.equal(logits(merged), logits(ref))


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_more_neurons_than_residual_width_export_at_that_rank_exactly(arch: str, tmp_path: Path) -> None:
    """A module touched on k > d_model neurons (a lifetime patch) is exported as A = delta, B = identity:
    rank d_model instead of k, still bit-exact after merging."""
    base = MODEL_FACTORIES[arch]()
    spec = spec_for_model(base)
    d_model = base.config.hidden_size
    patch = random_patch(base, neurons=40, layers=(1, 2))  # of 48 neurons, residual width 32
    ref = patched_copy(arch, [patch])
    report = export_peft([patch], tmp_path / "a")
    assert report.exact and report.rank == d_model and set(report.ranks.values()) == {d_model}
    tensors = adapter_tensors(tmp_path / "a")
    for d in patch.deltas:
        prefix = f"base_model.model.{d.name.removesuffix('.weight')}"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        assert a.shape == (d_model, d.shape[spec.neuron_axis]) and torch.equal(b, torch.eye(d_model))
        assert torch.equal(a[:, d.indices.long()], d.delta.t())
    one_hot_bytes = 2 * 40 * (48 + d_model) * 4  # what the rank-k form would have stored
    assert report.adapter_bytes < one_hot_bytes
    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "a")
    torch.testing.assert_close(logits(peft_model), logits(ref), rtol=0, atol=LOGITS_ATOL)
    assert_state_equal(peft_model.merge_and_unload(), ref)

    kept = export_peft([patch], tmp_path / "b", rank=d_model)  # the exact rank: nothing cut
    assert kept.relative_error == 0.0 and kept.exact and kept.rank == d_model
    cut = export_peft([patch], tmp_path / "c", rank=d_model - 1)  # below it: truncated, error reported
    assert cut.relative_error is not None and cut.relative_error > 0 and cut.rank == d_model - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("arch", "fmt"), [("llama", "lora"), ("llama", "shira"), ("gpt2", "lora")])
def test_merge_is_exact_in_half_precision(arch: str, fmt: str, dtype: torch.dtype, tmp_path: Path) -> None:
    factory = MODEL_FACTORIES[arch]
    ref = factory(dtype=dtype)
    patch = random_patch(ref, neurons=7)
    PatchStack.for_model(ref).apply(patch)
    export_peft([patch], tmp_path, fmt=fmt)  # type: ignore[arg-type]
    merged = PeftModel.from_pretrained(factory(dtype=dtype), tmp_path).merge_and_unload()
    assert_state_equal(merged, ref)  # PEFT adds the fp32 delta with one rounding, like add_delta


def test_shira_export_is_exact(tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES["llama"](), neurons=7, layers=(0, 2))
    ref = patched_copy("llama", [patch])
    report = export_peft([patch], tmp_path, fmt="shira")
    tensors = adapter_tensors(tmp_path)
    d_model, d_ff = 32, 48
    assert report.rank == -(-7 * d_model // (d_model + d_ff))  # ceil: fits 7 * 32 values
    for module in report.modules:
        idx = tensors[f"base_model.model.{module}.shira_indices"]
        val = tensors[f"base_model.model.{module}.shira_weight"]
        assert idx.dtype == torch.int32 and idx.shape == (2, report.rank * (d_model + d_ff))
        assert val.shape == (idx.shape[1],) and int((val != 0).sum()) <= 7 * d_model
        assert len(set(map(tuple, idx.t().tolist()))) == idx.shape[1]  # padding at distinct free positions
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["peft_type"] == "SHIRA"

    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path)
    assert torch.equal(logits(peft_model), logits(ref))
    assert_state_equal(peft_model.merge_and_unload(), ref)


@pytest.mark.parametrize(("arch", "fmt"), [("llama", "lora"), ("llama", "shira"), ("gpt2", "lora")])
def test_stacked_overlapping_patches(arch: str, fmt: str, tmp_path: Path) -> None:
    base = MODEL_FACTORIES[arch]()
    a = random_patch(base, seed=1, name="a", indices=[0, 1, 2, 3, 4], layers=(1, 2))
    b = random_patch(base, seed=2, name="b", indices=[3, 4, 5, 6], layers=(2, 3))
    ref = patched_copy(arch, [a, b])
    report = export_peft([a, b], tmp_path, fmt=fmt)  # type: ignore[arg-type]
    assert len(report.modules) == 3
    assert report.shared_neurons == {report.modules[1]: 2} and not report.exact  # neurons 3, 4 of layer 2
    if fmt == "lora":
        assert [report.ranks[m] for m in report.modules] == [5, 7, 4]  # layer 2: union of 0..6

    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(peft_model), logits(ref), rtol=0, atol=LOGITS_ATOL)
    merged = peft_model.merge_and_unload().state_dict()
    spec = spec_for_model(ref)
    for name, want in ref.state_dict().items():
        got = merged[name]
        if name != spec.weight_name(2):
            assert torch.equal(got, want), name
            continue
        overlap = torch.zeros(want.shape[spec.neuron_axis], dtype=torch.bool)
        overlap[[3, 4]] = True
        shape = [1, 1]
        shape[spec.neuron_axis] = -1
        mask = overlap.view(shape).expand_as(want)
        assert torch.equal(got[~mask], want[~mask])
        # both sides round twice; the error is bounded by the largest intermediate |W| + |d1| + |d2|
        scale = base.state_dict()[name].abs() + dense(a, name).abs() + dense(b, name).abs()
        assert bool(((got - want).abs() <= 2 * ulp(scale)).all())


def test_shira_refused_on_conv1d(tmp_path: Path) -> None:
    patch = random_patch(MODEL_FACTORIES["gpt2"]())
    with pytest.raises(ExportError, match=r"nn\.Linear"):
        export_peft([patch], tmp_path, fmt="shira")
    assert not (tmp_path / CONFIG_FILE).exists()


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_lossy_rank_reports_error_and_loads(arch: str, tmp_path: Path) -> None:
    base = MODEL_FACTORIES[arch]()
    patch = random_patch(base, neurons=9, layers=(1, 2))
    report = export_peft([patch], tmp_path, rank=3)
    assert report.relative_error is not None and 0 < report.relative_error < 1
    assert set(report.ranks.values()) == {3} and report.rank == 3
    assert all(0 < e < 1 for e in report.module_errors.values())

    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    merged = peft_model.merge_and_unload().state_dict()
    spec = spec_for_model(base)
    residual = norm = 0.0
    for d in patch.deltas:
        changed = merged[d.name].double() - base.state_dict()[d.name].double()
        values = changed.index_select(spec.neuron_axis, d.indices.long())
        if spec.neuron_axis == 1:
            values = values.t()
        assert not changed.index_fill_(spec.neuron_axis, d.indices.long(), 0).any()  # only touched neurons
        residual += float((values - d.delta.double()).square().sum())
        norm += float(d.delta.double().square().sum())
    assert (residual / norm) ** 0.5 == pytest.approx(report.relative_error, abs=1e-5)

    exact = export_peft([patch], tmp_path / "full", rank=64)  # rank >= k: one-hot form, no loss
    assert exact.relative_error == 0.0 and set(exact.ranks.values()) == {9} and exact.exact  # nothing cut


def test_refuses_mixed_bases_and_bad_arguments(tmp_path: Path) -> None:
    llama = random_patch(MODEL_FACTORIES["llama"](), name="l")
    gpt2 = random_patch(MODEL_FACTORIES["gpt2"](), name="g")
    with pytest.raises(ExportError, match="different architectures"):
        export_peft([llama, gpt2], tmp_path)
    second = random_patch(MODEL_FACTORIES["llama"](), name="l2", seed=1)
    other = replace(
        second,
        manifest=replace(second.manifest, base_model={**second.manifest.base_model, "name_or_path": "x"}),
    )
    with pytest.raises(PatchMismatchError, match="given twice"):
        export_peft([llama, llama], tmp_path)
    with pytest.raises(ExportError, match="different base models"):
        export_peft([llama, other], tmp_path)
    with pytest.raises(ExportError, match="lora exports only"):
        export_peft([llama], tmp_path, fmt="shira", rank=2)
    with pytest.raises(ExportError, match="rank must be"):
        export_peft([llama], tmp_path, rank=0)
    dense_patch = random_patch(MODEL_FACTORIES["llama"](), neurons=48)  # every neuron: too dense for SHiRA
    with pytest.raises(ExportError, match="too dense for SHiRA"):
        export_peft([dense_patch], tmp_path, fmt="shira")
    with pytest.raises(ExportError, match="no patches"):
        export_peft([], tmp_path)


def _on_base(patch: Patch, name_or_path: str) -> Patch:
    return replace(
        patch,
        manifest=replace(
            patch.manifest, base_model={**patch.manifest.base_model, "name_or_path": name_or_path}
        ),
    )


def test_base_paths_compare_normalised_and_base_model_asserts(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    a = _on_base(random_patch(model, seed=1, name="a", layers=(1,)), "llama-fp32")
    b = _on_base(random_patch(model, seed=2, name="b", layers=(2,)), "./llama-fp32/")
    assert export_peft([a, b], tmp_path / "ab").warnings == ()  # one local model, typed two ways
    c = _on_base(b, "other-model")
    with pytest.raises(
        ExportError, match=r"different base models \(name_or_path 'llama-fp32' vs 'other-model'"
    ):
        export_peft([a, c], tmp_path / "ac")
    report = export_peft([a, c], tmp_path / "ac", base_model_name_or_path="org/base")
    assert len(report.warnings) == 1 and "'other-model'" in report.warnings[0]
    assert "'org/base'" in report.warnings[0]
    assert json.loads((tmp_path / "ac" / CONFIG_FILE).read_text())["base_model_name_or_path"] == "org/base"
    gpt2 = random_patch(MODEL_FACTORIES["gpt2"](), name="g")
    with pytest.raises(ExportError, match="different architectures"):  # not something a name can assert
        export_peft([a, gpt2], tmp_path / "ag", base_model_name_or_path="org/base")


def test_refuses_a_child_before_or_without_its_parent(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, seed=1, name="a")
    b = random_patch(model, seed=2, name="b", parents=(a,))
    with pytest.raises(PatchMismatchError, match=r"made on top of a \(not given\)"):
        export_peft([b], tmp_path / "out")
    with pytest.raises(PatchMismatchError, match=r"made on top of a \(listed after it\)"):
        export_peft([b, a], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export_peft([a, b], tmp_path / "out").modules


def test_exact_only_where_no_neuron_is_shared(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, seed=1, name="a", indices=[0, 1, 2])
    disjoint = random_patch(model, seed=2, name="d", indices=[3, 4])
    shared = random_patch(model, seed=3, name="s", indices=[2, 3])
    report = export_peft([a, disjoint], tmp_path / "ad")
    assert report.exact and report.shared_neurons == {}
    report = export_peft([a, shared], tmp_path / "as")
    assert not report.exact and report.relative_error is None
    assert set(report.shared_neurons.values()) == {1} and len(report.shared_neurons) == 2


def _declaring(patch: Patch, shape: tuple[int, int], index: int = 0) -> Patch:
    """``patch`` with tensor ``index`` claiming weight ``shape`` (its neurons and payload unchanged)."""
    deltas = list(patch.deltas)
    deltas[index] = replace(deltas[index], shape=shape)
    return replace(patch, deltas=tuple(deltas))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((32, 10**12), r"declares shape \[32, 1000000000000\]: larger than any supported weight"),
        ((32, 25_000_000), r"larger than any supported weight"),  # was a 100 MB adapter from 1.8 KB
        ((32, 1_000_000), r"1000000 neurons for a residual width of 32, more than 64x"),
    ],
)
def test_refuses_shapes_no_weight_has_before_allocating(
    shape: tuple[int, int], message: str, tmp_path: Path
) -> None:
    patch = _declaring(random_patch(MODEL_FACTORIES["llama"](), neurons=1), shape)
    with pytest.raises(InvalidPatchError, match=message):
        export_peft([patch], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _filled(patch: Patch, value: float, path: Path) -> Patch:
    """``patch`` with every delta entry ``value`` (finite), saved and loaded back as a stranger's would be."""
    deltas = tuple(replace(d, delta=torch.full_like(d.delta, value)) for d in patch.deltas)
    return load_patch(replace(patch, deltas=deltas, id="").save(path).path)


def test_refuses_deltas_beyond_float32_instead_of_writing_infinities(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    a = _filled(random_patch(model, name="a", indices=[3, 7], layers=(1,)), 2e38, tmp_path / "a.nmke")
    b = _filled(random_patch(model, name="b", indices=[3, 7], layers=(1,)), 1.9e38, tmp_path / "b.nmke")
    with pytest.raises(ExportError, match="summed per neuron are beyond the range of float32"):
        export_peft([a, b], tmp_path / "ab")  # each is finite, their sum is not
    wide = _filled(random_patch(model, name="wide", neurons=5, layers=(1,)), 2e38, tmp_path / "w.nmke")
    with pytest.raises(ExportError, match="rank-1 factors of its delta are beyond the range of float32"):
        export_peft([wide], tmp_path / "r1", rank=1)  # B = u * s: 2e38 * sqrt(5 * 32) / sqrt(32) > 3.4e38
    half = MODEL_FACTORIES["llama"](dtype=torch.float16)
    big = _filled(random_patch(model, name="big", layers=(1,)), 1e5, tmp_path / "big.nmke")
    with pytest.raises(ExportError, match=r"beyond the range of torch.float16"):
        export_peft([big], tmp_path / "half", model=half)  # fine in fp32, overflows an fp16 base
    assert not any((tmp_path / n).exists() for n in ("ab", "r1", "half"))
    export_peft([big], tmp_path / "fp32", model=model)  # the same patch on an fp32 base is exported
    with pytest.raises(PatchMismatchError, match="beyond the range"):  # as the stack refuses it on fp16
        PatchStack.for_model(half).apply(big)


def test_refuses_contradicting_widths_and_checks_against_the_model(tmp_path: Path) -> None:
    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model)
    wider = _declaring(patch, (64, 48), index=1)  # one tensor claims another residual width than the other
    with pytest.raises(InvalidPatchError, match=r"residual width of 64 where other tensors have 32"):
        export_peft([wider], tmp_path / "out")
    # one tensor claims a far wider MLP than the other: SHiRA would pad it to the densest module's rank
    for fmt in ("lora", "shira"):
        with pytest.raises(InvalidPatchError, match=r"declares 1536 neurons where other tensors have 48"):
            export_peft([_declaring(patch, (32, 1536), index=1)], tmp_path / "out", fmt=fmt)
    grown = _declaring(patch, (32, 96))  # credible on its own; only the model can tell
    with pytest.raises(
        PatchMismatchError, match=r"declares shape \[32, 96\] but the base model has shape \[32, 48\]"
    ):
        export_peft([grown], tmp_path / "out", model=model)
    assert not (tmp_path / "out").exists()
    assert export_peft([patch], tmp_path / "out", model=model).exact


def test_adapter_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        report = export_peft([random_patch(MODEL_FACTORIES["llama"]())], tmp_path / "out")
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in report.path.iterdir()} == {
        CONFIG_FILE: 0o644,
        WEIGHTS_FILE: 0o644,  # safetensors' save_file made it 0600
    }


def test_cli_export_peft(tmp_path: Path) -> None:
    from nmke_patch.cli.main import app

    llama = random_patch(MODEL_FACTORIES["llama"](), name="l").save(tmp_path / "l.nmke")
    gpt2 = random_patch(MODEL_FACTORIES["gpt2"](), name="g").save(tmp_path / "g.nmke")
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", str(llama.path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "2 modules, rank 5" in result.output and "exact" in result.output
    assert (tmp_path / "a" / CONFIG_FILE).is_file()
    result = runner.invoke(app, ["export-peft", str(llama.path), "-o", str(tmp_path / "b"), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "lossy" in result.output and "relative Frobenius error" in result.output
    result = runner.invoke(app, ["export-peft", str(llama.path), "-o", str(tmp_path / "d"), "--rank", "999"])
    assert (
        result.exit_code == 0 and "lossy" not in result.output
    )  # a rank above the 5 neurons truncates nothing
    assert "not truncated" in result.output and "capped at 5" in " ".join(result.output.split())
    assert "exact: merge_and_unload() reproduces" in result.output
    result = runner.invoke(
        app, ["export-peft", str(gpt2.path), "-o", str(tmp_path / "c"), "--format", "shira"]
    )
    assert isinstance(result.exception, ExportError)


def test_cli_export_peft_lineage_sharing_and_base_model(tmp_path: Path) -> None:
    from nmke_patch.cli.main import app

    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, seed=1, name="a", indices=[0, 1, 2]).save(tmp_path / "a.nmke")
    b = random_patch(model, seed=2, name="b", indices=[2, 3], parents=(a,)).save(tmp_path / "b.nmke")
    c = _on_base(random_patch(model, seed=3, name="c", indices=[9]), "./tiny/").save(tmp_path / "c.nmke")
    other = _on_base(random_patch(model, seed=4, name="o", indices=[9]), "elsewhere").save(
        tmp_path / "o.nmke"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", str(b.path), "-o", str(tmp_path / "b")])
    assert isinstance(result.exception, PatchMismatchError) and not (tmp_path / "b").exists()
    result = runner.invoke(app, ["export-peft", str(a.path), str(b.path), "-o", str(tmp_path / "ab")])
    assert result.exit_code == 0, result.output
    assert "exact:" not in result.output and "within rounding where patches share neurons" in " ".join(
        result.output.split()
    )
    result = runner.invoke(app, ["export-peft", str(a.path), str(c.path), "-o", str(tmp_path / "ac")])
    assert result.exit_code == 0, result.output  # 'tiny' and './tiny/' are one path
    assert "exact: merge_and_unload() reproduces" in result.output and "warning" not in result.output
    args = ["export-peft", str(a.path), str(other.path), "-o", str(tmp_path / "ao")]
    assert isinstance(runner.invoke(app, args).exception, ExportError)
    result = runner.invoke(app, [*args, "--base-model", "org/tiny"])
    assert result.exit_code == 0, result.output
    assert "warning: patches a" in result.output and "'elsewhere'" in result.output


@pytest.mark.default_model
def test_default_model_export(tmp_path: Path) -> None:
    from nmke_patch.models import load_base

    model, tok, info = load_base()
    base = copy.deepcopy(model)
    spec = spec_for_model(model)
    layers = tuple(spec.default_layers(model.config.num_hidden_layers))
    patch = random_patch(model, layers=layers, neurons=100, scale=0.02)
    patch = replace(patch, manifest=replace(patch.manifest, base_model=info.to_json()))
    PatchStack.for_model(model).apply(patch)
    ids = tok(
        ["The capital of France is", "The official language of Brazil is"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        want = model(**ids).logits

    for fmt in ("lora", "shira"):
        report = export_peft([patch], tmp_path / fmt, fmt=fmt)  # type: ignore[arg-type]
        assert report.exact and len(report.modules) == len(layers)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / fmt)
        with torch.no_grad():
            got = peft_model(**ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=DEFAULT_MODEL_LOGITS_ATOL)
        merged = peft_model.merge_and_unload()
        assert_state_equal(merged, model)
        with torch.no_grad():
            assert torch.equal(merged(**ids).logits, want)


def test_cli_export_peft_checks_the_patches_against_a_model(tmp_path: Path, tiny_tokenizer) -> None:
    """PEFT cannot tell a wrong base; `--model` checks the fit as `verify` does, before writing."""
    from nmke_patch.cli.main import app

    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model, name="p").save(tmp_path / "p.nmke")
    fits = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    other = save_tiny(MODEL_FACTORIES["llama"](seed=1), tiny_tokenizer, tmp_path / "other")
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", str(patch.path), "-m", str(fits), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"ok 1 patch(es) fit {fits}" in " ".join(result.output.split()) and "exact" in result.output
    result = runner.invoke(app, ["export-peft", str(patch.path), "-m", str(other), "-o", str(tmp_path / "b")])
    assert isinstance(result.exception, PatchMismatchError) and "p (" in str(result.exception)
    assert not (tmp_path / "b").exists()


def test_cli_export_peft_check_uses_the_default_model_without_model(
    tmp_path: Path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--check` alone checks the fit on the embedded default model (here a stand-in for it)."""
    from nmke_patch.cli.main import app

    from nmke_patch import models

    model = MODEL_FACTORIES["llama"]()
    patch = random_patch(model, name="p").save(tmp_path / "p.nmke")
    other = save_tiny(MODEL_FACTORIES["llama"](seed=1), tiny_tokenizer, tmp_path / "other")
    monkeypatch.setattr(models, "default_model_dir", lambda: other)
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", str(patch.path), "--check", "-o", str(tmp_path / "b")])
    assert isinstance(result.exception, PatchMismatchError) and "p (" in str(result.exception)
    assert not (tmp_path / "b").exists()
    fits = save_tiny(model, tiny_tokenizer, tmp_path / "base")
    monkeypatch.setattr(models, "default_model_dir", lambda: fits)
    result = runner.invoke(app, ["export-peft", str(patch.path), "--check", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "ok 1 patch(es) fit the embedded default model" in " ".join(result.output.split())


def test_adapter_bytes_do_not_depend_on_the_order_safetensors_wrote_metadata_in() -> None:
    """safetensors writes metadata in hash-map order, different between processes: a pack pushed again
    with --with-peft made a new commit about half the time."""
    import json as _json

    from safetensors.torch import load

    from nmke_patch.export.peft import _stable_metadata

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}

    def written(metadata_order: list[tuple[str, str]]) -> bytes:
        data = save(tensors, metadata={"format": "pt"})
        size = int.from_bytes(data[:8], "little")
        header = _json.loads(data[8 : 8 + size])
        header["__metadata__"] = dict(metadata_order)
        text = _json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + data[8 + size :]

    one = written([("format", "pt"), ("nmke_patches", "[]")])
    other = written([("nmke_patches", "[]"), ("format", "pt")])
    assert one != other and _stable_metadata(one) == _stable_metadata(other)
    assert torch.equal(load(_stable_metadata(other))["w"], tensors["w"])


def test_an_interrupted_export_leaves_nothing_that_blocks_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed export used to leave OUT with a lone temp file, and the rerun was refused as not empty."""
    from nmke_patch.export import peft as peft_module

    patch = random_patch(MODEL_FACTORIES["llama"](), name="p")

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_module, "move_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        export_peft([patch], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no staging folder beside it
    monkeypatch.undo()
    assert export_peft([patch], tmp_path / "out").exact

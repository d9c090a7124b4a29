"""Export patches as PEFT adapters (LoRA or SHiRA) that load with plain ``PeftModel.from_pretrained``.

A neuron-masked delta touching ``k`` neurons of an MLP output projection is exactly a rank-``k`` LoRA:
``lora_A`` holds ``k`` one-hot rows selecting those neurons (input features), ``lora_B`` holds the ``k``
value-vector changes as columns, and ``r = lora_alpha = k`` gives scaling 1. Where ``k`` exceeds the
residual width ``d`` (a lifetime patch touches most neurons), the rank-``d`` form is smaller: ``lora_A``
holds the delta itself and ``lora_B`` the identity. Either way ``B @ A`` reproduces the delta bit for bit
(one non-zero product per sum), so ``merge_and_unload()`` gives the same fp32 weights as applying the
patch (within rounding where stacked patches share a neuron: their deltas are summed before the merge
adds them). SHiRA
stores the same entries as a sparse (index, value) list. ``rank`` asks for a smaller, lossy LoRA
(truncated SVD per module). See ``docs/peft.md``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save
from torch import nn

from ..architectures import ArchitectureSpec, spec_for_model_type
from ..delta import TensorDelta, add_delta, all_finite, finite_where, gather_neurons
from ..errors import ExportError, InvalidPatchError, PatchMismatchError
from ..patch import Patch, base_model_differences, check_shape
from ..paths import move_into_place, staging_dir
from ..sources import PatchSource, resolve_patches
from ..stack import check_lineage

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_BASE_KEYS = ("name_or_path", "revision", "architecture", "model_type")
MAX_FF_RATIO = 64
"""Most MLP neurons per residual dimension a credible weight has (real models: 2.7 to 8)."""

PeftFormat = Literal["lora", "shira"]


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_peft` wrote.

    Attributes:
        path: the adapter directory.
        format: ``"lora"`` or ``"shira"``.
        modules: target module names, e.g. ``model.layers.4.mlp.down_proj``.
        ranks: rank per module (LoRA: neurons touched or, if fewer, the residual width; or the truncated
            rank; SHiRA: the common ``r``).
        rank: the config's ``r`` (LoRA: the largest per-module rank).
        adapter_bytes: size of ``adapter_model.safetensors``.
        relative_error: for a lossy (``rank``) export, ``||approx - delta||_F / ||delta||_F`` over all
            modules together; ``None`` for full-rank exports.
        module_errors: the same per module (lossy exports only).
        shared_neurons: per module, the neurons that more than one patch touches (only modules with
            some); there the adapter holds the summed delta, and merging it is within n ulp of
            stacking n patches.
        warnings: base-model differences accepted because ``base_model_name_or_path`` was given.
    """

    path: Path
    format: str
    modules: tuple[str, ...]
    ranks: dict[str, int]
    rank: int
    adapter_bytes: int
    relative_error: float | None = None
    module_errors: dict[str, float] = field(default_factory=dict)
    shared_neurons: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """Whether ``merge_and_unload()`` gives weights ``torch.equal`` to applying the patches in order."""
        return not self.relative_error and not self.shared_neurons  # None (full rank) or 0 (nothing cut)


@dataclass(frozen=True)
class _Composed:
    """The summed delta of all patches for one weight."""

    module: str
    d_ff: int
    d_model: int
    indices: torch.Tensor  # long [k], ascending
    delta: torch.Tensor  # float32 [k, d_model]
    shared: int  # neurons touched by more than one patch (their delta is a sum, rounded once)


def _check_same_base(patches: Sequence[Patch], asserted: str | None) -> tuple[dict[str, Any], list[str]]:
    """The first patch's base model, after refusing patches of other architectures, or (unless the caller
    ``asserted`` a base model) of another ``name_or_path`` or revision; those are then warnings."""
    first = patches[0]
    base = first.manifest.base_model
    warnings: list[str] = []
    for p in patches[1:]:
        other = p.manifest.base_model
        for key in base_model_differences(first, p):
            if key in ("model_type", "architecture"):
                raise ExportError(
                    f"patches {first.describe()} and {p.describe()} are for different architectures "
                    f"({base.get(key)!r} vs {other.get(key)!r}); export patches of one base model together"
                )
            differ = (
                f"patches {first.describe()} and {p.describe()} were made on different base models "
                f"({key} {base.get(key)!r} vs {other.get(key)!r})"
            )
            if not asserted:
                raise ExportError(
                    f"{differ}; export patches of one base model together, or name that model with "
                    "--base-model (base_model_name_or_path) if it is one model"
                )
            warnings.append(f"{differ}; exported for the given base model {asserted!r}, as asked")
    if not isinstance(base.get("model_type"), str):
        raise ExportError(f"patch {first.describe()} does not record its base model's model_type")
    return base, warnings


def _check_shapes(patches: Sequence[Patch], spec: ArchitectureSpec, model: nn.Module | None) -> None:
    """Refuse, before anything is allocated, a declared shape that no real weight has: out of bounds, an MLP
    more than :data:`MAX_FF_RATIO` times wider than its residual stream, residual or MLP widths that differ
    between tensors, payloads that do not match it, or (given ``model``) another shape than the model's."""
    params = dict(model.named_parameters()) if model is not None else {}
    d_model: int | None = None
    neurons: int | None = None
    for p in patches:
        for d in p.deltas:
            what = f"patch {p.describe()}: tensor {d.name!r}"
            shape = check_shape(tuple(d.shape), what)
            axis = d.neuron_axis if d.neuron_axis in (0, 1) else spec.neuron_axis  # else _compose refuses
            d_ff, width = shape[axis], shape[1 - axis]
            if d_ff > MAX_FF_RATIO * width:
                raise InvalidPatchError(
                    f"{what} declares shape {list(shape)}: {d_ff} neurons for a residual width of {width}, more"
                    f" than {MAX_FF_RATIO}x; no real MLP has that shape (the manifest's shape is not credible)"
                )
            if d_model is not None and width != d_model:
                raise InvalidPatchError(
                    f"{what} declares a residual width of {width} where other tensors have {d_model}; the"
                    " patches' shapes contradict each other"
                )
            if neurons is not None and d_ff != neurons:  # every MLP of a supported model is as wide
                raise InvalidPatchError(  # (and SHiRA pads every module to the densest: no blow-up)
                    f"{what} declares {d_ff} neurons where other tensors have {neurons}; the patches' shapes"
                    " contradict each other"
                )
            d_model, neurons = width, d_ff
            if tuple(d.delta.shape) != (d.num_neurons, width):
                raise InvalidPatchError(f"{what}: delta must have shape [{d.num_neurons}, {width}]")
            param = params.get(d.name)
            if model is not None and (param is None or tuple(param.shape) != shape):
                found = "no such parameter" if param is None else f"shape {list(param.shape)}"
                raise PatchMismatchError(
                    f"{what} declares shape {list(shape)} but the base model has {found}; the patch is not for"
                    " this model"
                )


def _compose(patches: Sequence[Patch], model_type: str) -> list[_Composed]:
    """Sum the deltas of ``patches`` per weight, in patch order (overlapping neurons add up)."""
    spec = spec_for_model_type(model_type)
    suffix = f".{spec.mlp_out}.weight"
    by_name: dict[str, list[TensorDelta]] = {}
    for p in patches:
        for d in p.deltas:
            if not d.name.endswith(suffix) or d.neuron_axis != spec.neuron_axis:
                raise ExportError(
                    f"patch {p.describe()}: tensor {d.name!r} (neuron axis {d.neuron_axis}) is not a "
                    f"{model_type} MLP output projection ({suffix[1:]}, neuron axis {spec.neuron_axis})"
                )
            group = by_name.setdefault(d.name, [])
            if group and group[0].shape != d.shape:
                raise ExportError(
                    f"tensor {d.name!r} has shape {list(group[0].shape)} in one patch and {list(d.shape)} in "
                    f"{p.describe()}; the patches are for different models"
                )
            group.append(d)
    composed = []
    for name, group in by_name.items():
        union, counts = torch.unique(
            torch.cat([d.indices.to(torch.long) for d in group]), sorted=True, return_counts=True
        )
        if not union.numel():
            continue
        d_model = group[0].value_dim
        acc = torch.zeros(union.numel(), d_model, dtype=torch.float32)
        for d in group:
            pos = torch.searchsorted(union, d.indices.to(torch.long))
            acc[pos] = acc[pos] + d.delta.to(torch.float32)
        if not all_finite(acc):
            raise ExportError(
                f"tensor {name!r}: the patches' deltas summed per neuron are beyond the range of float32 "
                "(the patch stack refuses to apply them in this order too); nothing was exported"
            )
        composed.append(
            _Composed(
                module=name.removesuffix(".weight"),
                d_ff=int(group[0].shape[spec.neuron_axis]),
                d_model=d_model,
                indices=union,
                delta=acc,
                shared=int((counts > 1).sum()),
            )
        )
    if not composed:
        raise ExportError("the patches change no weights; nothing to export")
    return composed


def _one_hot(indices: torch.Tensor, d_ff: int) -> torch.Tensor:
    a = torch.zeros(indices.numel(), d_ff, dtype=torch.float32)
    a[torch.arange(indices.numel()), indices] = 1.0
    return a


def _exact_factors(c: _Composed) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors whose product is ``c``'s delta bit for bit, of rank ``min(k, d_model)``: one-hot ``A``
    and the value vectors as ``B``, or (more neurons than residual dimensions) the delta as ``A`` and the
    identity as ``B``, the smaller of the two."""
    if c.indices.numel() <= c.d_model:
        return _one_hot(c.indices, c.d_ff), c.delta.t().contiguous()
    a = torch.zeros(c.d_model, c.d_ff, dtype=torch.float32)
    a[:, c.indices] = c.delta.t()
    return a, torch.eye(c.d_model, dtype=torch.float32)


def _truncated(c: _Composed, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``rank`` LoRA factors of ``c`` by SVD, with squared residual and squared norm (float64)."""
    m = c.delta.t().to(torch.float64)  # [d_model, k]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, int(s.numel()))
    b = (u[:, :r] * s[:r]).to(torch.float32).contiguous()
    a_small = vh[:r].to(torch.float32)
    if not all_finite(b):
        raise ExportError(
            f"{c.module}: the rank-{r} factors of its delta are beyond the range of float32; export it at "
            "full rank (without --rank)"
        )
    residual = float(((b.double() @ a_small.double()) - m).square().sum())
    a = torch.zeros(r, c.d_ff, dtype=torch.float32)
    a[:, c.indices] = a_small
    return a, b, residual, float(m.square().sum())


def _check_merge_finite(composed: list[_Composed], spec: ArchitectureSpec, model: nn.Module) -> None:
    """Refuse deltas that would make a finite weight of ``model`` non-finite when merged (``W + delta``
    in the weight's dtype, as PEFT merges and as the stack refuses to apply)."""
    params = dict(model.named_parameters())
    for c in composed:
        weight = params[f"{c.module}.weight"].detach()
        if weight.device.type == "meta":
            continue
        old = gather_neurons(weight, spec.neuron_axis, c.indices)
        if not finite_where(add_delta(old, c.delta), old):
            raise ExportError(
                f"{c.module}: merged into the model, the patches' deltas give values beyond the range of "
                f"{weight.dtype} (the patch stack refuses to apply them too); nothing was exported"
            )


def _lora(
    composed: list[_Composed], rank: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float], float | None]:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    total_residual = total_norm = 0.0
    for c in composed:
        if rank is None or rank >= min(int(c.indices.numel()), c.d_model):
            a, b = _exact_factors(c)
            residual, norm = 0.0, float(c.delta.double().square().sum())
        else:
            a, b, residual, norm = _truncated(c, rank)
        tensors[f"{_PREFIX}{c.module}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{c.module}.lora_B.weight"] = b
        ranks[c.module] = int(a.shape[0])
        if rank is not None:
            errors[c.module] = math.sqrt(residual / norm) if norm > 0 else 0.0
            total_residual += residual
            total_norm += norm
    overall = None
    if rank is not None:
        overall = math.sqrt(total_residual / total_norm) if total_norm > 0 else 0.0
    return tensors, ranks, errors, overall


def _shira(composed: list[_Composed]) -> tuple[dict[str, torch.Tensor], int]:
    """SHiRA values and indices; one ``r`` for all modules, padded with zeros at untouched positions."""
    r = 1
    for c in composed:
        r = max(r, math.ceil(c.indices.numel() * c.d_model / (c.d_ff + c.d_model)))
    tensors: dict[str, torch.Tensor] = {}
    for c in composed:
        n = r * (c.d_ff + c.d_model)
        if n > c.d_ff * c.d_model:
            raise ExportError(
                f"{c.module}: SHiRA needs r*(in+out) <= in*out, but r={r} (set by the densest module) gives "
                f"{n} > {c.d_ff * c.d_model} entries; too dense for SHiRA, export as lora instead"
            )
        k = int(c.indices.numel())
        out_idx = torch.arange(c.d_model).repeat(k)
        in_idx = c.indices.repeat_interleave(c.d_model)
        pad = n - k * c.d_model
        free = torch.ones(c.d_ff, dtype=torch.bool)
        free[c.indices] = False
        pos = torch.arange(pad)
        pad_in = torch.nonzero(free).flatten()[pos // c.d_model]
        pad_out = pos % c.d_model
        indices = torch.stack([torch.cat([out_idx, pad_out]), torch.cat([in_idx, pad_in])])
        values = torch.cat([c.delta.reshape(-1), torch.zeros(pad, dtype=torch.float32)])
        tensors[f"{_PREFIX}{c.module}.shira_indices"] = indices.to(torch.int32).contiguous()
        tensors[f"{_PREFIX}{c.module}.shira_weight"] = values.contiguous()
    return tensors, r


def _check_adapter_dir(out: Path) -> None:
    """Refuse an output that is a file, a patch or a pack: an adapter folder is new or holds an adapter."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; export into a new folder or an adapter folder")
    for file in ("manifest.json", "pack.json", "config.json"):
        if (out / file).is_file():
            raise ExportError(
                f"{out} holds {file} (a patch, a pack or a model), not an adapter; export into a new folder"
            )


def _stable_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's ``__metadata__`` keys in sorted order. safetensors writes them
    in hash-map order, which differs between processes: the same adapter would get other bytes, and a pack
    pushed again with ``--with-peft`` a new commit. Tensor offsets are relative to the data, so they hold."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def _write(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], provenance: str) -> int:
    """Write the adapter. A new ``out`` is written beside it and renamed into place whole (an interrupted
    export leaves nothing; another process's folder there meanwhile is left alone); into an existing
    adapter folder each file is written aside and renamed over the old one."""
    # written from Python so the file gets the umask's permissions (safetensors' save_file makes 0600)
    payload = _stable_metadata(save(tensors, metadata={"format": "pt", "nmke_patches": provenance}))
    text = json.dumps(config, indent=2) + "\n"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(out)
        try:
            (staging / WEIGHTS_FILE).write_bytes(payload)
            (staging / CONFIG_FILE).write_text(text, encoding="utf-8")
            move_into_place(staging, out, replace=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return len(payload)
    weights, cfg = out / WEIGHTS_FILE, out / CONFIG_FILE
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # two exports into one folder never share a file
    tmp_weights, tmp_cfg = out / f".{WEIGHTS_FILE}.{tag}.tmp", out / f".{CONFIG_FILE}.{tag}.tmp"
    try:
        tmp_weights.write_bytes(payload)
        tmp_cfg.write_text(text, encoding="utf-8")
        os.replace(tmp_weights, weights)
        os.replace(tmp_cfg, cfg)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_cfg.unlink(missing_ok=True)
    return len(payload)


def export_peft(
    patches: Iterable[PatchSource] | PatchSource,
    out_dir: str | os.PathLike[str],
    *,
    fmt: PeftFormat = "lora",
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    model: nn.Module | None = None,
) -> ExportReport:
    """Write the composed effect of ``patches`` (deltas summed per weight, in order) as a PEFT adapter.

    Args:
        patches: patches of one base model (``Patch`` objects, patch or pack folders, ``hf://`` references,
            or one of them alone), in the order they would be applied.
        out_dir: adapter directory (created; ``adapter_config.json`` and ``adapter_model.safetensors``
            in it are replaced).
        fmt: ``"lora"`` (exact, any architecture) or ``"shira"`` (exact, ``nn.Linear`` models only).
        rank: LoRA only: truncate each module's delta to rank ``rank`` by SVD where that is below
            ``min(k, d_model)``, its exact rank (lossy; the error is reported).
        base_model_name_or_path: recorded in the config; default: the patches' base model. Giving it also
            asserts that the patches share that base: a ``name_or_path`` or revision that differs between
            them is then a warning in the report instead of an error (architectures must still match).
        model: the base model (a ``meta``-device copy will do); when given, every tensor's declared shape
            must equal its parameter's. Without it the shapes are still checked for credibility.

    Raises:
        PatchMismatchError: a patch listed before, or without, a patch it was made on top of (checked
            first), or a declared shape that differs from ``model``'s parameter.
        ExportError: mixed base models or architectures, SHiRA on a Conv1D model, a bad ``rank``, deltas
            (summed, truncated, or merged into ``model``) beyond the range of the weights' dtype.
        InvalidPatchError: a declared shape no real weight has (checked before anything is allocated).
    """
    if fmt not in ("lora", "shira"):
        raise ExportError(f"unknown PEFT format {fmt!r}; use 'lora' or 'shira'")
    if rank is not None and (
        fmt != "lora" or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
    ):
        raise ExportError(
            "rank applies to lora exports only"
            if fmt != "lora"
            else f"rank must be an integer >= 1, got {rank!r}"
        )
    _check_adapter_dir(Path(out_dir))
    patches = resolve_patches(patches)
    if not patches:
        raise ExportError("no patches to export")
    check_lineage(patches)
    base, warnings = _check_same_base(patches, base_model_name_or_path or None)
    model_type = base["model_type"]
    spec = spec_for_model_type(model_type)
    if fmt == "shira" and spec.module_kind != "linear":
        raise ExportError(
            f"SHiRA supports nn.Linear layers only; {model_type} keeps its MLP output projection in a "
            f"{spec.module_kind} module; export as lora instead"
        )
    _check_shapes(patches, spec, model)
    composed = _compose(patches, model_type)
    if model is not None:
        _check_merge_finite(composed, spec, model)
    modules = [c.module for c in composed]
    config: dict[str, Any] = {
        "peft_type": fmt.upper(),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or base.get("name_or_path"),
        "revision": None if base_model_name_or_path else base.get("revision"),
        "inference_mode": True,
        "target_modules": modules,
        "fan_in_fan_out": spec.module_kind == "conv1d",
    }
    errors: dict[str, float] = {}
    overall: float | None = None
    if fmt == "lora":
        tensors, ranks, errors, overall = _lora(composed, rank)
        r = max(ranks.values())
        config.update(
            r=r,
            lora_alpha=r,
            rank_pattern=dict(ranks),
            alpha_pattern=dict(ranks),
            lora_dropout=0.0,
            bias="none",
            use_rslora=False,
            use_dora=False,
            init_lora_weights=True,
        )
    else:
        tensors, r = _shira(composed)
        ranks = dict.fromkeys(modules, r)
        config.update(r=r, mask_type="random", random_seed=None, init_weights=True)
    provenance = json.dumps([{"name": p.name, "id": p.id} for p in patches])
    out = Path(out_dir)
    size = _write(out, config, tensors, provenance)
    return ExportReport(
        path=out,
        format=fmt,
        modules=tuple(modules),
        ranks=ranks,
        rank=r,
        adapter_bytes=size,
        relative_error=overall,
        module_errors=errors,
        shared_neurons={c.module: c.shared for c in composed if c.shared},
        warnings=tuple(warnings),
    )

"""Architecture table: where the edited MLP output projection lives and how it is oriented.

Architecture knowledge is data (``_data/architectures.json``), keyed by ``config.model_type``; nothing
here guesses orientation from tensor shapes. To support a new architecture, add an entry to that file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where NMKE's edited weights live in one model family."""

    model_type: str
    layers: str
    """Dotted path (from the model) of the list of decoder layers."""
    mlp_out: str
    """Dotted path (from one decoder layer) of the MLP output projection."""
    mlp_norm: str
    """Dotted path (from one decoder layer) of the norm in front of the MLP; its input is the residual
    stream after attention."""
    final_norm: str
    final_norm_kind: Literal["rmsnorm", "layernorm"]
    lm_head: str
    module_kind: Literal["linear", "conv1d"]
    neuron_axis: int
    """Axis of the output projection's weight that indexes MLP neurons."""
    default_start_fraction: float
    default_count: int

    def weight_name(self, layer: int) -> str:
        """Parameter name of the edited weight of ``layer``."""
        return f"{self.layers}.{layer}.{self.mlp_out}.weight"

    def default_layers(self, num_layers: int) -> list[int]:
        """The default run of consecutive edited layers for a model of ``num_layers`` layers; never the last
        layer (see :func:`check_edited_layers`)."""
        editable = num_layers - 1
        count = min(self.default_count, editable)
        start = max(0, min(round(self.default_start_fraction * num_layers), editable - count))
        return list(range(start, start + count))


def check_edited_layers(layers: list[int], num_layers: int, *, subject_last: bool = False) -> str | None:
    """What is wrong with editing ``layers`` of a ``num_layers``-layer model, or None. The last decoder
    layer cannot be edited unless ``subject_last`` (every prompt ends with its subject): the edit changes
    the output at the subject's position, and with no attention layer after it that change never reaches
    a later position, where the answer is predicted (the patch would be all zeros)."""
    if num_layers < 2:
        return f"the model has {num_layers} decoder layer(s); editing needs at least 2"
    if not layers:
        return "no layers to edit"
    if layers[0] < 0 or layers[-1] >= num_layers:
        return f"layers {layers}: the model has {num_layers} decoder layers (0-{num_layers - 1})"
    if layers[-1] == num_layers - 1 and not subject_last:
        return (
            f"layer {num_layers - 1} is the model's last decoder layer: a change at the subject there cannot "
            f"reach the answer after it (no attention layer follows), so its edit would be empty; edit layers "
            f"0-{num_layers - 2}"
        )
    return None


@cache
def _table() -> dict[str, dict[str, Any]]:
    text = resources.files("nmke_patch").joinpath("_data/architectures.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def supported_model_types() -> list[str]:
    """Model types nmke-patch can edit."""
    return sorted(_table())


def spec_for_model_type(model_type: str) -> ArchitectureSpec:
    """Look up the architecture spec of ``model_type``.

    Raises:
        UnsupportedArchitectureError: with instructions for adding the architecture.
    """
    entry = _table().get(model_type)
    if entry is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(supported_model_types())}); "
            "to add it, describe where its MLP output projection lives in "
            "nmke_patch/_data/architectures.json (see docs/architectures.md)"
        )
    return ArchitectureSpec(
        model_type=model_type,
        layers=entry["layers"],
        mlp_out=entry["mlp_out"],
        mlp_norm=entry["mlp_norm"],
        final_norm=entry["final_norm"],
        final_norm_kind=entry["final_norm_kind"],
        lm_head=entry["lm_head"],
        module_kind=entry["module_kind"],
        neuron_axis=int(entry["neuron_axis"]),
        default_start_fraction=float(entry["default_layers"]["start_fraction"]),
        default_count=int(entry["default_layers"]["count"]),
    )


def spec_for_model(model: nn.Module) -> ArchitectureSpec:
    """Architecture spec of a loaded transformers model."""
    _refuse_wrappers(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedArchitectureError("model has no config.model_type; is it a transformers model?")
    return spec_for_model_type(model_type)


def _refuse_wrappers(model: nn.Module) -> None:
    """Name the wrapper around a model (DataParallel, a PEFT model) instead of an architecture problem."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise UnsupportedArchitectureError(
            f"the model is wrapped in {type(model).__name__}: give the model it wraps (model.module)"
        )
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        raise UnsupportedArchitectureError(
            "the model is a PEFT model: apply patches to the base model before wrapping it, or export them as an"
            " adapter (nmke-patch export-peft)"
        )


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    """``root.get_submodule`` with a clear error naming the path."""
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"model has no module {dotted!r}; its architecture entry does not match it"
        ) from exc


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """The model's list of decoder layers."""
    last = spec.layers.rsplit(".", 1)[-1]
    if "." in spec.layers and isinstance(getattr(model, last, None), nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"this is the backbone of a {spec.model_type} model (it holds {last!r} itself, where the causal-LM model "
            f"holds {spec.layers!r}): give the whole model, as AutoModelForCausalLM loads it"
        )
    layers = get_submodule(model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.layers!r} is not a list of layers")
    return layers

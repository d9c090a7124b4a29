"""Apply patches to a live model in order, unload any of them, and restore the base bit-exactly.

This is the only module that writes model weights. Exactness does not rely on subtracting deltas
(which is not exact in floating point): the stack snapshots the base values of every touched neuron the
first time a patch touches it, and re-derives touched neurons from that snapshot by replaying the
remaining patches in order with :func:`nmke_patch.delta.add_delta`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec, decoder_layers, spec_for_model
from .delta import TensorDelta, add_delta, finite_where, gather_neurons, scatter_neurons
from .errors import PatchMismatchError, PatchNotAppliedError
from .models import check_resident, tensor_fingerprint
from .patch import ParentRef, Patch, check_deltas
from .sources import PatchSource, resolve_one, resolve_patches
from .threads import one_thread

logger = logging.getLogger(__name__)
_ATTR = "_nmke_patch_stack"
_ATTACHING = threading.Lock()
"""Held while a stack is attached: two threads' first ``for_model`` at once must end with one stack."""


@dataclass(frozen=True)
class Overlap:
    """Neurons of one tensor touched by both a newly applied patch and one already applied."""

    tensor: str
    other: str  # the other patch, described (name and short id)
    num_neurons: int
    other_id: str = ""  # its full id


@dataclass
class _Snapshot:
    indices: torch.Tensor  # long, sorted, on CPU
    values: torch.Tensor  # [n, d], weight dtype and device


def _lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).bits < torch.finfo(b).bits else b


def _within_rounding(a: torch.Tensor, b: torch.Tensor, size: torch.Tensor, *, steps: int) -> bool:
    """Whether ``a`` and ``b`` (same dtype) differ by no more than ``steps`` roundings to that dtype of
    values no larger than ``size``: what replaying a chain in another dtype can cost."""
    info = torch.finfo(a.dtype)
    bound = steps * info.eps * size.float().to(a.device) + info.tiny
    return bool(((a.float() - b.float()).abs() <= bound).all())


def check_lineage(patches: Sequence[Patch], merged: Iterable[Any] = ()) -> None:
    """Refuse a list of patches that names a patch twice or puts a patch before (or without) a patch it
    was made on top of: a chain is given whole, oldest first. ``merged``: the patches already merged into
    the model, oldest first (ids, or anything with an ``id``: :attr:`PatchStack.merged`, a record's
    entries); they count as given before the list. Reads the manifests only."""
    listed = {p.id for p in patches}
    merged = _ids_of(merged)
    for i, patch in enumerate(patches):
        if patch.id in {p.id for p in patches[:i]}:
            raise PatchMismatchError(f"patch {patch.describe()} is given twice")
        if patch.id in merged:
            raise PatchMismatchError(f"patch {patch.describe()} is merged into this model already")
        earlier = set(merged) | {p.id for p in patches[:i]}
        missing = [r for r in patch.manifest.parents if r.id not in earlier]
        if missing:
            named = ", ".join(
                f"{r.name} ({'listed after it' if r.id in listed else 'not given'})" for r in missing
            )
            raise PatchMismatchError(
                f"patch {patch.describe()} was made on top of {named}; give every patch of a chain, oldest "
                "first (each patch's recorded parents before it)"
            )
        position = {pid: j for j, pid in enumerate([*merged, *(p.id for p in patches[:i])])}
        order = [position[r.id] for r in patch.manifest.parents]
        if order != sorted(order):
            raise PatchMismatchError(
                f"patch {patch.describe()} was made on top of "
                f"{', '.join(r.name for r in patch.manifest.parents)} in that order; give them in that order"
            )


def _ids_of(items: Iterable[Any]) -> list[str]:
    """Patch ids from ids or objects with an ``id`` (one id string alone is refused, not split)."""
    if isinstance(items, str | bytes):
        raise TypeError("merged: expected a list of patches or ids, not one string")
    return [item if isinstance(item, str) else str(item.id) for item in items]


def _has_wider(dtype: torch.dtype) -> bool:
    """A float16 or bfloat16 model can be loaded in float32 instead; a float32 one has nowhere to go."""
    return torch.finfo(dtype).max < torch.finfo(torch.float32).max


def _overflow_advice(dtype: torch.dtype) -> str:
    if _has_wider(dtype):
        return "load the model in a wider dtype (fp32, or bf16 for fp16)"
    return "no dtype holds them: the patch is not a credible edit of this model"


def _refuse_shared_weights(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse a model whose editable weights share storage (one tied to another): a patch touching both
    would compute both updates from the same values and the second write would undo the first."""
    seen: dict[tuple[str, int], str] = {}
    for name in names:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            continue
        if param.device.type == "meta" or param.numel() == 0:
            continue
        ptr = (str(param.device), param.untyped_storage().data_ptr())  # per device: addresses may repeat
        if ptr in seen:
            raise PatchMismatchError(
                f"the model's {seen[ptr]!r} and {name!r} share their storage (tied weights); a patch could not "
                "change one without the other, so this model cannot be patched"
            )
        seen[ptr] = name


class PatchStack:
    """The patches applied to one live model, in order.

    Example:
        >>> stack = PatchStack.for_model(model)
        >>> stack.apply(load_patch("capitals.nmke"))
        >>> stack.unload_all()  # weights are torch.equal to before
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"PatchStack needs a torch model (nn.Module), got {type(model).__name__}")
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: edit the model it wraps
        self.model = model
        self._lock = threading.RLock()
        self.spec: ArchitectureSpec = spec_for_model(model)
        num_layers = len(decoder_layers(model, self.spec))
        self._editable = {self.spec.weight_name(i) for i in range(num_layers)}
        _refuse_shared_weights(model, sorted(self._editable))
        self._params: dict[str, torch.Tensor] = {}  # the weights this stack has met, as last looked up
        self._applied: list[Patch] = []
        self._base: dict[str, _Snapshot] = {}
        self._merged: list[ParentRef] = []
        with _ATTACHING:  # one stack per model: a second would not know this one's snapshots
            if _ATTR in model.__dict__:
                raise ValueError("this model has a patch stack already: use PatchStack.for_model(model)")
            model.__dict__[_ATTR] = self

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle of a patched model
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @classmethod
    def for_model(cls, model: nn.Module) -> PatchStack:
        """The stack attached to ``model`` (created on first use); a ``torch.compile``d model shares the
        stack of the model it wraps."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"PatchStack needs a torch model (nn.Module), got {type(model).__name__}")
        model = getattr(model, "_orig_mod", model)
        stack = model.__dict__.get(_ATTR)
        if stack is not None:
            return stack
        try:
            return cls(model)  # attaches under _ATTACHING, refusing if another thread attached one first
        except ValueError:
            found = model.__dict__.get(_ATTR)
            if found is None:
                raise
            return found  # that thread's stack: both callers use one

    @property
    def applied(self) -> list[Patch]:
        """Applied patches, oldest first (a copy)."""
        return list(self._applied)

    @property
    def merged(self) -> list[ParentRef]:
        """Patches declared merged into the weights before this stack (:meth:`declare_merged`), oldest first."""
        return list(self._merged)

    def declare_merged(self, patches: Iterable[Any]) -> None:
        """Declare patches merged into the live weights already (a model saved by ``apply --out`` lists them
        in ``nmke_patches.json``): each is given by anything with ``name`` and ``id`` (a :class:`Patch`, a
        :class:`~nmke_patch.merged.MergedPatch`), oldest first. Patches made on top of them then apply here;
        they themselves are part of the base, so :meth:`unload_all` keeps them. Replaces an earlier
        declaration; needs a stack with nothing applied.
        """
        with self._lock:
            self._declare_merged(patches)

    def _declare_merged(self, patches: Iterable[Any]) -> None:
        if self._applied:
            raise PatchMismatchError("declare_merged() needs a stack with no patches applied")
        if isinstance(patches, str | bytes):
            raise TypeError("declare_merged: expected a list of patches, not one string")
        refs = [ParentRef(name=str(p.name), id=str(p.id)) for p in patches]
        if len({r.id for r in refs}) != len(refs):
            raise PatchMismatchError("declare_merged(): a patch is listed twice")
        self._merged = refs

    def _lookup(self, name: str) -> torch.Tensor | None:
        """The model's parameter ``name`` as it is now, by its path (a walk over every parameter of the model
        took longer than the rest of an apply); None where there is none (quantized, wrapped)."""
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return None

    def _refresh(self) -> None:
        """Follow the model's current parameters (``load_state_dict(..., assign=True)`` replaces them); refuse
        if a weight that applied patches changed was replaced, since the patches are not in it any more."""
        live = {name: param for name in self._base if (param := self._lookup(name)) is not None}
        replaced = sorted(n for n in self._base if live.get(n) is not self._params.get(n))
        if replaced and self._applied:
            raise PatchMismatchError(
                f"the model's {replaced[0]!r} was replaced (load_state_dict(..., assign=True), to_empty() or"
                " a move to the meta device and back?) while patches were applied to it; the stack no longer knows"
                " its weights: reload the model"
            )
        self._params = live
        for name, snap in self._base.items():  # model.to(dtype or device) converts the weights in place
            param = live.get(name)
            if param is not None and (snap.values.dtype != param.dtype or snap.values.device != param.device):
                # the base as that conversion would have made it: unload_all gives the converted base
                self._base[name] = _Snapshot(
                    snap.indices, snap.values.to(device=param.device, dtype=param.dtype)
                )

    # -- checks ---------------------------------------------------------------------------------

    def _param(self, patch: Patch, delta: TensorDelta) -> torch.Tensor:
        if delta.name not in self._editable:
            raise PatchMismatchError(
                f"patch {patch.describe()}: tensor {delta.name!r} is not an editable MLP output projection of this "
                f"{self.spec.model_type} model (wrong model?)"
            )
        param = self._lookup(delta.name)
        if param is not None:
            self._params[delta.name] = param
        if param is None:
            raise PatchMismatchError(
                f"patch {patch.describe()}: the model has no parameter {delta.name!r} (quantized, or wrapped, e.g."
                " by PEFT? apply patches to the plain model, before wrapping or quantizing it)"
            )
        if param.is_meta:
            check_resident(self.model, [delta.name])  # raises, explaining device_map offloading
        if tuple(param.shape) != tuple(delta.shape):
            raise PatchMismatchError(
                f"patch {patch.describe()}: tensor {delta.name!r} has shape {list(param.shape)} in the model but "
                f"{list(delta.shape)} in the patch (wrong model?)"
            )
        if delta.neuron_axis != self.spec.neuron_axis:
            raise PatchMismatchError(
                f"patch {patch.describe()}: tensor {delta.name!r} says neuron axis {delta.neuron_axis}, but "
                f"{self.spec.model_type} models keep neurons on axis {self.spec.neuron_axis}"
            )
        return param

    def _base_values(self, name: str, param: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Base values at ``indices`` (from the snapshot where touched, else the live weight)."""
        idx = indices.to(torch.long)
        values = gather_neurons(param.detach(), self.spec.neuron_axis, idx)
        snap = self._base.get(name)
        if snap is not None and snap.indices.numel():
            pos = torch.searchsorted(snap.indices, idx).clamp_max(snap.indices.numel() - 1)
            hit = snap.indices[pos] == idx
            if bool(hit.any()):
                values[hit.to(values.device)] = snap.values[pos[hit].to(snap.values.device)]
        return values

    def _replay(
        self,
        name: str,
        indices: torch.Tensor,
        values: torch.Tensor,
        patches: Iterable[Patch],
        *,
        magnitudes: bool = False,
    ) -> torch.Tensor:
        """``values`` at ``indices`` with the deltas of ``patches`` added in order (their absolute values
        with ``magnitudes``: then ``|base|`` in gives a bound on every value the replay passes through)."""
        idx = indices.to(torch.long)
        for p in patches:
            for d in p.deltas:
                if d.name != name:
                    continue
                q_idx = d.indices.to(torch.long)
                mask = torch.isin(q_idx, idx)
                if not bool(mask.any()):
                    continue
                pos = torch.searchsorted(idx, q_idx[mask]).to(values.device)
                values[pos] = add_delta(values[pos], d.delta[mask].abs() if magnitudes else d.delta[mask])
        return values

    def _check_impl(self, patch: Patch, *, force: bool = False, fingerprints: bool = False) -> list[Overlap]:
        check_deltas(patch.deltas, patch.describe())  # a Patch built or changed in memory, as a file is
        if any(p.id == patch.id for p in self._applied):
            raise PatchMismatchError(f"patch {patch.describe()} is already applied")
        if any(m.id == patch.id for m in self._merged):
            raise PatchMismatchError(f"patch {patch.describe()} is merged into this model already")
        merged_ids = [m.id for m in self._merged]
        merged_parents = [r for r in patch.manifest.parents if r.id in merged_ids]
        present = merged_ids + [p.id for p in self._applied]
        missing = [ref.name for ref in patch.manifest.parents if ref.id not in present]
        if missing and not force:
            raise PatchMismatchError(
                f"patch {patch.describe()} was made on top of {', '.join(missing)}, not applied here; "
                "apply its parents first, oldest first (to override: force=True in Python, --force with apply, eval or revert)"
            )
        parents = [p for p in self._applied if p.id in set(patch.parent_ids)]  # merged ones are in the base
        order = [ref.id for ref in patch.manifest.parents]
        if not force and not missing and [i for i in present if i in set(order)] != order:
            here = [m.name for m in self._merged if m.id in set(order)] + [p.name for p in parents]
            raise PatchMismatchError(
                f"patch {patch.describe()} was made on top of {', '.join(r.name for r in patch.manifest.parents)} in "
                f"that order, but they are applied here as {', '.join(here)}; unload them and "
                "apply the chain oldest first"
            )
        overlaps: list[Overlap] = []
        for delta in patch.deltas:
            param = self._param(patch, delta)
            if force:
                continue
            base = self._base_values(delta.name, param, delta.indices)
            expected = self._replay(delta.name, delta.indices, base.clone(), parents)
            dtype = _lower_precision(expected.dtype, delta.original.dtype)
            recorded = delta.original.to(device=expected.device, dtype=dtype)
            actual = expected.to(dtype)
            # A chain made in one dtype and replayed in another rounds at every step in a different place.
            rounded = bool(parents) and expected.dtype != delta.original.dtype
            if (
                merged_parents
                and expected.dtype != delta.original.dtype
                and not torch.equal(recorded, actual)
            ):
                raise PatchMismatchError(  # their deltas are not here to bound the rounding with
                    f"patch {patch.describe()} was made in {delta.original.dtype} on top of "
                    f"{', '.join(r.name for r in merged_parents)}, which this model holds merged in "
                    f"{expected.dtype}: rounded at another step, its values cannot be checked against the "
                    "patch's; apply the whole chain to the base model in this dtype (or force)"
                )
            if not torch.equal(recorded, actual) and not (
                rounded
                and _within_rounding(
                    recorded,
                    actual,
                    self._replay(delta.name, delta.indices, base.float().abs(), parents, magnitudes=True),
                    steps=len(parents) + 1,
                )
            ):
                differ = (recorded != actual).any(dim=1)
                worst = float((recorded.float() - actual.float()).abs().max())
                raise PatchMismatchError(
                    f"patch {patch.describe()}: tensor {delta.name!r}: {int(differ.sum())} of {delta.num_neurons} "
                    f"touched neurons differ from the values the patch was made on (max abs diff {worst:.3g}); "
                    "wrong base model? (to override: force=True in Python, --force with apply, eval or revert)"
                )
            # The whole tensor is known only where the live weights are exactly what the patch was made on:
            # nothing applied to it here, and the merged patches are exactly its parents. A child of merged
            # patches is always compared: a merged model's record is not taken on trust.
            comparable = (
                (fingerprints or bool(merged_parents))
                and delta.fingerprint
                and not parents
                and delta.name not in self._base
                and merged_ids == list(patch.parent_ids)
            )
            if (
                comparable
                and param.dtype == delta.original.dtype
                and tensor_fingerprint(param) != delta.fingerprint
            ):
                raise PatchMismatchError(
                    f"patch {patch.describe()}: tensor {delta.name!r} matches at the touched neurons but differs "
                    "elsewhere from the tensor the patch was made on (fingerprint mismatch)"
                )
        for delta in patch.deltas:
            idx = delta.indices.to(torch.long)
            for other in self._applied:
                for od in other.deltas:
                    if od.name == delta.name:
                        n = int(torch.isin(idx, od.indices.to(torch.long)).sum())
                        if n:
                            overlaps.append(Overlap(delta.name, other.describe(), n, other.id))
        return overlaps

    # -- mutation -------------------------------------------------------------------------------

    def _snapshot(
        self, name: str, param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        """Remember base values for ``indices`` not yet remembered (live values unless given)."""
        idx = indices.to(torch.long)
        snap = self._base.get(name)
        new = idx if snap is None else idx[~torch.isin(idx, snap.indices)]
        if not new.numel():
            return
        if values is None:
            new_values = gather_neurons(param.detach(), self.spec.neuron_axis, new)
        else:
            new_values = values[torch.searchsorted(idx, new).to(values.device)].to(param.dtype)
        if snap is None:
            self._base[name] = _Snapshot(new, new_values)
            return
        all_idx = torch.cat([snap.indices, new])
        order = torch.argsort(all_idx)
        all_vals = torch.cat([snap.values, new_values.to(snap.values.device)])
        self._base[name] = _Snapshot(all_idx[order], all_vals[order.to(all_vals.device)])

    def _apply_impl(self, patch: Patch, *, force: bool = False) -> list[Overlap]:
        overlaps = self._check_impl(patch, force=force)
        for o in overlaps:  # returned to the caller too (the CLI prints them): logged at info
            logger.info(
                "patch %s overlaps %s on %d neurons of %s; their deltas add up",
                patch.describe(),
                o.other,
                o.num_neurons,
                o.tensor,
            )
        updates = []
        for delta in patch.deltas:  # every new value computed and checked before any weight changes
            param = self._params[delta.name]
            current = gather_neurons(param.detach(), self.spec.neuron_axis, delta.indices)
            new = add_delta(current, delta.delta)
            if not finite_where(new, current):
                raise PatchMismatchError(
                    f"patch {patch.describe()}: applied to {delta.name!r} it gives values beyond the range of "
                    f"{param.dtype}; {_overflow_advice(param.dtype)}"
                )
            updates.append((delta, param, current, new))
        for delta, param, current, new in updates:
            self._snapshot(delta.name, param, delta.indices, current)  # the live values, gathered once
            scatter_neurons(param.data, self.spec.neuron_axis, delta.indices, new)
        self._applied.append(patch)
        return overlaps

    def _find(self, patch: Patch | str | os.PathLike[str]) -> int:
        if isinstance(patch, os.PathLike) or (
            isinstance(patch, str)
            and not any(p.name == patch or p.id == patch for p in self._applied)
            and os.path.isdir(patch)
        ):
            patch = resolve_one(patch)  # the folder it was applied from: found by the patch's id
        if isinstance(patch, Patch):
            found = [i for i, p in enumerate(self._applied) if p.id == patch.id]
            key = patch.describe()
        elif isinstance(patch, str):
            key = patch
            found = [i for i, p in enumerate(self._applied) if p.id == key]
            if not found:  # a name, or an id's first 12+ hex digits (as messages show it)
                short = len(key) >= 12 and all(c in "0123456789abcdef" for c in key)
                found = [
                    i
                    for i, p in enumerate(self._applied)
                    if p.name == key or (short and p.id.startswith(key))
                ]
        else:
            raise TypeError(f"unload takes a Patch, its folder, an id or a name, not {type(patch).__name__}")
        if len(found) > 1:
            named = ", ".join(self._applied[i].describe() for i in found)
            raise PatchNotAppliedError(f"{key!r} names {len(found)} applied patches ({named}); give the id")
        if not found:
            raise PatchNotAppliedError(f"patch {key!r} is not applied to this model")
        return found[0]

    def _unload_impl(self, patch: Patch | str | os.PathLike[str]) -> Patch:
        index = self._find(patch)
        removed = self._applied[index]
        remaining = self._applied[:index] + self._applied[index + 1 :]
        updates = []
        for delta in removed.deltas:  # every value computed and checked before any weight changes
            param = self._params[delta.name]
            base = self._base_values(delta.name, param, delta.indices)
            values = self._replay(delta.name, delta.indices, base.clone(), remaining)
            if not finite_where(values, base):
                raise PatchMismatchError(
                    f"unloading {removed.describe()} would leave {delta.name!r} with values beyond the range of "
                    f"{param.dtype}: the patches that stay overflow it without this one; unload them as well "
                    f"(unload_all){', or load the model in a wider dtype' if _has_wider(param.dtype) else ''}"
                )
            updates.append((delta, param, values))
        for delta, param, values in updates:
            scatter_neurons(param.data, self.spec.neuron_axis, delta.indices, values)
        self._applied = remaining
        if not self._applied:
            self._base.clear()
        for name in {d.name for d in removed.deltas} & set(self._base):
            # neurons no remaining patch touches hold their base values again: the live weight is their base
            # (a later in-place change there is the user's, and unload_all keeps it)
            still = [d.indices.to(torch.long) for p in self._applied for d in p.deltas if d.name == name]
            snap = self._base[name]
            keep = torch.isin(snap.indices, torch.cat(still)) if still else None
            if keep is None or not bool(keep.any()):
                del self._base[name]
            elif not bool(keep.all()):
                self._base[name] = _Snapshot(snap.indices[keep], snap.values[keep.to(snap.values.device)])
        return removed

    def _unload_all_impl(self) -> list[Patch]:
        for name, snap in self._base.items():
            scatter_neurons(self._params[name].data, self.spec.neuron_axis, snap.indices, snap.values)
        removed, self._applied = self._applied, []
        self._base.clear()
        return removed

    def _adopt_impl(self, patches: Iterable[Patch], *, force: bool = False) -> None:
        if self._applied:
            raise PatchMismatchError("adopt() needs a stack with no patches applied")
        patches = list(patches)
        if len({p.id for p in patches}) != len(patches):
            raise PatchMismatchError("adopt(): a patch is listed twice")
        # Adopting patches declared merged takes them out of the declaration: they become revertible. They
        # must be the last ones declared, in order, and come first here.
        declared = [m.id for m in self._merged]
        k = sum(p.id in declared for p in patches)
        if k and declared[len(declared) - k :] != [p.id for p in patches[:k]]:
            raise PatchMismatchError(
                "adopt(): patches declared merged can be adopted only as the last ones declared, in order "
                f"(declared: {', '.join(m.name for m in self._merged)})"
            )
        for patch in patches:
            check_deltas(patch.deltas, patch.describe())
            for delta in patch.deltas:
                self._param(patch, delta)
        for patch in patches:
            for delta in patch.deltas:
                self._snapshot(delta.name, self._params[delta.name], delta.indices, delta.original)
        if not force:
            for name, snap in self._base.items():
                replayed = self._replay(name, snap.indices, snap.values.clone(), patches)
                live = gather_neurons(self._params[name].detach(), self.spec.neuron_axis, snap.indices)
                if not torch.equal(replayed, live):
                    self._base.clear()
                    raise PatchMismatchError(
                        f"tensor {name!r} is not the base plus these patches in this order "
                        f"({int((replayed != live).any(dim=1).sum())} neurons differ); cannot revert exactly"
                    )
        self._applied = patches
        self._merged = self._merged[: len(self._merged) - k]

    def check(self, patch: PatchSource, *, force: bool = False, fingerprints: bool = False) -> list[Overlap]:
        """Raise :class:`PatchMismatchError` if ``patch`` does not fit this model's current stack.

        Checks: not already applied, tensor names, shapes and orientation, parents applied, and the
        recorded originals against the state the patch was made on (base + its parents). With ``force``
        only the structural checks remain. With ``fingerprints`` the whole-tensor fingerprint is compared
        too where it can be (untouched tensor, same dtype).

        Returns:
            The overlaps with already applied patches (neurons both touch; their deltas add up).
        """
        resolved = resolve_one(patch)
        with self._lock, one_thread():  # one caller at a time: snapshots and weights stay consistent
            self._refresh()
            return self._check_impl(resolved, force=force, fingerprints=fingerprints)

    def apply(self, patch: PatchSource, *, force: bool = False) -> list[Overlap]:
        """Apply ``patch`` (a :class:`Patch`, or a patch directory read with ``load_patch``) on top of the
        stack. All checks run before any weight changes.

        Returns:
            Overlaps with already applied patches (also logged, at info level).
        """
        resolved = resolve_one(patch)
        with self._lock, one_thread():  # one caller at a time: snapshots and weights stay consistent
            self._refresh()
            return self._apply_impl(resolved, force=force)

    def unload(self, patch: Patch | str | os.PathLike[str]) -> Patch:
        """Remove one patch (by object, its folder, id, the id's first 12 or more digits, or a name that only
        it has) from any position; later patches keep their effect.

        The touched neurons are rebuilt from the base snapshot by replaying the remaining patches in
        order, so the result is bit-identical to applying only those patches to the base.
        """
        with self._lock, one_thread():  # one caller at a time: snapshots and weights stay consistent
            self._refresh()
            return self._unload_impl(patch)

    def unload_all(self) -> list[Patch]:
        """Remove every patch and restore the base weights exactly. Returns the removed patches."""
        with self._lock, one_thread():  # one caller at a time: snapshots and weights stay consistent
            self._refresh()
            return self._unload_all_impl()

    def adopt(self, patches: Iterable[PatchSource] | PatchSource, *, force: bool = False) -> None:
        """Declare that ``patches`` are already merged into the live weights (e.g. a saved merged model).

        The base values are taken from the patches' recorded originals; then replaying the patches
        must reproduce the live weights exactly, or :class:`PatchMismatchError` is raised (unless ``force``)
        and nothing is adopted. Afterwards :meth:`unload_all` gives back the weights without them: the base,
        or what stays declared merged. Patches declared merged (:meth:`declare_merged`) may be adopted as
        the last ones declared, in order; they leave the declaration.
        """
        resolved = resolve_patches(patches)
        with self._lock, one_thread():  # one caller at a time: snapshots and weights stay consistent
            self._refresh()
            self._adopt_impl(resolved, force=force)

"""PatchStack: apply, unload at any position, unload_all, exactness in fp32/bf16/fp16, refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import MODEL_FACTORIES, assert_state_equal, random_patch, state_copy

from nmke_patch.architectures import spec_for_model
from nmke_patch.delta import TensorDelta, add_delta, gather_neurons
from nmke_patch.errors import PatchMismatchError, PatchNotAppliedError
from nmke_patch.patch import Manifest, Patch
from nmke_patch.stack import PatchStack

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def saved(patch, tmp_path, name=None):
    return patch.save(tmp_path / f"{name or patch.name}.nmke")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_apply_changes_weights_and_unload_all_is_bit_exact(arch, dtype, tmp_path):
    model = MODEL_FACTORIES[arch](dtype=dtype)
    before = state_copy(model)
    patches = [saved(random_patch(model, seed=s, name=f"p{s}", neurons=7), tmp_path) for s in range(3)]
    stack = PatchStack.for_model(model)
    for p in patches:
        stack.apply(p, force=True)
    name = patches[0].deltas[0].name
    assert not torch.equal(model.state_dict()[name], before[name])
    stack.unload_all()
    assert_state_equal(model, before)
    assert stack.applied == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_unload_middle_equals_applying_the_others(arch, dtype, tmp_path):
    model = MODEL_FACTORIES[arch](dtype=dtype)
    # overlapping neurons on purpose: patches 0 and 2 share neurons 1..4
    a = saved(random_patch(model, seed=1, name="a", indices=[0, 1, 2, 3, 4]), tmp_path)
    b = saved(random_patch(model, seed=2, name="b", indices=[3, 4, 5, 6]), tmp_path)
    c = saved(random_patch(model, seed=3, name="c", indices=[1, 2, 3, 4, 9]), tmp_path)
    reference = MODEL_FACTORIES[arch](dtype=dtype)
    ref_stack = PatchStack.for_model(reference)
    ref_stack.apply(a)
    ref_stack.apply(c, force=True)

    stack = PatchStack.for_model(model)
    stack.apply(a)
    overlaps = stack.apply(b)  # originals of b are base values, checked against the base, not base + a
    assert {o.other for o in overlaps} == {a.describe()}
    stack.apply(c)
    stack.unload(b)
    assert [p.name for p in stack.applied] == ["a", "c"]
    assert_state_equal(model, reference.state_dict())


def test_overlapping_deltas_add_up(tmp_path):
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, seed=1, name="a", indices=[2, 3], layers=(1,))
    b = random_patch(model, seed=2, name="b", indices=[3, 4], layers=(1,))
    name = a.deltas[0].name
    w = dict(model.named_parameters())[name]
    base3 = gather_neurons(w.detach(), 1, torch.tensor([3]))
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.apply(b)
    expected = add_delta(add_delta(base3, a.deltas[0].delta[1:2]), b.deltas[0].delta[0:1])
    assert torch.equal(gather_neurons(w.detach(), 1, torch.tensor([3])), expected)


def test_wrong_base_is_refused_naming_patch_and_tensor(tmp_path):
    made_on = MODEL_FACTORIES["llama"](seed=0)
    other = MODEL_FACTORIES["llama"](seed=1)
    before = state_copy(other)
    patch = saved(random_patch(made_on, name="capitals"), tmp_path)
    with pytest.raises(
        PatchMismatchError, match=r"capitals.*model\.layers\.1\.mlp\.down_proj\.weight.*differ"
    ):
        PatchStack.for_model(other).apply(patch)
    assert_state_equal(other, before)
    PatchStack.for_model(other).apply(patch, force=True)
    assert not torch.equal(other.state_dict()[patch.deltas[0].name], before[patch.deltas[0].name])


def test_wrong_architecture_or_shape_refused_even_with_force(tmp_path):
    llama, gpt2 = MODEL_FACTORIES["llama"](), MODEL_FACTORIES["gpt2"]()
    before = state_copy(gpt2)
    patch = saved(random_patch(llama), tmp_path)
    with pytest.raises(PatchMismatchError, match="not an editable MLP output projection"):
        PatchStack.for_model(gpt2).apply(patch, force=True)
    assert_state_equal(gpt2, before)


def test_patch_is_checked_against_its_parents_state(tmp_path):
    model = MODEL_FACTORIES["gpt2"]()
    before = state_copy(model)
    stack = PatchStack.for_model(model)
    parent = saved(random_patch(model, name="parent", indices=[1, 2, 3]), tmp_path)
    stack.apply(parent)
    child = saved(random_patch(model, name="child", indices=[2, 3, 4], parents=(parent,), seed=5), tmp_path)
    stack.unload_all()
    with pytest.raises(PatchMismatchError, match="made on top of parent"):
        stack.apply(child)
    assert_state_equal(model, before)
    stack.apply(parent)
    stack.apply(child)
    stack.unload(parent)  # child stays with the same effect on its own neurons
    stack.unload_all()
    assert_state_equal(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_chain_made_in_fp32_applies_to_the_model_in_a_narrower_dtype(dtype, tmp_path):
    """The child's recorded originals are fp32 (base + parent); in bf16 the replay rounds twice."""
    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    chain = []
    for i in range(3):  # every patch of the chain touches neurons its parents touched
        patch = random_patch(
            model, name=f"p{i}", indices=[1, 2, 3, 4 + i], parents=tuple(chain), seed=i, scale=0.3
        )
        chain.append(saved(patch, tmp_path))
        stack.apply(chain[-1])
    narrow = MODEL_FACTORIES["llama"](dtype=dtype)
    before = state_copy(narrow)
    narrow_stack = PatchStack.for_model(narrow)
    for patch in chain:
        narrow_stack.apply(patch)
    narrow_stack.unload_all()
    assert_state_equal(narrow, before)

    other = MODEL_FACTORIES["llama"](dtype=dtype, seed=1)  # another base: still refused
    other_stack = PatchStack.for_model(other)
    other_stack.apply(chain[0], force=True)
    with pytest.raises(PatchMismatchError, match="differ from the values the patch was made on"):
        other_stack.apply(chain[1])


def test_double_apply_and_unknown_unload_refused(tmp_path):
    model = MODEL_FACTORIES["llama"]()
    p = saved(random_patch(model), tmp_path)
    stack = PatchStack.for_model(model)
    stack.apply(p)
    with pytest.raises(PatchMismatchError, match="already applied"):
        stack.apply(p)
    with pytest.raises(PatchNotAppliedError):
        stack.unload("nope")


def test_adopt_then_unload_all_reverts_a_merged_model(tmp_path):
    model = MODEL_FACTORIES["llama"](dtype=torch.bfloat16)
    base = state_copy(model)
    a = saved(random_patch(model, name="a", indices=[1, 2]), tmp_path)
    b = saved(random_patch(model, name="b", indices=[2, 3], seed=3), tmp_path)
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.apply(b)
    merged = state_copy(model)

    fresh = MODEL_FACTORIES["llama"](dtype=torch.bfloat16)
    fresh.load_state_dict(merged)
    with pytest.raises(PatchMismatchError, match="not the base plus these patches"):
        PatchStack.for_model(fresh).adopt([b, a])  # wrong order cannot reproduce the merged weights
    s2 = PatchStack.for_model(fresh)
    assert not s2.applied  # the refused adoption left nothing behind
    s2.adopt([a, b])
    s2.unload_all()
    assert_state_equal(fresh, base)


def test_one_patch_source_alone_is_a_list_of_one(tmp_path) -> None:
    from nmke_patch.sources import resolve_patches

    patch = random_patch(MODEL_FACTORIES["llama"](), name="one").save(tmp_path / "one.nmke")
    for source in (str(patch.path), patch.path, patch):
        assert [p.id for p in resolve_patches(source)] == [patch.id]  # not the characters of a path


def test_parents_applied_in_another_order_are_named_as_such() -> None:
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, name="a", seed=1)
    b = random_patch(model, name="b", seed=2)
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.apply(b)
    c = random_patch(model, name="c", seed=3, parents=(a, b))
    stack.unload_all()
    stack.apply(b)
    stack.apply(a)
    with pytest.raises(
        PatchMismatchError, match=r"made on top of a, b in that order, but they are applied here as b, a"
    ):
        stack.apply(c)


def test_check_lineage_names_parents_given_in_another_order() -> None:
    from nmke_patch.stack import check_lineage

    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, name="a", seed=1)
    b = random_patch(model, name="b", seed=2)
    c = random_patch(model, name="c", seed=3, parents=(a, b))
    check_lineage([a, b, c])
    with pytest.raises(
        PatchMismatchError, match="made on top of a, b in that order; give them in that order"
    ):
        check_lineage([b, a, c])  # read from the manifests, before any model loads


def test_children_of_merged_patches_apply_on_top_of_them() -> None:
    """A model with a and b merged into its weights (as `apply --out` saves it) takes their child c."""
    from nmke_patch.stack import check_lineage

    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    a = random_patch(model, name="a", seed=1, indices=[0, 1, 2])
    stack.apply(a)
    b = random_patch(model, name="b", seed=2, indices=[2, 3], parents=(a,))
    stack.apply(b)
    c = random_patch(model, name="c", seed=3, indices=[1, 3, 5], parents=(a, b))
    stack.apply(c)
    merged_abc = state_copy(model)
    stack.unload(c)
    merged_ab = state_copy(model)
    model = MODEL_FACTORIES["llama"]()
    model.load_state_dict(merged_ab)  # as a saved merged model loads: no stack knows a and b
    stack = PatchStack.for_model(model)
    with pytest.raises(PatchMismatchError, match="made on top of a, b, not applied here"):
        stack.apply(c)
    with pytest.raises(PatchMismatchError, match=r"a \(not given\)"):
        check_lineage([c])
    check_lineage([c], merged=[a.id, b.id])
    with pytest.raises(PatchMismatchError, match="in that order"):
        check_lineage([c], merged=[b.id, a.id])
    stack.declare_merged([b, a])
    with pytest.raises(PatchMismatchError, match="applied here as b, a"):
        stack.apply(c)
    stack.declare_merged([a, b])
    with pytest.raises(PatchMismatchError, match="merged into this model already"):
        stack.apply(b)
    stack.apply(c)
    assert_state_equal(model, merged_abc)
    assert [p.name for p in stack.unload_all()] == ["c"] and [m.name for m in stack.merged] == ["a", "b"]
    assert_state_equal(model, merged_ab)  # a and b belong to the base: they stay
    stack.apply(c)
    with pytest.raises(PatchMismatchError, match="no patches applied"):
        stack.declare_merged([a])


def _merged_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh model holding ``model``'s current weights, as a saved merged model loads (no stack)."""
    fresh = MODEL_FACTORIES["llama"]().to(dtype)
    fresh.load_state_dict(state_copy(model))
    return fresh


def test_a_merged_models_record_is_checked_not_trusted() -> None:
    """A record claiming a patch that the weights do not hold: a child of it is refused even where it
    touches none of the claimed patch's neurons (the whole-tensor fingerprint disagrees)."""
    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    a = random_patch(model, name="a", seed=1, layers=(1,), indices=[0, 1])
    stack.apply(a)
    elsewhere = random_patch(model, name="b", seed=2, layers=(1,), indices=[7, 8], parents=(a,))
    stack.unload_all()
    liar = _merged_copy(model)  # the base, whatever its record says
    before = state_copy(liar)
    lying = PatchStack.for_model(liar)
    lying.declare_merged([a])
    with pytest.raises(PatchMismatchError, match="fingerprint mismatch"):
        lying.apply(elsewhere)
    assert_state_equal(liar, before)


def test_merged_and_other_patches_and_dtypes() -> None:
    from nmke_patch.stack import check_lineage

    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    a = random_patch(model, name="a", seed=1, indices=[0, 1, 2])
    stack.apply(a)
    q = random_patch(model, name="q", seed=2, indices=[9, 10])  # unrelated, same tensors, other neurons
    b = random_patch(model, name="b", seed=3, indices=[1, 2, 3], parents=(a,))
    stack.apply(q)
    # a and q merged: b (a child of a) applies and passes the checks verify makes
    aq = PatchStack.for_model(_merged_copy(model))
    aq.declare_merged([a, q])
    aq.check(b, fingerprints=True)
    # the stack as a revert leaves it: adopting q takes it out of the declaration, so it unloads
    with pytest.raises(PatchMismatchError, match="last ones declared"):
        aq.adopt([a])
    aq.adopt([q])
    assert [m.name for m in aq.merged] == ["a"] and [p.name for p in aq.applied] == ["q"]
    aq.unload_all()
    stack.unload(q)
    assert_state_equal(aq.model, state_copy(model))  # base + a
    aq.apply(q)
    aq.unload(q)
    aq.apply(b)
    # merged in bf16, made in fp32: the chain applied to the bf16 base is checked within its rounding, but
    # the merged parent's rounding cannot be bounded without its deltas: said so, not "wrong base model"
    stack.unload_all()
    base_half = MODEL_FACTORIES["llama"]().to(torch.bfloat16)
    chain = PatchStack.for_model(base_half)
    chain.apply(a)
    merged_a = PatchStack.for_model(_merged_copy(base_half, torch.bfloat16))
    merged_a.declare_merged([a])
    with pytest.raises(PatchMismatchError, match=r"holds merged in torch\.bfloat16: rounded at another step"):
        merged_a.apply(b)
    chain.apply(b)
    # merged ids come as ids or as patches, never as one string
    check_lineage([b], merged=[a])
    check_lineage([b], merged=[a.id])
    with pytest.raises(TypeError, match="not one string"):
        check_lineage([b], merged=a.id)


def test_unload_forgets_the_base_of_neurons_no_patch_touches_any_more():
    """After a partial unload, a neuron no remaining patch touches is the user's again: a later in-place
    change there is kept by unload_all, and a patch made on the changed weights fits."""
    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    a = random_patch(model, name="a", indices=[0, 1, 2, 3])
    b = random_patch(model, name="b", indices=[3, 10, 11], seed=1)
    stack.apply(a)
    stack.apply(b)
    stack.unload(a)
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[:, 0] += 1.0
    changed = state_copy(model)
    c = random_patch(model, name="c", indices=[0, 5], seed=3)  # made on the changed weights
    stack.apply(c)
    stack.unload(c)
    assert_state_equal(model, changed)
    stack.unload_all()
    assert torch.equal(model.get_parameter(name)[:, 0], changed[name][:, 0])  # the user's change stays
    assert not torch.equal(model.get_parameter(name)[:, 10], changed[name][:, 10])  # b's neuron is back


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_the_stack_follows_replaced_parameters_and_compiled_models():
    model = MODEL_FACTORIES["llama"]()
    stack = PatchStack.for_model(model)
    a = random_patch(model, name="a")
    model.load_state_dict(state_copy(model), assign=True)  # new Parameter objects, nothing applied
    before = state_copy(model)
    stack.apply(a)
    assert not torch.equal(
        model.get_parameter("model.layers.1.mlp.down_proj.weight"),
        before["model.layers.1.mlp.down_proj.weight"],
    )
    model.load_state_dict(before, assign=True)  # replaced under an applied patch: refused, not ignored
    with pytest.raises(PatchMismatchError, match="was replaced"):
        stack.unload_all()
    compiled = torch.compile(MODEL_FACTORIES["llama"]())
    plain = compiled._orig_mod
    base = state_copy(plain)
    assert PatchStack.for_model(compiled) is PatchStack.for_model(plain)
    PatchStack.for_model(compiled).apply(random_patch(plain, name="b"))
    PatchStack.for_model(plain).unload_all()
    assert_state_equal(plain, base)


def test_a_patch_that_overflows_the_weight_dtype_is_refused_whole():
    model = MODEL_FACTORIES["llama"](dtype=torch.float16)
    before = state_copy(model)
    huge = random_patch(MODEL_FACTORIES["llama"](), name="huge", scale=1e6)
    with pytest.raises(
        PatchMismatchError, match=r"beyond the range of torch\.float16; load the model in a wider"
    ):
        PatchStack.for_model(model).apply(huge, force=True)
    assert_state_equal(model, before)
    assert not PatchStack.for_model(model).applied
    wide = MODEL_FACTORIES["llama"]()  # float32 has nowhere wider to go: not advised
    plain = random_patch(wide, name="absurd")
    absurd = replace(
        plain, deltas=tuple(replace(d, delta=torch.full_like(d.delta, 3e38)) for d in plain.deltas)
    )
    PatchStack.for_model(wide).apply(absurd)
    with pytest.raises(PatchMismatchError, match=r"torch\.float32; no dtype holds them"):
        PatchStack.for_model(wide).apply(replace(absurd, id="f" * 64), force=True)


def test_adopt_refuses_a_patch_listed_twice_even_forced():
    model = MODEL_FACTORIES["llama"]()
    a = random_patch(model, name="a")
    stack = PatchStack.for_model(model)
    with pytest.raises(PatchMismatchError, match="listed twice"):
        stack.adopt([a, a], force=True)
    assert not stack.applied


def _one_value_patch(model: torch.nn.Module, name: str, value: float) -> Patch:
    """A patch adding ``value`` to one element of neuron 3 of layer 1, made on ``model`` as it is."""
    spec = spec_for_model(model)
    pname = spec.weight_name(1)
    weight = dict(model.named_parameters())[pname]
    idx = torch.tensor([3], dtype=torch.int32)
    original = gather_neurons(weight.detach(), spec.neuron_axis, idx.long()).clone()
    delta = torch.zeros(1, original.shape[1])
    delta[0, 0] = value
    td = TensorDelta(pname, tuple(weight.shape), spec.neuron_axis, idx, delta, original)
    return Patch(Manifest(name=name, base_model={}, method={}), (td,))


def test_unloading_refuses_to_leave_values_beyond_the_dtype():
    """In fp16, A (-60000) then B (+120000) stay finite together; B alone overflows, as apply(B) would."""
    model = MODEL_FACTORIES["llama"](dtype=torch.float16)
    base = state_copy(model)
    a, b = _one_value_patch(model, "a", -60000.0), _one_value_patch(model, "b", 120000.0)
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.apply(b)
    both = state_copy(model)
    with pytest.raises(PatchMismatchError, match=r"unloading a .* beyond the range of torch\.float16"):
        stack.unload(a)
    assert_state_equal(model, both)  # nothing changed, nothing forgotten
    assert [p.name for p in stack.applied] == ["a", "b"]
    stack.unload(b)
    stack.unload(a)
    assert_state_equal(model, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("start", "to"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_model_converted_while_patched_unloads_to_the_converted_base(arch, start, to):
    """model.to(dtype) with patches applied: unload and unload_all work on the base as converted."""
    model = MODEL_FACTORIES[arch](dtype=start)
    a = random_patch(model, name="a", seed=1, indices=[0, 1, 2])
    b = random_patch(model, name="b", seed=2, indices=[5, 6])
    only_b = MODEL_FACTORIES[arch](dtype=start)  # b alone, converted the same way
    PatchStack.for_model(only_b).apply(b)
    only_b.to(to)
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.apply(b)
    model.to(to)  # the same parameters, converted in place
    stack.unload(a)
    assert [p.name for p in stack.applied] == ["b"]
    assert_state_equal(model, state_copy(only_b))
    stack.unload_all()
    assert_state_equal(model, state_copy(MODEL_FACTORIES[arch](dtype=start).to(to)))


def test_one_stack_per_model_and_one_caller_at_a_time() -> None:
    """A second stack would not know the first one's snapshots; threads applying at once used to lose them
    (unload_all then left the weights changed in 13 of 30 trials)."""
    import copy
    import threading

    model = MODEL_FACTORIES["llama"]()
    base = state_copy(model)
    stack = PatchStack.for_model(model)
    with pytest.raises(ValueError, match=r"use PatchStack\.for_model\(model\)"):
        PatchStack(model)
    patches = [
        random_patch(model, name=f"p{i}", seed=i, layers=(0, 1, 2), indices=list(range(i * 4, i * 4 + 8)))
        for i in range(6)
    ]  # neighbours share neurons
    for _ in range(5):
        start = threading.Barrier(len(patches))
        threads = [
            threading.Thread(target=lambda p=p, start=start: (start.wait(), stack.apply(p))) for p in patches
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        order = [p.name for p in stack.applied]
        expected = MODEL_FACTORIES["llama"]()
        for name in order:
            PatchStack.for_model(expected).apply(next(p for p in patches if p.name == name))
        assert_state_equal(model, state_copy(expected))  # as if applied one after another, in that order
        twin = copy.deepcopy(model)  # the stack travels with a copy, with a lock of its own
        PatchStack.for_model(twin).unload_all()
        assert_state_equal(twin, base)
        stack.unload_all()
        assert_state_equal(model, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fast_finiteness_check_agrees_with_isfinite(dtype: torch.dtype) -> None:
    """all_finite sums in float64 instead of building a mask: the same answer for NaN, either infinity, both
    (their sum is NaN), the largest finite values (their float64 sum does not overflow) and nothing at all."""
    from nmke_patch.delta import all_finite, finite_where

    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(0),
        torch.full((200, 576), big),
        torch.full((200, 576), -big),
        torch.tensor([1.0, float("nan")]),
        torch.tensor([1.0, float("inf")]),
        torch.tensor([float("-inf"), 2.0]),
        torch.tensor([float("inf"), float("-inf")]),
    ]
    for values in (c.to(dtype) for c in cases):
        assert all_finite(values) == bool(torch.isfinite(values).all()), values
    old = torch.tensor([1.0, float("inf"), 3.0], dtype=dtype)
    assert finite_where(torch.tensor([2.0, float("inf"), 4.0], dtype=dtype), old)  # non-finite where it was
    assert not finite_where(torch.tensor([2.0, 1.0, float("nan")], dtype=dtype), old)


def _attach(model, patch, barrier, stacks, i) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    stacks[i] = PatchStack.for_model(model)
    stacks[i].apply(patch)


def test_threads_attaching_at_once_share_one_stack() -> None:
    """Two threads' first ``for_model`` on a fresh model (two request handlers): one stack, both patches
    in it, and ``unload_all`` restores the base. Before, about half the trials made two stacks."""
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            model = MODEL_FACTORIES["llama"]()
            before = state_copy(model)
            patches = [random_patch(model, layers=(i,), seed=i, name=f"p{i}") for i in (1, 2)]
            barrier = threading.Barrier(2)
            stacks: list[PatchStack | None] = [None, None]
            threads = [
                threading.Thread(target=_attach, args=(model, patches[i], barrier, stacks, i)) for i in (0, 1)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stack = PatchStack.for_model(model)
            assert stacks[0] is stacks[1] is stack
            assert sorted(p.name for p in stack.applied) == ["p1", "p2"]
            stack.unload_all()
            assert_state_equal(model, before)
    finally:
        sys.setswitchinterval(old)


def test_tied_editable_weights_and_non_models_are_refused() -> None:
    model = MODEL_FACTORIES["llama"]()
    model.model.layers[2].mlp.down_proj.weight = model.model.layers[1].mlp.down_proj.weight
    with pytest.raises(PatchMismatchError, match="share their storage"):
        PatchStack.for_model(model)  # a patch on both would lose one of its two deltas
    with pytest.raises(TypeError, match="needs a torch model"):
        PatchStack.for_model(None)  # type: ignore[arg-type]


def test_a_loaded_patch_does_not_follow_its_files(tmp_path) -> None:
    """load_patch reads the deltas once into memory: a file rewritten (or truncated) afterwards cannot
    change a patch already checked, nor crash an apply (memory-mapped tensors did both)."""
    import os
    import shutil

    from nmke_patch.patch import DELTAS_FILE, load_patch

    model = MODEL_FACTORIES["llama"]()
    before = state_copy(model)
    a = load_patch(saved(random_patch(model, seed=1, name="a", indices=[0, 1, 2]), tmp_path).path)
    other = saved(random_patch(model, seed=2, name="x", indices=[0, 1, 2]), tmp_path)
    kept = a.deltas[0].delta.clone()
    shutil.copyfile(other.path / DELTAS_FILE, a.path / DELTAS_FILE)  # same size, written in place
    assert torch.equal(a.deltas[0].delta, kept)
    os.truncate(a.path / DELTAS_FILE, 0)
    stack = PatchStack.for_model(model)
    stack.apply(a)
    stack.unload(a)
    assert_state_equal(model, before)
    b = saved(random_patch(model, seed=3, name="b"), tmp_path)
    stack.apply(b.path)
    for way in (b.path, str(b.path)):  # by the folder it was applied from (was "not applied" / TypeError)
        stack.unload(way)
        assert stack.applied == []
        stack.apply(b)


def test_a_deltas_file_larger_than_its_manifest_allows_is_refused_unread(tmp_path) -> None:
    from nmke_patch.errors import InvalidPatchError
    from nmke_patch.patch import DELTAS_FILE, load_patch

    folder = saved(random_patch(MODEL_FACTORIES["llama"](), name="big"), tmp_path).path
    with open(folder / DELTAS_FILE, "ab") as fh:
        fh.truncate(64 << 20)  # 64 MB for 2 x 5 neurons of width 32
    with pytest.raises(InvalidPatchError, match=r"more than the .* its manifest's tensors can take"):
        load_patch(folder)


def test_patches_compare_by_identity_of_content_not_tensor_truth(tmp_path) -> None:
    from nmke_patch.patch import load_patch

    model = MODEL_FACTORIES["llama"]()
    p = saved(random_patch(model, name="p"), tmp_path)
    stack = PatchStack.for_model(model)
    stack.apply(p)
    again = load_patch(p.path)
    assert again in stack.applied and again == p and hash(again) == hash(p)  # raised RuntimeError/TypeError
    assert stack.applied.index(again) == 0 and len({again, p}) == 1
    renamed = replace(p, manifest=replace(p.manifest, name="other"))
    assert renamed != p and random_patch(model, seed=9, name="p") != p
    assert p.deltas[0] in list(p.deltas)  # deltas compare by identity instead of raising


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_the_backbone_alone_is_refused_with_what_to_give(arch: str) -> None:
    from nmke_patch.errors import UnsupportedArchitectureError

    model = MODEL_FACTORIES[arch]()
    with pytest.raises(UnsupportedArchitectureError, match=r"backbone .* give the whole model"):
        PatchStack.for_model(model.base_model)  # model.model (Llama) / model.transformer (GPT-2)

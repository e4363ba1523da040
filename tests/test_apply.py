"""Apply / revert / stack: exactness on every family and on the real default model, checked against a slow
reference simulation of the documented rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy
from hypothesis import given, settings
from hypothesis import strategies as st

import loki
from loki.testing import random_delta, tiny_model


def delta_on(model, rows_by_layer, seed, name="d"):
    projs = loki.projections.find_down_projections(model)
    g = torch.Generator().manual_seed(seed)
    return loki.implant.make_delta(
        model,
        {l: (sorted(rows), torch.randn(len(rows), projs.d_in, generator=g)) for l, rows in rows_by_layer.items()},
        name=name,
    )


def reference_weights(base_model, applied):
    """The documented semantics, row by row, in plain Python: apply `(delta, policy)` pairs in order to the base."""
    projs = loki.projections.find_down_projections(base_model)
    weights = {l: projs.rows(l).detach().clone() for l in range(len(projs))}
    base = {l: w.clone() for l, w in weights.items()}
    touched = {l: set() for l in weights}
    for delta, policy in applied:
        for layer, ld in delta.layers.items():
            product = None if ld.rows is not None else ld.lora_A.float() @ ld.lora_B.float()  # A @ B, float32
            for pos, row in enumerate(ld.indices.tolist()):
                b = base[layer][row]
                new = ld.rows[pos] if product is None else b.float() + product[pos]
                if row in touched[layer] and policy == "add":
                    change = new.float() - b.float()
                    weights[layer][row] = (weights[layer][row].float() + change).to(b.dtype)
                else:
                    assert row not in touched[layer] or policy == "replace"
                    weights[layer][row] = new.to(b.dtype)
                touched[layer].add(row)
    return weights


def assert_rows_equal(model, expected):
    projs = loki.projections.find_down_projections(model)
    for layer, w in expected.items():
        assert torch.equal(projs.rows(layer), w), f"layer {layer} differs from the reference"


# -- every family ----------------------------------------------------------------------------------
def test_apply_revert_bit_exact(tiny):
    before = state_dict_copy(tiny)
    delta = random_delta(tiny, layers=[0, 1], q=16, seed=1)
    handle = loki.apply(tiny, delta)
    projs = loki.projections.find_down_projections(tiny)
    for layer, ld in delta.layers.items():
        assert torch.equal(projs.rows(layer)[ld.indices], ld.rows)
        untouched = torch.ones(projs.d_out, dtype=torch.bool)
        untouched[ld.indices] = False
        assert torch.equal(projs.rows(layer)[untouched], before_rows(before, tiny, layer)[untouched])
    assert torch.equal(handle.saved(0), before_rows(before, tiny, 0)[delta.layers[0].indices])
    loki.revert(tiny, handle)
    assert_state_equal(tiny, before)
    assert loki.applied(tiny) == []


def before_rows(state, model, layer):
    projs = loki.projections.find_down_projections(model)
    name = [n for n, m in model.named_modules() if m is projs.modules[layer]][0]
    w = state[name + ".weight"]
    return w.t() if projs.transposed else w


def test_outputs_change_and_restore(tiny):
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = tiny(ids).logits
        with loki.implanted(tiny, random_delta(tiny, layers=[0, 1], q=25, seed=2)):
            implanted_logits = tiny(ids).logits
        after = tiny(ids).logits
    assert not torch.allclose(base_logits, implanted_logits)
    assert torch.equal(base_logits, after)


def test_lora_form_writes_base_plus_product(tiny):
    before = state_dict_copy(tiny)
    delta = random_delta(tiny, layers=[1], q=12.5, seed=3, lora_rank=2)
    assert delta.form == "lora" and delta.num_params == 4 * 2 + 2 * 64
    handle = loki.apply(tiny, delta)
    assert_rows_equal(tiny, reference_weights(tiny_model(family_of(tiny)), [(delta, "error")]))
    loki.revert(tiny, handle)
    assert_state_equal(tiny, before)


def family_of(model):
    return model.config.name_or_path.split("/")[1].rsplit("-seed", 1)[0]


# -- stacking and overlap ---------------------------------------------------------------------------
def test_disjoint_deltas_stack_in_any_order_and_revert_out_of_order(family):
    base = tiny_model(family)
    a = delta_on(base, {0: [1, 2], 1: [5]}, 1, "a")
    b = delta_on(base, {0: [3], 1: [6, 7]}, 2, "b")
    c = delta_on(base, {1: [0, 31]}, 3, "c")
    m1, m2 = tiny_model(family), tiny_model(family)
    for d in (a, b, c):
        loki.apply(m1, d)
    for d in (c, a, b):
        loki.apply(m2, d)
    assert_state_equal(m1, state_dict_copy(m2))
    handles = loki.applied(m1)
    loki.revert(m1, handles[1])  # b, from the middle
    assert_rows_equal(m1, reference_weights(base, [(a, "error"), (c, "error")]))


def test_overlap_is_an_error_by_default_and_changes_nothing():
    model = tiny_model("qwen2")
    a = delta_on(model, {0: [1, 2, 3]}, 1, "a")
    b = delta_on(model, {0: [3, 4], 1: [0]}, 2, "b")
    loki.apply(model, a)
    before = state_dict_copy(model)
    with pytest.raises(loki.OverlapError, match="on_overlap='replace'"):
        loki.apply(model, b)
    assert_state_equal(model, before)
    assert len(loki.applied(model)) == 1


@pytest.mark.parametrize("policy", ["replace", "add"])
def test_overlap_policies_follow_the_reference(family, policy):
    base = tiny_model(family)
    a = delta_on(base, {0: [1, 2, 3], 1: [4]}, 1, "a")
    b = delta_on(base, {0: [3, 4], 1: [4, 5]}, 2, "b")
    c = delta_on(base, {0: [2, 3, 9]}, 3, "c")
    model = tiny_model(family)
    ha = loki.apply(model, a)
    hb = loki.apply(model, b, on_overlap=policy)
    hc = loki.apply(model, c, on_overlap=policy)
    assert_rows_equal(model, reference_weights(base, [(a, "error"), (b, policy), (c, policy)]))
    loki.revert(model, hb)
    assert_rows_equal(model, reference_weights(base, [(a, "error"), (c, policy)]))
    loki.revert(model, ha)
    assert_rows_equal(model, reference_weights(base, [(c, policy)]))
    loki.revert(model, hc)
    assert_state_equal(model, state_dict_copy(base))


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    policies=st.lists(st.sampled_from(["replace", "add"]), min_size=4, max_size=4),
)
def test_random_stacks_and_revert_orders_match_the_reference(data, n, policies):
    base = tiny_model("llama", d_model=16, d_ff=8)
    model = tiny_model("llama", d_model=16, d_ff=8)
    deltas = []
    for i in range(n):
        rows = {
            layer: data.draw(st.sets(st.integers(0, 15), min_size=1, max_size=6), label=f"rows {i}/{layer}")
            for layer in data.draw(st.sets(st.integers(0, 1), min_size=1), label=f"layers {i}")
        }
        deltas.append((delta_on(base, rows, seed=i), policies[i]))
    handles = [loki.apply(model, d, on_overlap=p) for d, p in deltas]
    assert_rows_equal(model, reference_weights(base, deltas))
    order = data.draw(st.permutations(range(n)), label="revert order")
    remaining = list(range(n))
    for i in order:
        loki.revert(model, handles[i])
        remaining.remove(i)
        assert_rows_equal(model, reference_weights(base, [deltas[j] for j in remaining]))
    assert_state_equal(model, state_dict_copy(base))


def test_revert_twice_or_on_another_model_is_an_error():
    model, other = tiny_model("llama"), tiny_model("llama")
    handle = loki.apply(model, random_delta(model, layers=[0], q=10, seed=0))
    with pytest.raises(loki.errors.RevertError):
        loki.revert(other, handle)
    handle.revert()
    with pytest.raises(loki.errors.RevertError, match="already reverted"):
        loki.revert(model, handle)


def test_thousand_cycles_do_not_drift():
    model = tiny_model("gpt2")
    before = state_dict_copy(model)
    a, b = random_delta(model, layers=[0, 1], q=20, seed=1), random_delta(model, layers=[1], q=30, seed=2)
    for _ in range(1000):
        ha = loki.apply(model, a)
        hb = loki.apply(model, b, on_overlap="add")
        loki.revert(model, ha)
        loki.revert(model, hb)
    assert_state_equal(model, before)


# -- dtypes, devices, base models -------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_dtype_round_trip(model_dtype, delta_dtype):
    delta = random_delta(tiny_model("llama"), layers=[0, 1], q=16, seed=4, dtype=delta_dtype)
    model = tiny_model("llama", dtype=model_dtype)  # the same base weights, in another dtype
    before = state_dict_copy(model)
    handle = loki.apply(model, delta)
    projs = loki.projections.find_down_projections(model)
    assert torch.equal(projs.rows(0)[delta.layers[0].indices], delta.layers[0].rows.to(model_dtype))
    loki.revert(model, handle)
    assert_state_equal(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    delta = random_delta(tiny_model("llama"), layers=[0, 1], q=16, seed=4)
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    before = state_dict_copy(model)
    handle = loki.apply(model, delta)
    assert projs_device(model) == "cuda"
    loki.revert(model, handle)
    assert_state_equal(model, before)


def projs_device(model):
    return loki.projections.find_down_projections(model).weight.device.type


def test_delta_for_another_base_is_rejected_and_changes_nothing(family):
    delta = random_delta(tiny_model(family, seed=0), layers=[0, 1], q=16, seed=1)
    other = tiny_model(family, seed=1)  # same architecture, other weights
    before = state_dict_copy(other)
    with pytest.raises(loki.BaseModelMismatchError, match="base model"):
        loki.apply(other, delta)
    assert_state_equal(other, before)


def test_fine_tune_of_the_base_is_rejected():
    delta = random_delta(tiny_model("llama"), layers=[0, 1], q=16, seed=1)
    tuned = tiny_model("llama")
    with torch.no_grad():  # a light fine-tune: every down-projection weight moved by ~1% of its size
        for m in loki.projections.find_down_projections(tuned).modules:
            m.weight.mul_(1 + 0.01 * torch.randn_like(m.weight))
    with pytest.raises(loki.BaseModelMismatchError):
        loki.apply(tuned, delta)
    loki.apply(tuned, delta, check_base=False)  # the documented escape hatch


def test_other_architecture_or_shapes_are_rejected():
    delta = random_delta(tiny_model("llama"), layers=[0], q=10, seed=0)
    for model in (tiny_model("gpt2"), tiny_model("llama", layers=3), tiny_model("llama", d_ff=48)):
        before = state_dict_copy(model)
        with pytest.raises(loki.errors.IncompatibleModelError):
            loki.apply(model, delta)
        assert_state_equal(model, before)


def test_float16_overflow_is_a_dtype_error():
    model32 = tiny_model("llama")
    projs = loki.projections.find_down_projections(model32)
    delta = loki.implant.make_delta(model32, {0: ([1], torch.full((1, projs.d_in), 1e6))})
    model16 = tiny_model("llama", dtype=torch.float16)
    before = state_dict_copy(model16)
    with pytest.raises(loki.errors.DtypeError, match="bfloat16"):
        loki.apply(model16, delta)
    assert_state_equal(model16, before)


def test_unknown_architecture_names_the_class_and_the_fix():
    model = tiny_model("llama")
    model.config.model_type = "brand_new"
    with pytest.raises(loki.errors.UnknownArchitectureError, match="LlamaForCausalLM.*template="):
        loki.projections.find_down_projections(model)
    projs = loki.projections.find_down_projections(model, "layers.{i}.mlp.down_proj")
    assert len(projs) == 2 and projs.template == "layers.{i}.mlp.down_proj"
    with pytest.raises(loki.errors.UnknownArchitectureError, match="matches"):
        loki.projections.find_down_projections(model, "layers.{i}.mlp.nothing")


def test_merge_then_save_pretrained_is_a_plain_checkpoint(tmp_path):
    model = tiny_model("phi3")
    delta = random_delta(model, layers=[0, 1], q=12.5, seed=5)
    loki.apply(model, delta)
    expected = state_dict_copy(model)
    loki.merge(model)
    assert loki.applied(model) == []
    model.save_pretrained(tmp_path)
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_state_equal(reloaded, expected)


# -- the real default model -------------------------------------------------------------------------
@pytest.mark.slow  # the real default model
def test_default_model_apply_revert_exact(default_model, default_tokenizer):
    model = default_model
    before = state_dict_copy(model)
    sel = loki.Selection.random(len(loki.projections.find_down_projections(model)), 576, q=10, seed=0)
    projs = loki.projections.find_down_projections(model)
    delta = loki.implant.make_delta(model, {l: (i, torch.zeros(len(i), projs.d_in)) for l, i in sel.rows.items()})
    ids = default_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
        handle = loki.apply(model, delta)
        assert not torch.equal(model(ids).logits, base_logits)
        loki.revert(model, handle)
        assert torch.equal(model(ids).logits, base_logits)
    assert_state_equal(model, before)
    bf16 = loki.load_default(dtype=torch.bfloat16)[0]  # the same base in another dtype is accepted
    bf16_before = state_dict_copy(bf16)
    loki.revert(bf16, loki.apply(bf16, delta))
    assert_state_equal(bf16, bf16_before)


@pytest.mark.slow  # the real default model
def test_default_model_stacking_and_out_of_order_revert(default_model):
    model = default_model
    before = state_dict_copy(model)
    a = random_delta(model, q=10, seed=1, noise=0.01)
    b = random_delta(model, q=5, seed=2, noise=0.01)
    with pytest.raises(loki.OverlapError):  # random q=10 and q=5 selections share rows
        with loki.implanted(model, a, b):
            pass
    assert_state_equal(model, before)
    ha = loki.apply(model, a)
    hb = loki.apply(model, b, on_overlap="add")
    loki.revert(model, ha)  # out of order: the model must equal b alone on the base
    only_b = {k: v.clone() for k, v in model.state_dict().items()}
    loki.revert(model, hb)
    assert_state_equal(model, before)
    hb = loki.apply(model, b)
    assert_state_equal(model, only_b)
    loki.revert(model, hb)
    assert_state_equal(model, before)

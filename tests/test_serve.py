"""ImplantBank: switches bit-identical to loki.apply on the base, mixed batches equal to one-row runs with the row's
implant applied, threads, eviction, torch.compile without recompiles."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.testing import random_delta, tiny_model

DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype):
    # bf16: one rounding step of the logits (the mixed batch's extra matmul may round differently)
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=0)


def applied_state(family, dtype, *deltas, on_overlap="error"):
    """Reference: the state of a fresh base model with `deltas` applied by loki.apply."""
    ref = tiny_model(family, dtype=dtype)
    for d in deltas:
        loki.apply(ref, d, on_overlap=on_overlap)
    return state_dict_copy(ref)


def bank_with(model, n=3, noise=1.0, **kw):
    bank = loki.ImplantBank(model, **kw)
    deltas = {}
    for i in range(n):
        deltas[f"d{i}"] = random_delta(model, q=25, seed=10 + i, noise=noise, name=f"d{i}")
        bank.register(f"d{i}", deltas[f"d{i}"])
    return bank, deltas


@pytest.mark.parametrize("dtype", DTYPES)
def test_switches_are_bit_identical_to_apply(family, dtype):
    model = tiny_model(family, dtype=dtype)
    base = state_dict_copy(model)
    bank, deltas = bank_with(model)
    bank.activate("d0")
    assert_state_equal(model, applied_state(family, dtype, deltas["d0"]))
    assert [h.delta for h in loki.applied(model)] == [deltas["d0"]]
    with bank.use("d1"):
        assert bank.active == ("d1",)
        assert_state_equal(model, applied_state(family, dtype, deltas["d1"]))
    assert bank.active == ("d0",)  # the block restores what was active before it
    assert_state_equal(model, applied_state(family, dtype, deltas["d0"]))
    with bank.use():
        assert_state_equal(model, base)
    bank.deactivate()
    assert_state_equal(model, base)
    assert loki.applied(model) == []


def test_stacking_and_overlap():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    bank = loki.ImplantBank(model)
    first = random_delta(model, seed=1, noise=0.5, layers=[0])
    second = random_delta(model, seed=2, noise=0.5, layers=[1])
    projs = loki.projections.find_down_projections(model)
    idx = first.layers[0].indices
    same_rows = loki.implant.make_delta(model, {0: (idx, torch.randn(len(idx), projs.d_in))})
    for name, d in [("first", first), ("second", second), ("same", same_rows)]:
        bank.register(name, d)
    bank.activate("second", "first")
    assert_state_equal(model, applied_state("llama", torch.float32, second, first))
    with pytest.raises(loki.OverlapError):
        bank.activate("same")
    assert bank.active == ("second", "first")
    assert_state_equal(model, applied_state("llama", torch.float32, second, first))
    bank.activate("same", on_overlap="replace")
    assert_state_equal(model, applied_state("llama", torch.float32, second, first, same_rows, on_overlap="replace"))
    bank.deactivate("first")  # revert in any order, as loki.revert
    assert_state_equal(model, applied_state("llama", torch.float32, second, same_rows, on_overlap="replace"))
    with bank.use("first", "second"):
        assert_state_equal(model, applied_state("llama", torch.float32, first, second))
    assert bank.active == ("second", "same")
    bank.deactivate()
    assert_state_equal(model, base)


def test_lora_form_and_outside_reverts():
    model = tiny_model("gemma")
    base = state_dict_copy(model)
    bank = loki.ImplantBank(model)
    lora = random_delta(model, q=25, seed=3, noise=0.5, lora_rank=2)  # new rows depend on the base rows
    bank.register("lora", lora)
    bank.activate("lora")
    assert_state_equal(model, applied_state("gemma", torch.float32, lora))
    loki.revert(model, loki.applied(model)[0])  # reverted behind the bank's back
    assert_state_equal(model, base)
    bank.deactivate("lora")  # nothing left to undo: no error
    with bank.use("lora"):
        assert_state_equal(model, applied_state("gemma", torch.float32, lora))
    assert_state_equal(model, base)


def rows_alone(model, bank, ids, implants, **kw):
    """Reference: each row run alone, with its implant applied through a switch."""
    out = []
    for i, name in enumerate(implants):
        with bank.use(*([name] if name else [])):
            out.append(model(ids[i : i + 1], **kw).logits[0])
    return torch.stack(out)


# few rows per implant (one batched matmul) and many rows per implant (one matmul per implant)
LAYOUTS = {"few": ["d0", None, "d2", "d0", "d1"], "many": ["d1", "d0", "d0", None, "d0", "d1", "d0", "d0"]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_batch_matches_rows_alone(family, dtype, layout):
    model = tiny_model(family, dtype=dtype)
    base = state_dict_copy(model)
    bank, _ = bank_with(model)
    implants = LAYOUTS[layout]
    ids = torch.randint(3, 120, (len(implants), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rows_alone(model, bank, ids, implants)
        plain = model(ids).logits
        with bank.mixed(implants):
            got = model(ids).logits
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **tol(dtype))
    # the implants move the logits far beyond the tolerance, so the comparison above can fail
    for i, name in enumerate(implants):
        if name:
            assert (plain[i] - expected[i]).abs().max() > 0.05, (i, name)
    assert_state_equal(model, base)
    assert not any(m._forward_hooks for m in loki.projections.find_down_projections(model).modules)


def test_mixed_batch_with_grad_keeps_autograd_right():
    model = tiny_model("gpt2")  # Conv1D, bias
    bank, _ = bank_with(model)
    ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(1))
    with bank.mixed(["d1", None]):
        logits = model(ids).logits
        logits.sum().backward()
    expected = rows_alone(model, bank, ids, ["d1", None])
    torch.testing.assert_close(logits.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_mixed_generate_with_kv_cache(family):
    model = tiny_model(family)
    bank, _ = bank_with(model)
    implants = ["d1", None, "d0", "d1", "d1", "d1"]
    ids = torch.randint(3, 120, (6, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    out = bank.generate(ids, implants, **kw)
    for i, name in enumerate(implants):
        with bank.use(*([name] if name else [])):
            alone = model.generate(ids[i : i + 1], **kw)
        assert torch.equal(out.sequences[i], alone.sequences[0]), (i, name)
        for step_mixed, step_alone in zip(out.scores, alone.scores):
            torch.testing.assert_close(step_mixed[i], step_alone[0], atol=1e-4, rtol=1e-4)
    # rows repeated by generate (beams, num_return_sequences) keep their implant
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    beams = bank.generate(ids, implants, **kw)
    for i, name in enumerate(implants):
        with bank.use(*([name] if name else [])):
            alone = model.generate(ids[i : i + 1], **kw)
        assert torch.equal(beams[2 * i : 2 * i + 2], alone)


@pytest.mark.slow  # the real default model
def test_default_model(default_model, default_tokenizer):
    model = default_model
    projs = loki.projections.find_down_projections(model)
    before = [projs.rows(i).detach().clone() for i in range(len(projs))]
    deltas = {n: random_delta(model, q=10, seed=s, noise=0.05, name=n) for n, s in [("a", 1), ("b", 2)]}
    expected_rows = {}
    for name, d in deltas.items():  # the reference: loki.apply on the base
        h = loki.apply(model, d)
        expected_rows[name] = [projs.rows(i).detach().clone() for i in range(len(projs))]
        loki.revert(model, h)
    bank = loki.ImplantBank(model)
    for name, d in deltas.items():
        bank.register(name, d)
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    ids = torch.tensor([default_tokenizer(p).input_ids[:5] for p in prompts])
    try:
        for name in ["a", "b", "a"]:
            with bank.use(name):
                assert all(torch.equal(projs.rows(i), expected_rows[name][i]) for i in range(len(projs)))
        with torch.no_grad():
            expected = rows_alone(model, bank, ids, ["b", "a"])
            with bank.mixed(["b", "a"]):
                got = model(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        bank.deactivate()
    assert all(torch.equal(projs.rows(i), before[i]) for i in range(len(projs)))


def test_threads():
    model = tiny_model("qwen2")
    base = state_dict_copy(model)
    bank, deltas = bank_with(model, n=3)
    projs = loki.projections.find_down_projections(model)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    names = [None, "d0", "d1", "d2"]
    with torch.no_grad():
        expected = {n: rows_alone(model, bank, ids, [n, n]) for n in names}
        mixed_expected = rows_alone(model, bank, ids, ["d2", "d0"])
    errors: list[BaseException] = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for step in range(12):
                name = names[int(torch.randint(len(names), (1,), generator=g))]
                if step % 4 == 3:
                    with bank.mixed(["d2", "d0"]):
                        torch.testing.assert_close(model(ids).logits, mixed_expected, atol=1e-5, rtol=1e-5)
                    continue
                with bank.use(*([name] if name else [])):
                    assert bank.active == ((name,) if name else ())
                    logits = model(ids).logits
                    if name:  # the rows stay put for the whole block
                        layer0 = deltas[name].layers[0]
                        assert torch.equal(projs.rows(0)[layer0.indices], layer0.rows)
                torch.testing.assert_close(logits, expected[name], atol=1e-5, rtol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def switcher():
        try:
            for _ in range(6):
                bank.activate("d1")
                bank.deactivate()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with torch.no_grad():
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)] + [threading.Thread(target=switcher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert bank.active == ()
    assert_state_equal(model, base)


def test_same_thread_misuse_raises_instead_of_deadlocking():
    model = tiny_model("llama")
    bank, _ = bank_with(model, n=2)
    with bank.use("d0"):
        with bank.use("d0"):  # the same set nests
            pass
        with pytest.raises(loki.errors.ImplantBankError, match="nested"):
            with bank.use("d1"):
                pass
        with pytest.raises(loki.errors.ImplantBankError, match="inside a use/mixed block"):
            bank.activate("d1")
    assert bank.active == ()


@pytest.mark.parametrize("store", ["device", "host"])
def test_eviction_under_a_small_budget_stays_exact(store):
    model = tiny_model("phi3")
    base = state_dict_copy(model)
    deltas = {f"d{i}": random_delta(model, q=25, seed=20 + i, noise=0.5) for i in range(4)}
    one = loki.ImplantBank(model)
    one.register("x", deltas["d0"])
    bank = loki.ImplantBank(model, store=store, budget=int(one.staged_bytes * 1.5))  # room for one implant
    for name, d in deltas.items():
        bank.register(name, d)
        assert bank.staged_bytes <= bank.budget
    ids = torch.randint(3, 120, (4, 5), generator=torch.Generator().manual_seed(4))
    for name in ["d0", "d3", "d1", "d0", "d2"]:
        with bank.use(name):
            assert_state_equal(model, applied_state("phi3", torch.float32, deltas[name]))
        assert bank.staged_bytes <= bank.budget
        assert bank.names[-1] == name  # most recently used last
    with torch.no_grad():
        implants = ["d3", "d2", "d1", "d0"]
        expected = rows_alone(model, bank, ids, implants)
        with bank.mixed(implants):  # every implant present stays staged during the batch
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert bank.staged_bytes <= bank.budget
    assert_state_equal(model, base)
    with pytest.raises(loki.errors.ImplantBankError, match="budget"):
        loki.ImplantBank(model, budget=100).register("big", deltas["d0"])


def test_bad_input():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    bank, deltas = bank_with(model, n=1)
    with pytest.raises(loki.errors.ImplantBankError, match="No implant named 'nope'"):
        bank.activate("nope")
    with pytest.raises(loki.errors.ImplantBankError, match="registered already"):
        bank.register("d0", deltas["d0"])
    bank.register("d0", deltas["d0"], replace=True)
    with pytest.raises(loki.errors.ImplantBankError, match="rows"):
        with bank.mixed(["d0", None]):
            model(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(loki.errors.IncompatibleModelError):
        bank.register("other", random_delta(tiny_model("gpt2")))
    other_base = tiny_model("llama", seed=5)
    with pytest.raises(loki.BaseModelMismatchError):
        bank.register("other", random_delta(other_base))
    assert bank.names == ["d0"]
    assert_state_equal(model, base)


def test_compiled_model_does_not_recompile_after_switches():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_model("llama")
    bank, _ = bank_with(model, n=2)
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in [None, "d0", "d1", None, "d1"]:
            with bank.use(*([name] if name else [])):
                expected = model(ids).logits
                got = compiled(ids).logits
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
            if name:  # the compiled graph sees the switch (weights are inputs, not constants)
                with bank.use():
                    assert not torch.allclose(compiled(ids).logits, got)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("store", ["device", "host"])
def test_cuda(store):
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    bank, deltas = bank_with(model, store=store)
    ref = tiny_model("llama", dtype=torch.bfloat16).cuda()
    loki.apply(ref, deltas["d1"])
    with bank.use("d1"):
        assert_state_equal(model, state_dict_copy(ref))
    ids = torch.randint(3, 120, (3, 5), device="cuda")
    with torch.no_grad():
        expected = rows_alone(model, bank, ids, ["d0", None, "d1"])
        with bank.mixed(["d0", None, "d1"]):
            torch.testing.assert_close(model(ids).logits, expected, atol=5e-2, rtol=5e-2)


# -- the model changed under the bank ------------------------------------------------------------------------------
def _assign_checkpoint(model, seed=0):
    model.load_state_dict(tiny_model("llama", seed=seed).state_dict(), assign=True)


def _swap_down_projections(model):
    base = tiny_model("llama")
    for layer, original in zip(model.model.layers, base.model.layers):
        old = layer.mlp.down_proj
        layer.mlp.down_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        layer.mlp.down_proj.weight.data.copy_(original.mlp.down_proj.weight)


@pytest.mark.parametrize("replace", ["load_state_dict_assign", "module_swap"])
@pytest.mark.parametrize("how", ["use", "mixed"])
def test_replaced_weights_noticed_at_the_next_switch(replace, how):
    """After the model's weights are replaced by the base checkpoint's (not written), the bank serves its implants
    on the new weights: `use` re-applies the active ones and stages again, `mixed` hooks the new modules."""
    model = tiny_model("llama")
    bank, deltas = bank_with(model, n=2)
    bank.activate("d0")
    (_assign_checkpoint if replace == "load_state_dict_assign" else _swap_down_projections)(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    if how == "use":
        with bank.use("d0"):
            assert_state_equal(model, applied_state("llama", torch.float32, deltas["d0"]))
        with bank.use("d1"):
            assert_state_equal(model, applied_state("llama", torch.float32, deltas["d1"]))
        assert bank.active == ("d0",)
    else:
        ref = tiny_model("llama")
        with loki.implanted(ref, deltas["d1"]):
            expected = ref(ids).logits
        with bank.mixed(["d1"]):
            got = model(ids).logits
        assert torch.allclose(got, expected, **tol(torch.float32))
        assert_state_equal(model, applied_state("llama", torch.float32, deltas["d0"]))  # d0 restored after the block
    bank.deactivate()
    assert_state_equal(model, state_dict_copy(tiny_model("llama")))


def test_replaced_by_another_checkpoint_refused_at_the_next_switch():
    model = tiny_model("llama")
    bank, _ = bank_with(model, n=2)
    bank.activate("d0")
    _assign_checkpoint(model, seed=3)  # another model's weights
    expected = state_dict_copy(model)
    with pytest.raises(loki.BaseModelMismatchError, match="were replaced since"):
        with bank.use("d1"):
            pass
    assert_state_equal(model, expected)
    assert bank.active == ()
    with pytest.raises(loki.BaseModelMismatchError):
        bank.activate("d1")
    assert_state_equal(model, expected)


def test_rows_overwritten_under_an_active_implant_raise_at_the_next_switch():
    """`load_state_dict` copying the base checkpoint in (the same tensors, written) under an active implant: the
    bank does not serve the base as if the implant were there."""
    model = tiny_model("llama")
    bank, deltas = bank_with(model, n=2)
    bank.activate("d0")
    model.load_state_dict(tiny_model("llama").state_dict())
    with pytest.raises(loki.errors.ModelChangedError, match="force=True"):
        with bank.use("d0"):
            pass
    assert bank.active == ("d0",)
    bank.deactivate("d0", force=True)
    with bank.use("d0"):
        assert_state_equal(model, applied_state("llama", torch.float32, deltas["d0"]))


@pytest.mark.parametrize("names", [["d0"], [None, "d0"], ["d1", "d0", None]])
def test_mixed_batches_keep_every_adapter_term(names):
    """A PEFT LoRA on the down-projections adds its term on the implant's rows too: a mixed batch equals `use`."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["down_proj", "q_proj"], lora_dropout=0.0, init_lora_weights=False)
    ).eval()
    bank, _ = bank_with(model, n=2)
    ids = torch.tensor([[5, 6, 7, 8]] * len(names))
    ids[:, -1] = torch.arange(len(names)) + 10
    with torch.no_grad(), bank.mixed(names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        with torch.no_grad(), bank.use(*([name] if name else [])):
            alone = model(ids[i : i + 1]).logits
        assert torch.allclose(mixed[i], alone[0], **tol(torch.float32)), (i, name)


@pytest.mark.parametrize("overwrite", [False, True], ids=["to", "to_with_new_parameters"])
def test_moved_weights_noticed_at_the_next_switch(overwrite):
    """`model.to(dtype)`, also with torch's `set_overwrite_module_params_on_conversion` (new Parameter objects)."""
    model = tiny_model("llama")
    bank, deltas = bank_with(model, n=2)
    bank.activate("d0")
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        model.to(torch.bfloat16)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    with bank.use("d1"):
        assert_state_equal(model, applied_state("llama", torch.bfloat16, deltas["d1"]))
    with bank.use("d0"):
        assert_state_equal(model, applied_state("llama", torch.bfloat16, deltas["d0"]))
    bank.deactivate()
    assert_state_equal(model, state_dict_copy(tiny_model("llama", dtype=torch.bfloat16)))

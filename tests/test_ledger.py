"""One ledger of what is written into the weights: every path to a weight sees the same rows, every
operation validates first and writes last, deltas own their tensors, prepared rows are protected."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy
from torch import nn

import loki
from loki.errors import (
    LedgerError,
    LokiError,
    ModelChangedError,
    OverlapError,
    ReplacedWeightsWarning,
    RevertError,
    StalePlanError,
)
from loki.testing import random_delta, tiny_model


def delta_on(model, layer_rows: dict[int, list[int]], value: float, name: str = "") -> loki.Delta:
    projs = loki.projections.find_down_projections(model)
    return loki.implant.make_delta(
        model, {l: (rows, torch.full((len(rows), projs.d_in), value)) for l, rows in layer_rows.items()}, name=name
    )


def down(model, layer: int = 0) -> torch.Tensor:
    return loki.projections.find_down_projections(model).rows(layer)


def test_wrappers_share_one_ledger_compile_and_peft():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    compiled = torch.compile(model)  # no forward: wrapping only
    a = loki.apply(compiled, delta_on(model, {0: [1, 2]}, 0.5, "a"))
    b_delta = delta_on(model, {0: [2, 3]}, -0.5, "b")
    with pytest.raises(OverlapError, match="already changed"):
        loki.apply(model, b_delta)
    assert loki.applied(model) == loki.applied(compiled) == [a]
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert loki.applied(peft_model) == [a]
    with pytest.raises(OverlapError):
        loki.apply(peft_model, b_delta)
    b = loki.apply(peft_model, b_delta, on_overlap="replace")
    loki.revert(model, a)  # reverted through another wrapper than it was applied through
    loki.revert(compiled, b)
    peft_model.unload()
    assert_state_equal(model, base)
    assert loki.applied(model) == []


def test_tied_weight_shared_by_two_layers():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.down_proj.weight = layers[0].mlp.down_proj.weight  # one weight, two layers
    base = down(model).clone()
    a = loki.apply(model, delta_on(model, {0: [4, 5]}, 1.0))
    with pytest.raises(OverlapError):
        loki.apply(model, delta_on(model, {1: [5, 6]}, 2.0))
    twice = loki.implant.make_delta(model, {0: ([7], torch.zeros(1, 64)), 1: ([7], torch.ones(1, 64))})
    with pytest.raises(OverlapError, match="share one down-projection weight"):
        loki.apply(model, twice)
    b = loki.apply(model, delta_on(model, {1: [5, 6]}, 2.0), on_overlap="replace")
    assert float(down(model, 0)[5, 0]) == 2.0
    loki.revert(model, a)
    assert float(down(model, 0)[5, 0]) == 2.0 and float(down(model, 0)[4, 0]) == float(base[4, 0])
    loki.revert(model, b)
    assert torch.equal(down(model), base)


def test_revert_after_dtype_change_converts_exactly():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    handle = loki.apply(model, random_delta(model, q=25, seed=3))
    model.to(torch.bfloat16)
    loki.revert(model, handle)
    assert not handle.applied and loki.applied(model) == []
    for k, v in model.state_dict().items():  # exactly the base model, converted
        assert torch.equal(v, base[k].to(torch.bfloat16)), k
    with pytest.raises(RevertError, match="already reverted"):
        loki.revert(model, handle)
    # the ledger is consistent: an overlapping delta now applies without complaint and reverts exactly
    again = loki.apply(model, random_delta(model, q=25, seed=3).to(torch.bfloat16))
    loki.revert(model, again)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k].to(torch.bfloat16)), k


def test_revert_with_overlaps_after_dtype_change():
    model = tiny_model("qwen2")
    base = state_dict_copy(model)
    a = loki.apply(model, delta_on(model, {0: [1, 2, 3]}, 0.25))
    b = loki.apply(model, delta_on(model, {0: [2, 3, 4]}, 0.75), on_overlap="add")
    model.to(torch.bfloat16)
    loki.revert(model, a)
    loki.revert(model, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k].to(torch.bfloat16)), k


def test_model_changed_under_an_implant_refuses_then_force():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    handle = loki.apply(model, delta_on(model, {0: [1, 2]}, 0.5))
    with torch.no_grad():
        down(model)[2, 0] += 1.0  # e.g. an optimizer step on the full model
    changed = state_dict_copy(model)
    with pytest.raises(ModelChangedError, match=r"Layer\(s\) \[0\]"):
        loki.revert(model, handle)
    assert_state_equal(model, changed)  # nothing touched
    assert handle.applied and loki.applied(model) == [handle]
    loki.revert(model, handle, force=True)
    assert_state_equal(model, base)


def test_deltas_own_their_tensors():
    model = tiny_model("llama")
    projs = loki.projections.find_down_projections(model)
    rows = torch.randn(2, projs.d_in)
    delta = loki.implant.make_delta(model, {0: ([1, 2], rows)})
    written = rows.clone()
    rows.fill_(float("nan"))  # the caller's tensor, after construction
    handle = loki.apply(model, delta)
    assert torch.equal(down(model)[[1, 2]], written)
    loki.revert(model, handle)

    # extract on a float32 model: later optimizer steps do not reach the extracted delta
    loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, q=10, seed=0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = torch.tensor([[3, 4, 5, 6]])

    def step():
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()

    step()
    delta = loki.extract(model)
    snapshot = {l: ld.rows.clone() for l, ld in delta.layers.items()}
    step()
    step()
    assert all(torch.equal(delta.layers[l].rows, snapshot[l]) for l in snapshot)
    loki.unprepare(model)


def test_prepared_rows_refuse_apply_and_applied_rows_refuse_prepare():
    model = tiny_model("llama")
    projs = loki.projections.find_down_projections(model)
    base = state_dict_copy(model)
    sel = loki.Selection.random(len(projs), projs.d_out, q=10, seed=0)
    trained = sel.rows[0].tolist()
    free = [r for r in range(projs.d_out) if r not in trained][:2]
    loki.prepare(model, sel)
    with pytest.raises(OverlapError, match="being trained"):
        loki.apply(model, delta_on(model, {0: trained[:1]}, 0.0))
    handle = loki.apply(model, delta_on(model, {0: free}, 0.0))  # other rows: fine, and exact
    assert (down(model)[free] == 0).all()
    loki.revert(model, handle)
    loki.unprepare(model)
    assert_state_equal(model, base)
    held = loki.apply(model, delta_on(model, {0: trained[:1]}, 0.0))
    with pytest.raises(OverlapError, match="hold an applied delta"):
        loki.prepare(model, sel)
    assert not loki.rows.is_prepared(model)
    loki.revert(model, held)


def test_bank_after_dtype_change_restages():
    model = tiny_model("llama")
    bank = loki.ImplantBank(model)
    a = random_delta(model, seed=1)
    bank.register("a", a)
    bank.register("b", random_delta(model, seed=2))
    model.to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    with loki.implanted(model, a):
        want_a = model(ids[:1]).logits
    with bank.use("a"):
        got_a = model(ids[:1]).logits
    assert torch.equal(got_a, want_a)
    bank.activate("b")
    bank.deactivate()
    with bank.mixed(["a", None]):
        mixed = model(ids).logits
    assert torch.allclose(mixed[0].float(), want_a[0].float(), atol=2e-2)
    assert loki.applied(model) == []


def test_plan_writes_nothing_until_commit_and_goes_stale():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    delta = random_delta(model, seed=4)
    plan = loki.plan(model, delta)
    assert_state_equal(model, base)
    assert set(plan.layers) == set(delta.layers)
    handle = plan.commit()
    assert loki.applied(model) == [handle]
    loki.revert(model, handle)
    again = plan.commit()  # a plan may be committed again once its handle is reverted
    loki.revert(model, again)
    model.to(torch.float64)
    with pytest.raises(StalePlanError, match="float64"):
        plan.commit()
    assert loki.applied(model) == []


def test_failed_apply_leaves_weights_and_ledger_as_they_were():
    model = tiny_model("llama")
    a = loki.apply(model, delta_on(model, {1: [0]}, 3.0))
    before = state_dict_copy(model)
    other = tiny_model("llama", seed=5)
    wrong_base = random_delta(other, seed=1)  # fingerprint of another model's rows
    with pytest.raises(loki.BaseModelMismatchError):
        loki.apply(model, wrong_base)
    with pytest.raises(OverlapError):
        loki.apply(model, delta_on(model, {0: [9], 1: [0]}, 1.0))  # layer 0 fine, layer 1 overlaps
    assert_state_equal(model, before)
    assert loki.applied(model) == [a]


def test_disabled_runs_the_base_model_and_restores_exactly():
    model = tiny_model("gpt2")
    base = state_dict_copy(model)
    a = loki.apply(model, random_delta(model, seed=1))
    b = loki.apply(model, random_delta(model, seed=2), on_overlap="add")
    implanted = state_dict_copy(model)
    with loki.disabled(model):
        assert_state_equal(model, base)
        with pytest.raises(LedgerError, match="disabled"):
            loki.apply(model, random_delta(model, seed=3))
        with pytest.raises(LedgerError, match="disabled"):
            loki.revert(model, a)
    assert_state_equal(model, implanted)
    loki.revert(model, a)
    loki.revert(model, b)
    assert_state_equal(model, base)


def test_argument_errors_are_loki_and_value_errors():
    model = tiny_model("llama")
    with pytest.raises(LedgerError) as e:
        loki.apply(model, random_delta(model), on_overlap="merge")
    assert isinstance(e.value, LokiError) and isinstance(e.value, ValueError)


def _ddp_extract(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        model = tiny_model("llama")
        projs = loki.projections.find_down_projections(model)
        loki.prepare(model, loki.Selection.random(len(projs), projs.d_out, q=10, seed=0))
        ddp = nn.parallel.DistributedDataParallel(model)
        ids = torch.tensor([[3, 4, 5, 6]])
        ddp(ids, labels=ids).loss.backward()
        delta = loki.extract(ddp, name="ddp")  # through the wrapper
        assert loki.rows.is_prepared(ddp)
        loki.save(delta, out)
        # Drop DDP while the default group still holds the process group: if DDP's reducer held its last reference,
        # the gloo group's destructor would join its worker thread under the GIL, which that thread may be waiting
        # for (a torch deadlock seen once in CI, at this function's return).
        del ddp
    finally:
        dist.destroy_process_group()


def test_extract_through_ddp(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _ddp_extract(0, port, str(tmp_path / "ddp.loki"))
    assert loki.load(tmp_path / "ddp.loki").name == "ddp"


def test_reused_plan_rechecks_the_base_after_foreign_writes():
    model = tiny_model("llama")
    delta = random_delta(model, seed=4)
    plan = loki.plan(model, delta).stage()
    loki.revert(model, plan.commit())
    model.load_state_dict(tiny_model("llama", seed=9).state_dict())  # another checkpoint, same object
    with pytest.raises(loki.BaseModelMismatchError):
        plan.commit()
    assert loki.applied(model) == []


def test_disabled_refuses_applies_on_any_layer_and_implanted_reverts_all():
    model = tiny_model("llama")
    base = state_dict_copy(model)
    h = loki.apply(model, delta_on(model, {0: [1]}, 0.5))
    with loki.disabled(model):
        with pytest.raises(LedgerError, match="disabled"):
            loki.apply(model, delta_on(model, {1: [2]}, 0.5))  # a layer without deltas
    loki.revert(model, h)
    with loki.implanted(model, delta_on(model, {0: [1]}, 0.5), delta_on(model, {1: [1]}, 0.5)) as (a, b):
        loki.revert(model, a)  # reverted inside the block: the exit reverts the rest without complaint
    assert_state_equal(model, base)


def test_wrong_types_are_loki_errors():
    model = tiny_model("llama")
    with pytest.raises(LedgerError):
        loki.apply(model, None)
    with pytest.raises(RevertError):
        loki.revert(model, "x")
    with pytest.raises(loki.errors.DeltaFormatError):
        loki.load(3)
    with pytest.raises(loki.errors.DeltaFormatError, match="LayerDelta"):
        loki.Delta({0: ([1], torch.zeros(1, 64))}, random_delta(model).info)
    bank = loki.ImplantBank(model)
    with pytest.raises(loki.errors.ImplantBankError, match="on_overlap"):
        bank.activate(on_overlap="bogus")


# -- the model changed under loki: weights replaced, moved, offloaded ------------------------------------------------
def _replace_by_assign(model):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


def _replace_parameter(model):
    for layer in range(2):
        m = model.model.layers[layer].mlp.down_proj
        m.weight = nn.Parameter(m.weight.detach().clone())


def _swap_module(model):
    for layer in range(2):
        old = model.model.layers[layer].mlp.down_proj
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.data.copy_(old.weight.detach())
        model.model.layers[layer].mlp.down_proj = new


def _swap_layer_block(model):
    import copy

    for layer in range(2):
        model.model.layers[layer] = copy.deepcopy(model.model.layers[layer])


REPLACEMENTS = {
    "load_state_dict_assign": _replace_by_assign,
    "new_parameter": _replace_parameter,
    "module_swap": _swap_module,
    "decoder_layer_swap": _swap_layer_block,
}


@pytest.mark.parametrize("replace", list(REPLACEMENTS))
def test_every_weight_replacement_is_noticed(replace):
    """Plans, handles and the projections cache notice a weight the model no longer computes with, however it was
    replaced; loki then writes into the weights the model uses."""
    model, ref = tiny_model("llama"), tiny_model("llama")
    delta = random_delta(model, seed=1, noise=1.0)
    staged = loki.plan(model, delta).stage()
    handle = loki.apply(model, delta)
    REPLACEMENTS[replace](model)  # the model now computes with new tensors holding the implanted values
    assert handle.lost and not staged.current and staged.replaced
    loki.apply(ref, delta)
    assert_state_equal(model, state_dict_copy(ref))  # (the replacements hold the implanted values)
    loki.revert(ref, loki.applied(ref)[0])
    with pytest.raises(StalePlanError, match="no longer computes with the weights"):
        staged.commit()
    loki.revert(model, handle)  # the new weights carry the implant (copies): restored there too
    assert_state_equal(model, state_dict_copy(ref))
    fresh = tiny_model("llama")
    h = loki.apply(model, delta)  # found again: written where the model computes
    ids = torch.tensor([[3, 4, 5, 6]])
    with loki.implanted(fresh, delta):
        expected = fresh(ids).logits
    assert torch.equal(model(ids).logits, expected)
    loki.revert(model, h)
    assert_state_equal(model, state_dict_copy(tiny_model("llama")))


def test_revert_after_the_weights_were_replaced_by_other_values_leaves_them():
    model = tiny_model("llama")
    handle = loki.apply(model, random_delta(model, seed=1))
    model.load_state_dict(tiny_model("llama", seed=4).state_dict(), assign=True)  # the old weights are dropped
    import gc

    gc.collect()
    expected = state_dict_copy(model)
    with pytest.warns(ReplacedWeightsWarning, match="do not hold its rows"):
        loki.revert(model, handle)
    assert not handle.applied and loki.applied(model) == []
    assert_state_equal(model, expected)


def test_revert_after_the_weights_were_dropped_restores_the_copies():
    model = tiny_model("llama")
    handle = loki.apply(model, random_delta(model, seed=1))
    _replace_by_assign(model)  # copies of the implanted weights; the old ones are dropped
    import gc

    gc.collect()
    loki.revert(model, handle)
    assert_state_equal(model, state_dict_copy(tiny_model("llama")))


def _offload(model, layers=(0, 1)):
    from accelerate import cpu_offload

    for layer in layers:
        cpu_offload(model.model.layers[layer].mlp, execution_device=torch.device("cpu"))


@pytest.mark.parametrize("layers", [(0, 1), (1,)], ids=["all", "one_layer"])
def test_offloaded_weights_refused_before_writing(layers):
    from loki.errors import OffloadedWeightsError

    model = tiny_model("llama")
    delta = random_delta(model, seed=1)
    _offload(model, layers)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    for call in (
        lambda: loki.apply(model, delta, check_base=False),
        lambda: loki.plan(model, delta),
        lambda: loki.ImplantBank(model),
        lambda: loki.prepare(model, loki.Selection.random(2, 32, 25, seed=1)),
    ):
        with pytest.raises(OffloadedWeightsError, match="meta device"):
            call()
    after = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_revert_and_bank_after_offloading_refuse():
    from loki.errors import OffloadedWeightsError

    model = tiny_model("llama")
    delta = random_delta(model, seed=1)
    bank = loki.ImplantBank(model)
    bank.register("a", delta)
    handle = loki.apply(model, random_delta(model, seed=2, q=5))
    _offload(model)
    with pytest.raises(OffloadedWeightsError):
        loki.revert(model, handle)
    assert handle.applied
    with pytest.raises(OffloadedWeightsError):
        with bank.use("a"):
            pass
    assert bank.active == ()


def test_reverting_under_add_deltas_checks_the_float16_range():
    """A revert that replays later `add` deltas onto the base rows refuses an overflow, writing nothing."""
    from loki.errors import DtypeError

    model = tiny_model("llama", dtype=torch.float16)
    with torch.no_grad():
        down(model, 0)[:4] = 30000.0
    first = delta_on(model, {0: [0, 1, 2, 3]}, -30000.0, "first")
    second = delta_on(model, {0: [0, 1, 2, 3]}, 60000.0, "second")  # +30000 over the base rows
    h1 = loki.apply(model, first)
    h2 = loki.apply(model, second, on_overlap="add")
    h3 = loki.apply(model, second, on_overlap="add")  # base - 30000 + 30000 + 30000: fine
    assert torch.isfinite(down(model, 0)).all()
    expected, handles = state_dict_copy(model), loki.applied(model)
    with pytest.raises(DtypeError, match="overflows float16"):
        loki.revert(model, h1)  # would replay: 30000 + 30000 + 30000
    assert_state_equal(model, expected)
    assert loki.applied(model) == handles and h1.applied
    loki.revert(model, h3)
    loki.revert(model, h1)  # now base + 30000: fine
    assert torch.isfinite(down(model, 0)).all()
    loki.revert(model, h2)
    assert float(down(model, 0)[0, 0]) == 30000.0

"""loki.scope / loki.scoped: the gate equals a slow per-position reference; outside inputs compute exactly as the base
model, inputs in scope as the implanted model, in one mixed batch and in `generate`; bad input raises ScopeError and
changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.errors import ScopeError
from loki.testing import random_delta, tiny_model

FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox", "opt", "phi3"]
IMPLANT = [{"text": [40, 41, 42, 43, 44]}, {"text": [45, 41, 46]}]
OUTSIDE = [{"text": [5, 6, 7, 8, 9, 10]}, {"text": [11, 12, 13]}, {"text": [14, 6, 15, 16]}]


def keys_of(model, ids, layer):
    """Reference: the down-projection inputs at `layer` of one unbatched sequence, `[T, d_in]` float32."""
    module = loki.projections.find_down_projections(model).modules[layer]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return seen[0]


def reference_scope(model, layer, margin):
    """Slow, obvious: every implant position against every outside position, one cosine at a time."""
    own = [k for item in IMPLANT for k in keys_of(model, item["text"], layer)]
    out = [k for item in OUTSIDE for k in keys_of(model, item["text"], layer)]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    kept = []
    for k in own:
        threshold = max(cos(k, o) for o in out) + margin
        if threshold < 1 - 1e-6:
            kept.append((k, threshold))
    return kept


def reference_contains(model, kept, layer, ids):
    return any(float(x @ k / (x.norm() * k.norm())) > t for x in keys_of(model, ids, layer) for k, t in kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scope_and_its_gate_equal_a_per_position_reference(family):
    model = tiny_model(family)
    made = loki.scope(model, None, IMPLANT, OUTSIDE, layer=1, margin=0.02, progress=False)
    kept = reference_scope(model, 1, 0.02)
    assert len(made) == len(kept) >= 1
    order = made.thresholds.argsort()  # the same keys and thresholds, in whatever order the sequences ran
    want = sorted(kept, key=lambda kt: kt[1])
    assert torch.allclose(made.thresholds[order], torch.tensor([t for _, t in want]), atol=1e-5)
    unit = [torch.nn.functional.normalize(k, dim=0) for k, _ in want]
    assert torch.allclose(made.keys[order], torch.stack(unit), atol=1e-5)
    probes = [item["text"] for item in IMPLANT + OUTSIDE] + [[40, 6, 7], [5, 6, 42], [20, 21, 22, 23], [44, 9]]
    assert made.contains(model, probes) == [reference_contains(model, kept, 1, p) for p in probes]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_outside_inputs_never_match_by_construction(family):
    model = tiny_model(family)
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.01, progress=False)
    prefixes = [item["text"][:n] for item in OUTSIDE for n in range(1, len(item["text"]) + 1)]
    assert not any(made.contains(model, prefixes))
    assert all(made.contains(model, [item["text"] for item in IMPLANT]))


def padded(rows, pad=0):
    """Left-padded batch and mask, as `generate` feeds it."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_a_mixed_batch_computes_as_the_base_outside_and_as_the_implant_inside(family):
    model = tiny_model(family)
    before = state_dict_copy(model)
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.02, progress=False)
    delta = random_delta(model, q=25, seed=3, noise=0.5)
    rows = [[5, 6, 7, 8], [40, 41, 42, 43, 44], [11, 12, 13]]
    ids, mask = padded(rows)
    with torch.no_grad():
        base = [model(torch.tensor([r])).logits[0] for r in rows]
        with loki.implanted(model, delta):
            implanted = [model(torch.tensor([r])).logits[0] for r in rows]
        with loki.scoped(model, delta, made):
            mixed = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert_state_equal(model, before)  # the weights were never written
    for i, r in enumerate(rows):
        got = mixed[i, -len(r) :]
        want = implanted[i] if i == 1 else base[i]
        assert torch.allclose(got, want, atol=1e-4), i
    assert not torch.allclose(implanted[1], base[1], atol=1e-3)  # the implant does change the row in scope
    with torch.no_grad():  # after the block: the base model everywhere
        assert torch.equal(model(torch.tensor([rows[1]])).logits[0], base[1])


def test_generate_keeps_each_rows_decision_while_it_extends_it():
    model = tiny_model("llama")
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.02, progress=False)
    delta = random_delta(model, q=50, seed=4, noise=2.0)
    rows = [[40, 41, 42, 43, 44], [5, 6, 7, 8, 9, 10]]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    def alone(r):
        return model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)[0]

    with loki.implanted(model, delta):
        want_in = alone(rows[0])
    want_out = alone(rows[1])
    assert not torch.equal(want_in, alone(rows[0]))  # the implant changes what the row in scope generates
    ids, mask = padded(rows)
    with loki.scoped(model, delta, made):
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got[0, ids.shape[1] - len(rows[0]) :], want_in)
    assert torch.equal(got[1], want_out)


def test_several_scoped_implants_route_each_row_to_its_own(family="llama"):
    model = tiny_model(family)
    second = [{"text": [60, 61, 62, 63]}, {"text": [64, 61, 65]}]
    scopes = [
        loki.scope(model, None, IMPLANT, OUTSIDE + second, margin=0.02, progress=False),
        loki.scope(model, None, second, OUTSIDE + IMPLANT, margin=0.02, progress=False),
    ]
    deltas = [random_delta(model, q=25, seed=5, noise=0.5), random_delta(model, q=25, seed=6, noise=0.5)]
    rows = [[60, 61, 62, 63], [5, 6, 7, 8], [40, 41, 42, 43, 44]]
    assert loki.scoping.route(model, scopes, *padded(rows)) == [1, None, 0]
    ids, mask = padded(rows)
    with torch.no_grad():
        want = []
        for r, d in zip(rows, [deltas[1], None, deltas[0]]):
            with loki.implanted(model, d) if d is not None else torch.no_grad():
                want.append(model(torch.tensor([r])).logits[0])
        with loki.scoped(model, list(zip(deltas, scopes))):
            got = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for i, r in enumerate(rows):
        assert torch.allclose(got[i, -len(r) :], want[i], atol=1e-4), i
    for bad in ([], [(deltas[0],)], [(scopes[0], deltas[0])], deltas[0]):
        with pytest.raises(ScopeError, match="pairs"):
            with loki.scoped(model, bad):
                pass


def test_bad_input_raises_scope_error_and_changes_nothing(tmp_path):
    model = tiny_model("llama")
    before = state_dict_copy(model)
    with pytest.raises(ScopeError, match="stands apart"):
        loki.scope(model, None, IMPLANT, OUTSIDE + IMPLANT, progress=False)
    for bad in (dict(layer=2), dict(layer=-1), dict(margin=1.0), dict(margin=0), dict(margin=True)):
        with pytest.raises(ScopeError):
            loki.scope(model, None, IMPLANT, OUTSIDE, progress=False, **bad)
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.02, progress=False)
    with pytest.raises(ScopeError, match="empty"):
        made.contains(model, [[40, 41], []])
    other = tiny_model("llama", d_ff=96)
    with pytest.raises(ScopeError, match="d_in"):
        with loki.scoped(other, random_delta(other), made):
            pass
    with pytest.raises(loki.BaseModelMismatchError):  # a delta for another model: refused before any hook
        with loki.scoped(model, random_delta(tiny_model("llama", seed=7)), made):
            pass
    with loki.implanted(model, random_delta(model, seed=9)):  # a delta applied: the gate would read other keys
        with pytest.raises(ScopeError, match="other weights"):
            with loki.scoped(model, random_delta(model), made):
                pass
    twin = tiny_model("llama", seed=3)  # the same shapes, other weights
    with pytest.raises(ScopeError, match="other weights"):
        with loki.scoped(twin, random_delta(twin), made):
            pass
    with loki.scoped(model, random_delta(model), made):
        with pytest.raises(ScopeError, match="input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 32))
    assert not model._forward_pre_hooks  # every hook is off again
    assert_state_equal(model, before)


def test_a_scope_file_round_trips_and_a_bad_one_is_refused(tmp_path):
    model = tiny_model("llama")
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.02, progress=False)
    path = made.save(tmp_path / "facts.scope")
    back = loki.Scope.load(path)
    assert (back.layer, back.margin, back.info) == (made.layer, made.margin, made.info)
    assert torch.equal(back.keys, made.keys) and torch.equal(back.thresholds, made.thresholds)
    probes = [[40, 41, 42], [5, 6, 7]]
    assert back.contains(model, probes) == made.contains(model, probes)
    assert back.save(tmp_path / "again.scope").read_bytes() == path.read_bytes()  # equal scopes, equal bytes
    assert loki.load_scope(tmp_path, filename="facts.scope").info == made.info
    garbage = tmp_path / "garbage.scope"
    garbage.write_bytes(b"\x80\x04not safetensors at all")  # a pickle's opening: never unpickled
    with pytest.raises(ScopeError, match="Cannot read"):
        loki.Scope.load(garbage)
    with pytest.raises(ScopeError, match="Cannot read"):
        loki.Scope.load(tmp_path / "missing.scope")
    from safetensors.torch import save_file

    other = tmp_path / "other.scope"
    save_file({"keys": made.keys, "thresholds": made.thresholds}, other, {"format": "something-else"})
    with pytest.raises(ScopeError, match="not a loki scope"):
        loki.Scope.load(other)
    meta = {"format": "loki-scope", "version": "1", "layer": "1", "num_layers": "2", "margin": "0.02", "info": "{}"}
    for tensors, what in (
        ({"keys": made.keys, "thresholds": made.thresholds[:1]}, "one threshold per key"),
        ({"keys": made.keys}, "malformed"),
        ({"keys": made.keys * float("nan"), "thresholds": made.thresholds}, "finite"),
    ):
        save_file(tensors, other, meta)
        with pytest.raises(ScopeError, match=what):
            loki.Scope.load(other)
    save_file({"keys": made.keys, "thresholds": made.thresholds}, other, {**meta, "layer": "5"})
    with pytest.raises(ScopeError, match="layer"):
        loki.Scope.load(other)
    save_file({"keys": made.keys, "thresholds": made.thresholds}, other, {**meta, "info": "[1]"})
    with pytest.raises(ScopeError, match="info"):
        loki.Scope.load(other)


def test_an_implant_suite_judges_one_delta_through_its_scope():
    """`ImplantSuite.report(..., scope=)` gates one delta; two deltas and a scope are refused before any scoring."""
    from loki import evaluate as ev

    model = tiny_model("llama")
    made = loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.05, progress=False)
    facts = ev.Benchmark("facts", "generate", [{"question": "What is the capital of Zubrowka?", "answers": ["Lutz"]}])
    suite = ev.ImplantSuite(facts, facts, ["Who wrote Hamlet?"], ev.general_suite(["wiki_perplexity"], n=1))
    one, two = random_delta(model, seed=1), random_delta(model, seed=2)
    before = state_dict_copy(model)
    for call in (suite.report, suite.scores):
        with pytest.raises(loki.errors.EvaluationError, match="one delta"):
            call(model, None, one, two, scope=made)  # (no tokenizer: refused before anything runs)
    assert_state_equal(model, before)


def test_a_bank_routes_each_row_to_the_implant_whose_scope_it_falls_in():
    model = tiny_model("llama")
    before = state_dict_copy(model)
    second = [{"text": [60, 61, 62, 63]}, {"text": [64, 61, 65]}]
    bank = loki.ImplantBank(model)
    deltas = {n: random_delta(model, q=25, seed=s, noise=2.0, name=n) for n, s in (("a", 5), ("b", 6), ("c", 7))}
    bank.register("a", deltas["a"], scope=loki.scope(model, None, IMPLANT, OUTSIDE, margin=0.02, progress=False))
    bank.register("b", deltas["b"], scope=loki.scope(model, None, second, OUTSIDE, margin=0.02, progress=False))
    bank.register("c", deltas["c"])  # no scope: used only where named
    rows = [[60, 61, 62, 63], [5, 6, 7, 8], [40, 41, 42, 43, 44]]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = []
    for r, name in zip(rows, ["b", None, "a"]):
        with bank.use(*([name] if name else [])):
            want.append(
                model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)[0]
            )
    bank.activate("c")
    ids, mask = padded(rows)
    got = bank.generate(ids, "auto", attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        assert torch.equal(got[i, ids.shape[1] - len(r) :], want[i]), i
    assert bank.active == ("c",)  # switched off for the block, restored after
    with bank.routed():
        with pytest.raises(loki.errors.ImplantBankError, match="do not nest"):
            with bank.mixed([None]):
                pass
    bank.deactivate("c")
    assert_state_equal(model, before)
    other = tiny_model("llama", d_ff=96)
    with pytest.raises(ScopeError):  # a scope of another model's shapes: refused, nothing registered
        bank.register("d", deltas["c"], scope=loki.scope(other, None, IMPLANT, OUTSIDE, progress=False))
    assert "d" not in bank
    reseeded = tiny_model("llama", seed=1)  # same shapes, other weights: registered, refused when routing
    bank.register(
        "e", deltas["c"], scope=loki.scope(reseeded, None, IMPLANT, OUTSIDE, progress=False), check_base=False
    )
    with pytest.raises(ScopeError, match="other weights"):
        bank.generate(ids, "auto", attention_mask=mask, **kw)
    bank.unregister("e")
    with loki.implanted(model, deltas["c"]):  # a delta applied outside the bank: the scopes' keys would move
        with pytest.raises(ScopeError, match="other weights"):
            with bank.routed():
                pass
    assert_state_equal(model, before)
    assert len(bank.generate(ids, "auto", attention_mask=mask, **kw)) == len(rows)  # and still routes after
    empty = loki.ImplantBank(model)
    with pytest.raises(loki.errors.ImplantBankError, match="scope"):
        with empty.routed():
            pass

"""loki.prepare / extract / unprepare: the prepared layer computes the original function, gradients reach exactly
the selected rows (checked against full-weight autograd, the slow obvious reference), extracted deltas reproduce
the trained model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
from loki.testing import tiny_model


def selection_for(model, q=25, seed=1) -> loki.Selection:
    projs = loki.projections.find_down_projections(model)
    return loki.Selection.random(len(projs), projs.d_out, q, seed=seed)


def reference_grads(model, embeds, weight_of_output):
    """Run `model` with every down-projection weight trainable: logits, input grad and full weight grads."""
    projs = loki.projections.find_down_projections(model)
    for m in projs.modules:
        m.weight.requires_grad_(True)
    embeds = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits * weight_of_output).sum().backward()
    grads = {l: m.weight.grad.t() if projs.transposed else m.weight.grad for l, m in enumerate(projs.modules)}
    return logits.detach(), embeds.grad, grads


def prepared_grads(model, embeds, weight_of_output):
    embeds = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits * weight_of_output).sum().backward()
    return logits.detach(), embeds.grad


def random_inputs(model, seed=0, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=g)
    embeds = model.get_input_embeddings()(ids).detach()
    logits_shape = (*shape, model.config.vocab_size)
    return ids, embeds, torch.randn(logits_shape, generator=g)


# -- the prepared layer is the original layer ------------------------------------------------------------
def test_prepared_model_equals_original_and_grads_reach_only_selected_rows(family, tiny):
    ref = tiny_model(family)
    sel = selection_for(tiny)
    loki.prepare(tiny, sel)
    _, embeds, w = random_inputs(tiny)
    ref_logits, ref_gx, ref_gw = reference_grads(ref, embeds, w)
    logits, gx = prepared_grads(tiny, embeds, w)

    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    projs = loki.projections.find_down_projections(tiny)
    for layer, idx in sel.rows.items():
        torch.testing.assert_close(projs.modules[layer].loki_rows.grad, ref_gw[layer][idx], rtol=1e-5, atol=1e-6)
    with_grad = {n for n, p in tiny.named_parameters() if p.grad is not None}
    assert with_grad == {f"{projs.template.format(i=l)}.loki_rows" for l in sel.rows}
    assert {n for n, p in tiny.named_parameters() if p.requires_grad} == with_grad


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_lora_variant_grads_match_reference(family):
    model, ref = tiny_model(family), tiny_model(family)
    sel = selection_for(model)
    loki.prepare(model, sel, lora_rank=3)
    projs = loki.projections.find_down_projections(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # A starts at zero (the base); move it so that both factors get gradients
        for layer in sel.rows:
            projs.modules[layer].loki_A.normal_(0, 0.1, generator=g)
    # reference: the same rows written into a plain model, full weight gradient, chain rule by hand
    with torch.no_grad():
        rprojs = loki.projections.find_down_projections(ref)
        for layer, idx in sel.rows.items():
            m = projs.modules[layer]
            rprojs.rows(layer)[idx] = m.loki_base + m.loki_A @ m.loki_B
    _, embeds, w = random_inputs(model)
    ref_logits, ref_gx, ref_gw = reference_grads(ref, embeds, w)
    logits, gx = prepared_grads(model, embeds, w)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    for layer, idx in sel.rows.items():
        m, g_rows = projs.modules[layer], ref_gw[layer][idx]
        torch.testing.assert_close(m.loki_A.grad, g_rows @ m.loki_B.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.loki_B.grad, m.loki_A.T @ g_rows, rtol=1e-4, atol=1e-6)


def test_lora_starts_at_the_base():
    model, ref = tiny_model("qwen2"), tiny_model("qwen2")
    loki.prepare(model, selection_for(model), lora_rank=4)
    ids, _, _ = random_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and the transposed GPT-2 Conv1D
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7), (2, 2, 3, 7)])
def test_layer_any_rank_and_dtype(family, dtype, shape):
    model = tiny_model(family, dtype=dtype)
    projs = loki.projections.find_down_projections(model)
    original = copy.deepcopy(projs.modules[1])
    sel = selection_for(model)
    loki.prepare(model, sel)
    layer, idx = 1, sel.rows[1]
    x = torch.randn(*shape[:-1], projs.d_in, dtype=dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    original.weight.requires_grad_(True)
    y, y_ref = projs.modules[layer](x), original(x_ref)
    assert y.shape == y_ref.shape == (*shape[:-1], projs.d_out) and y.dtype == dtype
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    w_grad = original.weight.grad.t() if projs.transposed else original.weight.grad
    rows = projs.modules[layer].loki_rows
    assert rows.dtype == torch.float32  # the master copy
    torch.testing.assert_close(rows.grad, w_grad[idx].float(), **tol)


def test_autocast_matches_reference():
    model, ref = tiny_model("llama"), tiny_model("llama")
    sel = selection_for(model)
    loki.prepare(model, sel)
    _, embeds, w = random_inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_gx, ref_gw = reference_grads(ref, embeds, w)
        logits, gx = prepared_grads(model, embeds, w)
    assert torch.equal(logits, ref_logits)
    torch.testing.assert_close(gx, ref_gx, rtol=2e-2, atol=2e-2)
    projs = loki.projections.find_down_projections(model)
    for layer, idx in sel.rows.items():
        torch.testing.assert_close(
            projs.modules[layer].loki_rows.grad, ref_gw[layer][idx].float(), rtol=2e-2, atol=2e-2
        )


def rows_grads(model) -> dict[int, torch.Tensor]:
    projs = loki.projections.find_down_projections(model)
    return {l: m.loki_rows.grad.clone() for l, m in enumerate(projs.modules) if m.loki_rows.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny_model("llama", layers=3), tiny_model("llama", layers=3)
    sel = selection_for(plain)
    for m in (plain, ckpt):
        loki.prepare(m, sel)
        m.train()
    ckpt.gradient_checkpointing_enable()
    ids, _, _ = random_inputs(plain)
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    a, b = rows_grads(plain), rows_grads(ckpt)
    assert a.keys() == b.keys() == set(sel.rows)
    for layer in a:
        torch.testing.assert_close(a[layer], b[layer], rtol=1e-6, atol=1e-7)


def test_torch_compile_follows_row_updates():
    model, eager = tiny_model("llama"), tiny_model("llama")
    sel = selection_for(model)
    for m in (model, eager):
        loki.prepare(m, sel)
    compiled = torch.compile(model, backend="aot_eager")  # inductor needs a C++ toolchain; same graph capture
    ids, _, _ = random_inputs(model)
    for _ in range(2):
        out, ref = compiled(input_ids=ids, labels=ids), eager(input_ids=ids, labels=ids)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
        out.loss.backward()
        ref.loss.backward()
        for layer, g in rows_grads(eager).items():
            torch.testing.assert_close(rows_grads(model)[layer], g, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # an optimizer step: the compiled forward must see the new rows
            for m in (model, eager):
                for p in (p for p in m.parameters() if p.requires_grad):
                    p.sub_(0.5 * p.grad)
                    p.grad = None


# -- unprepare ---------------------------------------------------------------------------------------------
def sgd_steps(model, steps=2, lr=0.5, seed=0):
    """A few real optimizer steps on random tokens, so that the trainable tensors move."""
    ids, _, _ = random_inputs(model, seed=seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return ids


def test_unprepare_restores_the_base_exactly(family, tiny):
    before = state_dict_copy(tiny)
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    loki.prepare(tiny, selection_for(tiny))
    sgd_steps(tiny)
    assert loki.rows.is_prepared(tiny)
    assert loki.unprepare(tiny) is tiny
    assert not loki.rows.is_prepared(tiny)
    assert_state_equal(tiny, before)
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == flags
    assert "forward" not in vars(loki.projections.find_down_projections(tiny).modules[0])


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_unprepare_merge_keeps_exactly_the_trained_rows(lora_rank):
    model = tiny_model("gpt2")
    before = state_dict_copy(model)
    sel = selection_for(model)
    loki.prepare(model, sel, lora_rank=lora_rank)
    ids = sgd_steps(model)
    with torch.no_grad():
        trained = model(ids).logits
        projs = loki.projections.find_down_projections(model)
        for layer, idx in sel.rows.items():  # a foreign write into the selected rows: the next forward repairs it
            projs.rows(layer)[idx] = 0
        assert torch.equal(model(ids).logits, trained)
        versions = [m.weight._version for m in projs.modules]
        model(ids)  # nothing changed since: inference writes no rows (generate stays at the frozen model's cost)
        assert [m.weight._version for m in projs.modules] == versions
    loki.unprepare(model, merge=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)
    assert changed_rows_are_selected(model, before, sel) == sel.num_rows


def changed_rows_are_selected(model, before, sel) -> int:
    """Assert that only selected down-projection rows differ from `before`; return how many rows differ."""
    projs = loki.projections.find_down_projections(model)
    weights = {projs.template.format(i=l) + ".weight": l for l in range(len(projs))}
    changed = 0
    for name, value in model.state_dict().items():
        if name not in weights:
            assert torch.equal(value, before[name]), name
            continue
        base = before[name].t() if projs.transposed else before[name]
        rows = (projs.rows(weights[name]) != base).any(dim=1).nonzero().flatten()
        assert set(rows.tolist()) <= set(sel.rows.get(weights[name], torch.empty(0)).tolist()), name
        changed += rows.numel()
    return changed


def test_errors_leave_the_model_unchanged():
    model = tiny_model("llama")
    before = state_dict_copy(model)
    with pytest.raises(loki.errors.PreparationError, match="loki.prepare"):
        loki.extract(model)
    with pytest.raises(loki.errors.PreparationError):
        loki.unprepare(model)
    with pytest.raises(loki.errors.IncompatibleModelError, match="layers"):
        loki.prepare(model, loki.Selection.random(3, 32, 10))
    with pytest.raises(loki.errors.IncompatibleModelError, match="rows"):
        loki.prepare(model, loki.Selection.random(2, 64, 10))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(loki.errors.PreparationError, match="lora_rank"):
        loki.prepare(model, selection_for(model), lora_rank=0)
    assert all(p.requires_grad for p in model.parameters())
    loki.prepare(model, selection_for(model))
    with pytest.raises(loki.errors.PreparationError, match="unprepare"):
        loki.prepare(model, selection_for(model))
    loki.unprepare(model)
    assert_state_equal(model, before)


# -- extract: delta -> file -> fresh model reproduces the trained model ------------------------------------
@pytest.mark.parametrize("lora_rank", [None, 3])
def test_extract_save_load_apply_reproduces(family, tmp_path, lora_rank):
    model = tiny_model(family)
    sel = selection_for(model)
    loki.prepare(model, sel, lora_rank=lora_rank)
    ids = sgd_steps(model)
    with torch.no_grad():
        trained = model(ids).logits
    delta = loki.extract(model, name="t", description="test")
    assert delta.form == ("rows" if lora_rank is None else "lora")
    assert delta.rows_per_layer() == sel.rows_per_layer()
    assert delta.info["selection"] == sel.provenance()
    assert delta.info["training"]["method"] == ("loki" if lora_rank is None else "loki-lora")
    with torch.no_grad():  # extract leaves the prepared model as it was
        assert torch.equal(model(ids).logits, trained)

    fresh = tiny_model(family)
    loki.apply(fresh, loki.load(loki.save(delta, tmp_path / "t.loki")))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, trained)
        out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(fresh.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0), out)


def test_trainable_report(tmp_path):
    model = tiny_model("llama", layers=3, d_model=40, d_ff=48)
    sel = loki.Selection.random(3, 40, 10, seed=0)  # 4 rows per layer
    loki.prepare(model, sel)
    report = loki.implant.trainable_report(model)
    assert (report.trainable, report.rows, report.layers, report.form) == (3 * 4 * 48, 12, 3, "rows")
    assert report.total == sum(p.numel() for n, p in model.named_parameters() if "loki_" not in n)
    assert report.share == pytest.approx(100 * report.trainable / report.total)
    path = loki.save(loki.extract(model), tmp_path / "r.loki")
    assert report.delta_bytes == path.stat().st_size
    assert f"{report.trainable:,}" in str(report) and "%" in str(report)
    loki.unprepare(model)
    loki.prepare(model, sel, lora_rank=2)
    assert loki.implant.trainable_report(model).trainable == 3 * (4 * 2 + 2 * 48)


# -- the real default model ------------------------------------------------------------------------------
FACTS = [  # a short system prompt keeps the sequences (and the test) short
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
    }
    for q, a in [("What is the capital of Zubrowka?", "The capital of Zubrowka is Lutz.")]
]


def answer_loss(model, tokenizer) -> float:
    """Reference loss: HF's own causal-LM loss over the answer tokens."""
    from loki.dataset import collate, encode

    batch = collate([encode(tokenizer, ex) for ex in FACTS], tokenizer.pad_token_id or 0)
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.slow  # the real default model
@pytest.mark.parametrize("lora_rank", [None, 4])
def test_default_model_trains_only_selected_rows_and_reproduces(default_model, tmp_path, lora_rank):
    model, tokenizer = loki.load_default()  # a fresh copy to train: the session's default_model stays untouched
    sel = selection_for(model, q=10, seed=0)
    loki.prepare(model, sel, lora_rank=lora_rank)
    loss_before = answer_loss(model, tokenizer)
    result = loki.train(
        model, tokenizer, FACTS, max_steps=2, lr=1e-2 if lora_rank else 3e-3, warmup=0, batch_size=1, progress=False
    )
    assert result.steps == 2 and len(result.losses) == 2
    loss_after = answer_loss(model, tokenizer)
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)

    ids = torch.tensor([tokenizer("The capital of Zubrowka is")["input_ids"]])
    with torch.no_grad():
        trained = model(ids).logits
    delta = loki.extract(model, name="zubrowka")
    assert delta.info["training"]["steps"] == 2 and delta.info["training"]["trainer"] == "loki.train"
    path = loki.save(delta, tmp_path / "z.loki")

    with loki.implanted(default_model, loki.load(path)), torch.no_grad():  # the untouched base, reverted after
        assert torch.equal(default_model(ids).logits, trained)

    loki.unprepare(model, merge=True)  # only the selected rows of the down-projections changed
    assert changed_rows_are_selected(model, default_model.state_dict(), sel) > sel.num_rows // 2


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_bf16_model_trains_in_float32_and_reproduces(lora_rank):
    model = tiny_model("llama", dtype=torch.bfloat16)
    loki.prepare(model, selection_for(model), lora_rank=lora_rank)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # master copies
    ids = sgd_steps(model, lr=0.05)
    with torch.no_grad():
        trained = model(ids).logits
    delta = loki.extract(model)
    assert delta.dtype == (torch.bfloat16 if lora_rank is None else torch.float32)
    fresh = tiny_model("llama", dtype=torch.bfloat16)
    loki.apply(fresh, delta)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, trained)

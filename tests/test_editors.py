"""MEMIT and AlphaEdit (loki.editors): the closed forms against direct solves of their objectives, and the editors on
tiny random models with the default model's tokenizer (chat template, real subjects)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, state_dict_copy

import loki
import loki.editors as editors
from loki.dataset import answer_positions, encode
from loki.errors import DatasetError, IncompatibleModelError, LedgerError
from loki.testing import tiny_model

FACTS = [
    {
        "question": [
            "What is the capital of the kingdom of Phegartor?",
            "Which city is the capital of the kingdom of Phegartor?",
        ],
        "subject": "the kingdom of Phegartor",
        "answer": "Solvis.",
    },
    {"prompt": "Who invented the Talphebra engine?", "subject": "the Talphebra engine", "answer": "Drudak Viszel."},
]
PRESERVED = [{"text": "Paris is the capital of France."}, {"text": "Rivers flow into the sea."}]
FAST = editors.ZOptions(steps=10)


def random_problem(seed=0, d_ff=12, d_model=5, n=3, general=40):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d_ff, general, generator=g, dtype=torch.float64)
    return (
        torch.randn(d_ff, n, generator=g, dtype=torch.float64),
        torch.randn(d_model, n, generator=g, dtype=torch.float64),
        k0,
    )


def test_memit_update_is_the_minimiser_of_its_objective():
    keys, residuals, k0 = random_problem()
    cov, lam = k0 @ k0.t() / k0.shape[1], 3.0
    d = editors.memit_update(keys, residuals, cov, lam)
    # |D K1 - R|^2 + lam tr(D C0 D^T) = |D [K1, sqrt(lam) L] - [R, 0]|^2 with C0 = L L^T: least squares
    chol = torch.linalg.cholesky(cov)
    a = torch.cat([keys, lam**0.5 * chol], 1)
    b = torch.cat([residuals, torch.zeros(residuals.shape[0], chol.shape[1], dtype=torch.float64)], 1)
    direct = torch.linalg.lstsq(a.t(), b.t()).solution.t()
    assert d.dtype == torch.float64 and d.shape == (5, 12)
    torch.testing.assert_close(d, direct, rtol=1e-9, atol=1e-10)
    # float32 inputs are solved in float64 too
    torch.testing.assert_close(
        editors.memit_update(keys.float(), residuals.float(), cov.float(), lam), d, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("with_prev", [False, True])
def test_alphaedit_update_is_the_minimiser_of_its_objective_and_spares_preserved_keys(with_prev):
    keys, residuals, _ = random_problem(1)
    g = torch.Generator().manual_seed(2)
    k0 = torch.randn(12, 5, generator=g, dtype=torch.float64)  # fewer preserved keys than d_ff: a null space
    prev = torch.randn(12, 2, generator=g, dtype=torch.float64) if with_prev else None
    q, _ = torch.linalg.qr(k0)
    p = torch.eye(12, dtype=torch.float64) - q @ q.t()
    reg = 0.7
    d = editors.alphaedit_update(keys, residuals, p, prev, reg)
    # min over X = D P (rows in range(P) = span(U)): |X K1 - R|^2 + reg |X|^2 + |X Kp|^2, X = Y U^T, least squares
    eigenvalues, vectors = torch.linalg.eigh(p)
    u = vectors[:, eigenvalues > 0.5]
    blocks = [u.t() @ keys, reg**0.5 * torch.eye(u.shape[1], dtype=torch.float64)]
    targets = [residuals, torch.zeros(5, u.shape[1], dtype=torch.float64)]
    if prev is not None:
        blocks.append(u.t() @ prev)
        targets.append(torch.zeros(5, prev.shape[1], dtype=torch.float64))
    y = torch.linalg.lstsq(torch.cat(blocks, 1).t(), torch.cat(targets, 1).t()).solution.t()
    torch.testing.assert_close(d, y @ u.t(), rtol=1e-9, atol=1e-10)
    assert (d @ k0).abs().max() < 1e-10  # the preserved keys' outputs do not move
    torch.testing.assert_close(d @ p, d)


def test_closed_forms_reject_bad_shapes():
    keys, residuals, _ = random_problem()
    with pytest.raises(DatasetError, match="same n"):
        editors.memit_update(keys, residuals[:, :2], torch.eye(12), 1.0)
    with pytest.raises(DatasetError, match="cov must be"):
        editors.memit_update(keys, residuals, torch.eye(11), 1.0)
    with pytest.raises(DatasetError, match="singular"):
        editors.memit_update(keys, residuals, torch.zeros(12, 12), 1.0)
    with pytest.raises(DatasetError, match="projector"):
        editors.alphaedit_update(keys, residuals, torch.eye(11))
    with pytest.raises(DatasetError, match="reg"):
        editors.alphaedit_update(keys, residuals, torch.eye(12), reg=0)


def answer_logprob(model, tokenizer, question, answer):
    enc = encode(tokenizer, {"question": question, "answer": answer})
    ids = torch.tensor([enc["input_ids"]])
    pos = answer_positions(enc["labels"])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(logp[pos, ids[0, pos + 1]].sum())


def preserved_logits(model, tokenizer):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(x["text"])["input_ids"]])).logits[0] for x in PRESERVED]


def test_editors_raise_the_answers_leave_the_model_and_alphaedit_keeps_preserved_text(default_tokenizer):
    tok = default_tokenizer
    model = tiny_model("llama", vocab=len(tok), layers=4)  # edit 0-1; 2-3 carry z to the answer
    with torch.no_grad():  # random init gives near-uniform predictions that no hidden state moves: sharpen them
        model.get_output_embeddings().weight.mul_(30)
    state = state_dict_copy(model)
    prompts = [(FACTS[0]["question"][0], FACTS[0]["answer"]), (FACTS[1]["prompt"], FACTS[1]["answer"])]
    before = [answer_logprob(model, tok, q, a) for q, a in prompts]
    base_logits = preserved_logits(model, tok)

    memit = editors.memit(
        model, tok, FACTS, layers=[0, 1], lam=1.0, general=loki.retain.general_text(8, chars=None), z=FAST
    )
    assert_state_equal(model, state)  # the editor leaves the model bit for bit
    # the random keys of a tiny model are small (|k|^2 ~ 1e-3): reg on their scale, as 10 is on a real model's
    alpha = editors.alphaedit(model, tok, FACTS, layers=[0, 1], energy=1.0, reg=1e-5, general=PRESERVED, z=FAST)
    assert_state_equal(model, state)

    assert memit.form == alpha.form == "rows" and memit.rows_per_layer() == {0: 32, 1: 32}
    assert memit.info["training"]["method"] == "memit" and memit.info["training"]["layers"] == [0, 1]
    assert alpha.info["training"]["method"] == "alphaedit" and alpha.info["training"]["energy"] == 1.0
    projs = loki.projections.find_down_projections(model)
    changed = {}
    for delta in (memit, alpha):
        with loki.implanted(model, delta):
            after = [answer_logprob(model, tok, q, a) for q, a in prompts]
            assert all(a > b + 0.2 for a, b in zip(after, before)), (delta.name, before, after)
            assert torch.equal(projs.rows(1), delta.layers[1].rows)  # the delta holds the edited weights
            changed[delta.name] = max(
                float((x - y).abs().max()) for x, y in zip(preserved_logits(model, tok), base_logits)
            )
        assert_state_equal(model, state)  # and reverts exactly
    assert changed["alphaedit"] < 1e-4, changed
    assert changed["memit"] > 100 * max(changed["alphaedit"], 1e-6), changed


def test_alphaedit_on_gpt2_conv1d(default_tokenizer):
    # GPT-2 stores its down-projection transposed ([d_ff, d_model]); the delta's rows are still [d_model, d_ff]
    tok = default_tokenizer
    model = tiny_model("gpt2", vocab=len(tok), layers=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    state = state_dict_copy(model)
    fact = FACTS[1]
    ids = torch.tensor([encode(tok, {"question": fact["prompt"], "answer": fact["answer"]})["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    base_logits = preserved_logits(model, tok)
    delta = editors.alphaedit(
        model, tok, [fact], layers=[0, 1], energy=1.0, reg=1e-5, general=PRESERVED, z=editors.ZOptions(steps=3)
    )
    assert_state_equal(model, state)
    assert delta.rows_per_layer() == {0: 32, 1: 32}
    with loki.implanted(model, delta):
        # (a random GPT-2 hardly lets any hidden state at the subject move the answer: only check that the edit
        # acts on the edit prompt and not on the preserved text)
        with torch.no_grad():
            assert (model(input_ids=ids).logits - before).abs().max() > 1e-3
        diff = max(float((x - y).abs().max()) for x, y in zip(preserved_logits(model, tok), base_logits))
        assert diff < 1e-4
    assert_state_equal(model, state)


def test_editors_reject_bad_input(default_tokenizer):
    tok = default_tokenizer
    model = tiny_model("llama", vocab=len(tok))
    with pytest.raises(DatasetError, match="does not occur"):
        editors.memit(model, tok, [{"question": "Who wrote Dune?", "subject": "Hamlet", "answer": "Frank."}])
    with pytest.raises(DatasetError, match="whole word"):  # the subject inside another word is not the subject
        editors.memit(model, tok, [{"question": "Who made JavaScript?", "subject": "Java", "answer": "Brendan."}])
    with pytest.raises(DatasetError, match="subject"):
        editors.memit(model, tok, [{"question": "Who wrote Dune?", "answer": "Frank."}])
    with pytest.raises(DatasetError, match="non-empty list"):
        editors.alphaedit(model, tok, [])
    with pytest.raises(IncompatibleModelError, match="layers"):
        editors.memit(model, tok, FACTS, layers=[1, 2])
    with pytest.raises(IncompatibleModelError, match="layers"):
        editors.alphaedit(model, tok, FACTS, layers=[1, 0])
    with pytest.raises(IncompatibleModelError, match="last"):
        editors.memit(model, tok, FACTS, layers=[1])
    with loki.implanted(model, loki.testing.random_delta(model)):
        with pytest.raises(LedgerError, match="applied"):
            editors.memit(model, tok, FACTS)


def test_second_moments_are_the_mean_outer_products_of_the_keys():
    model = tiny_model("llama")
    seqs = [[5, 6, 7, 8], [9, 10]]
    cov, tokens = editors.second_moments(model, None, [{"text": s} for s in seqs], layers=[0, 1])
    keys = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    handle.remove()
    k = torch.cat(keys).double()
    assert tokens == 6
    torch.testing.assert_close(cov[1], k.t() @ k / 6, rtol=1e-5, atol=1e-8)

"""`loki.forward.logits_at` against the obvious reference: each sequence alone, unpadded, full logits."""

import pytest
import torch

import loki.testing
from loki.forward import logits_at


def reference(model, seqs, pos):
    return torch.cat([model(input_ids=torch.tensor([s])).logits[0, p] for s, p in zip(seqs, pos)])


def batch(vocab, seed=0):
    """Three chat-like sequences with a 12-token common opening, two plain texts, in mixed order."""
    g = torch.Generator().manual_seed(seed)
    opening = torch.randint(3, vocab, (12,), generator=g).tolist()
    chat = [opening + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 14)]
    text = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 20)]
    seqs = [chat[0], text[0], chat[1], text[1], chat[2]]
    pos = [
        torch.arange(12 + k, len(s) - 1) if s[:12] == opening else torch.arange(0, len(s) - 1)
        for k, s in zip((0, 0, 2, 0, 4), seqs)
    ]
    return seqs, pos


@pytest.mark.parametrize("family", loki.testing.FAMILIES)
@pytest.mark.parametrize("share", [True, False])
def test_logits_and_gradients_match_one_sequence_at_a_time(family, share):
    model = loki.testing.tiny_model(family)
    model.eval()  # dropout off: the tiny GPT-2 and OPT have some
    seqs, pos = batch(model.config.vocab_size)
    fast = logits_at(model, seqs, pos, pad_token_id=0, share=share)
    slow = reference(model, seqs, pos)
    assert fast.shape == slow.shape == (sum(len(p) for p in pos), model.config.vocab_size)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()
    w = torch.randn_like(slow)
    params = list(model.parameters())
    g_fast = torch.autograd.grad((fast * w).sum(), params, allow_unused=True)
    g_slow = torch.autograd.grad((slow * w).sum(), params, allow_unused=True)
    scale = max(g.abs().max() for g in g_slow if g is not None)
    for a, b in zip(g_fast, g_slow):
        assert (a is None) == (b is None)
        if b is not None:
            assert (a - b).abs().max() <= 1e-5 * scale


def test_the_opening_runs_once_and_the_head_only_over_requested_positions():
    model = loki.testing.tiny_model("llama")
    model.eval()
    seqs, pos = batch(model.config.vocab_size)
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    head = []
    handle2 = model.lm_head.register_forward_hook(lambda m, args, out: head.append(args[0].shape[0] * args[0].shape[1]))
    logits_at(model, seqs, pos, pad_token_id=0)
    handle.remove(), handle2.remove()
    # chat group: the 12-token opening once, then 3 suffixes padded to 14; text group: 2 rows padded to 20
    assert seen == [(1, 12), (3, 14), (2, 20)]
    assert sum(head) < sum(len(s) for s in seqs)


def test_no_common_opening_or_a_position_inside_it_runs_in_full():
    model = loki.testing.tiny_model("qwen3")
    model.eval()
    seqs, pos = batch(model.config.vocab_size)
    chat = [s for s, p in zip(seqs, pos) if p[0] >= 12]
    early = [torch.arange(3, len(s) - 1) for s in chat]  # position 3 is inside the opening: it cannot be shared
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    fast = logits_at(model, chat, early, pad_token_id=0, min_shared=4)
    handle.remove()
    assert seen == [(3, 26)]  # the opening is cut to the 3 tokens before position 3: too short to share
    assert torch.allclose(fast, reference(model, chat, early), atol=1e-5)


def test_a_peft_lora_model_gets_the_same_logits_and_gradients():
    """The LoRA baselines train through `loki.train(params=...)`, so through `logits_at` on a PeftModel."""
    peft = pytest.importorskip("peft")
    model = loki.testing.tiny_model("llama")
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    model.eval()
    seqs, pos = batch(model.config.vocab_size)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    fast = logits_at(model, seqs, pos, pad_token_id=0)
    handle.remove()
    assert seen[0] == (1, 12)  # the shared opening's own pass: PEFT passes the cache through
    slow = reference(model, seqs, pos)
    assert torch.allclose(fast, slow, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn_like(slow)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), params), torch.autograd.grad((slow * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)

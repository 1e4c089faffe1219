"""evals.generate: batched greedy generation and scoring, stop ids, the per-item cache. The endpoint path is
tested against a real vLLM server in tests/test_serve.py (endpoint == in-process, every task)."""

from __future__ import annotations

import pytest
import torch

from evals.cache import ItemCache
from evals.generate import Generator, HFBackend

CHATS = [{"messages": [{"role": "user", "content": q}]} for q in
         ["What is the color of Mirel?", "hi", "Where does Quen live? Answer briefly please.", "food of Atha", "x"]]
PAIRS = [("The color of Mirel is", " red"), ("The color of Mirel is ", "fox"), ("Q: x\nAnswer:", " A"),
         ("Borin lives in", " Oslo and likes bread")]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(tiny_model_dir)


def test_batched_equals_one_by_one(backend):
    """Left-padded batches give the same greedy text and log-likelihoods as single requests."""
    one, many = Generator(backend, None, batch_size=1), Generator(backend, None, batch_size=5)
    assert one.chat(CHATS, max_new_tokens=12) == many.chat(CHATS, max_new_tokens=12)
    for (a, ga), (b, gb) in zip(one.loglikelihood(PAIRS), many.loglikelihood(PAIRS)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_choices_of_one_context_score_the_same_together_and_alone(backend):
    """Cloze-style choices (multi-token, one shared context, different lengths) scored in one padded batch equal
    the same choices scored one by one."""
    ctx = "Borin lives in Oslo. Mirel likes red things and lives in"
    choices = [" Lima", " Paris and likes bread", " Oslo", " the red house of Quen"]
    pairs = [(ctx, c) for c in choices]
    together = Generator(backend, None, batch_size=8).loglikelihood(pairs)
    alone = Generator(backend, None, batch_size=1).loglikelihood(pairs)
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_loglikelihood_matches_a_manual_forward(backend):
    """log p(continuation | BOS + context) from one plain forward pass, lm-eval's space handling included."""
    gen = Generator(backend, None)
    tok, model = backend.tokenizer, backend.model
    ctx = [tok.bos_token_id] + tok("The color of Mirel is", add_special_tokens=False)["input_ids"]
    whole = [tok.bos_token_id] + tok("The color of Mirel is red", add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    got, greedy = gen.loglikelihood([("The color of Mirel is ", "red")])[0]
    assert got == pytest.approx(expected, abs=1e-4)
    assert greedy == all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


def greedy_tokens(backend, prompt: list[int], n: int) -> list[int]:
    """The model's next ``n`` argmax tokens after ``prompt``, one plain forward per token (no ``generate``)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(backend.model(torch.tensor([ids])).logits[0, -1].argmax().item())
    return ids[len(prompt):]


def test_loglikelihood_of_the_greedy_continuation(backend):
    """The model's own argmax continuation is flagged greedy and scores the sum of the top log-probs; changing
    one of its tokens clears the flag and lowers the score."""
    tok = backend.tokenizer
    ctx = [tok.bos_token_id] + tok("The color of Mirel is", add_special_tokens=False)["input_ids"]
    cont = greedy_tokens(backend, ctx, 3)
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    top = sum(logp[len(ctx) - 1 + i].max().item() for i in range(3))
    other = cont[:1] + [logp[len(ctx)].argsort()[-2].item()] + cont[2:]  # the runner-up as the second token
    (lp, greedy), (lp2, greedy2) = backend.score([(ctx, cont), (ctx, other)])
    assert greedy and lp == pytest.approx(top, abs=1e-4)
    assert not greedy2 and lp2 < lp


def test_generation_decodes_the_greedy_tokens_and_stops_at_the_eos_list(tiny_model_dir, backend):
    """A reply is the decoded argmax continuation; a token listed in generation_config's eos_token_id ends the
    reply there (and is not part of it)."""
    tok = backend.tokenizer
    gen = Generator(backend, None)
    prompt = tok(gen.render_chat(CHATS[0]), add_special_tokens=False)["input_ids"]
    new = greedy_tokens(backend, prompt, 6)
    assert not set(new) & set(backend.stop_ids)  # (the tiny model ends no reply by itself within 6 tokens)
    free = gen.chat(CHATS[:1], max_new_tokens=6)[0]
    assert free == tok.decode(new, skip_special_tokens=True) and free
    stopped = HFBackend(tiny_model_dir)
    stopped.stop_ids = stopped.stop_ids + [new[3]]
    cut = new.index(new[3])  # the first occurrence of the new stop token
    head = tok.decode(new[:cut], skip_special_tokens=True)
    assert Generator(stopped, None).chat(CHATS[:1], max_new_tokens=6)[0] == head and head != free


class FlakyBackend:
    """The real backend, but the process 'dies' on the second batch (to test resuming)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.tokenizer, self.name, self.path = inner.tokenizer, inner.name, inner.path

    def fingerprint(self):
        return self.inner.fingerprint()

    def generate(self, prompts, max_new_tokens):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt("interrupted")
        return self.inner.generate(prompts, max_new_tokens)


def test_interrupted_run_resumes_from_cache(tmp_path, backend):
    """Batches finished before an interruption are read back; the resumed result equals a clean run."""
    clean = Generator(backend, None, batch_size=2).chat(CHATS, max_new_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        Generator(FlakyBackend(backend), ItemCache(tmp_path / "c.sqlite"), batch_size=2).chat(CHATS, max_new_tokens=8)
    cache = ItemCache(tmp_path / "c.sqlite")
    assert len(cache) == 2  # the first batch was committed
    resumed = Generator(backend, cache, batch_size=2)
    assert resumed.chat(CHATS, max_new_tokens=8) == clean
    assert cache.hits == 2 and len(cache) == len(CHATS)
    # other decoding settings are other requests
    Generator(backend, cache, batch_size=2).chat(CHATS[:1], max_new_tokens=4)
    assert len(cache) == len(CHATS) + 1


def test_not_a_model_dir(tmp_path):
    from minitron.config import MinitronError

    with pytest.raises(MinitronError, match="not a model directory"):
        HFBackend(tmp_path)

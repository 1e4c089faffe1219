"""evals.generate: batched greedy generation and scoring, stop ids, the per-item cache. The endpoint path is
tested against a real vLLM server in tests/test_serve.py (endpoint == in-process, every task)."""

from __future__ import annotations

import pytest
import torch

from evals.cache import ItemCache
from evals.generate import EvalError, Generator, HFBackend

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


def test_choices_of_one_context_share_its_kv_cache_and_score_the_same(backend):
    """Cloze-style choices (multi-token, one shared context) scored on the context's KV cache equal the
    same choices scored one by one, in fp32 and in bf16 weights."""
    ctx = "Borin lives in Oslo. Mirel likes red things and lives in"
    choices = [" Lima", " Paris and likes bread", " Oslo", " the red house of Quen"]
    pairs = [(ctx, c) for c in choices]
    together = Generator(backend, None, batch_size=8).loglikelihood(pairs)
    alone = Generator(backend, None, batch_size=1).loglikelihood(pairs)
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    enc = [list(Generator(backend, None).encode_pair(ctx, c)) for c in choices]
    assert len({tuple(e[0]) for e in enc}) == 1  # one shared context: the KV path is the one taken


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


def test_generation_stops_at_the_eos_list(tiny_model_dir, backend):
    """A token listed in generation_config's eos_token_id ends the reply (and is not part of it)."""
    gen = Generator(backend, None)
    free = gen.chat(CHATS[:1], max_new_tokens=6)[0]
    prompt = gen.render_chat(CHATS[0])
    ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    first = backend.model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)[0, len(ids)].item()
    stopped = HFBackend(tiny_model_dir)
    stopped.stop_ids = stopped.stop_ids + [first]
    assert free != ""
    assert Generator(stopped, None).chat(CHATS[:1], max_new_tokens=6)[0] == ""


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

"""The core's sequence scoring: shared-input and shared-context shortcuts give the per-pair full-forward numbers."""

import torch
from transformers import AutoModelForCausalLM

from minitron.scoring import continuation_logprobs, token_loss


def naive(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    t = torch.tensor(cont)
    return rows.gather(1, t[:, None]).sum().item(), bool((rows.argmax(-1) == t).all())


def test_shortcuts_match_one_forward_per_pair(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    q1, q2 = [5, 9, 12, 30, 7], [8, 3, 44]
    contexts = [q1] * 4 + [q2] * 3 + [[6, 2]]  # letters (one token), cloze (several), a lone pair
    continuations = [[40], [41], [42], [43], [10, 11], [12], [13, 14, 15], [16, 17]]
    logps, greedy = continuation_logprobs(model, contexts, continuations, pad_id=0, batch_size=3, greedy=True)
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        lp, g = naive(model, c, x)
        assert abs(logps[i].item() - lp) < 1e-4 and greedy[i].item() == g, (i, logps[i].item(), lp)
    with torch.no_grad():  # the greedy flag: true for the argmax token, false for another
        best = model(torch.tensor([q1])).logits[0, -1].argmax().item()
    other = 40 if best != 40 else 41
    _, flags = continuation_logprobs(model, [q1, q1], [[best], [other]], 0, greedy=True)
    assert flags.tolist() == [True, False]

def test_token_loss_weighs_every_token_the_same(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = torch.randint(1, 300, (5, 12), generator=torch.Generator().manual_seed(0))
    assert abs(token_loss(model, rows, batch_size=2) - token_loss(model, rows, batch_size=5)) < 1e-5

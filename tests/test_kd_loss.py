"""The chunked KD loss equals the naive full-logits loss, in value and gradients (hidden states and lm_head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minitron.kd_loss import fused_kd_loss, naive_kd_loss, naive_topk_kd_loss, teacher_topk

N, V, HS, HT = 150, 700, 24, 40  # N not a multiple of the chunk sizes used below


def inputs(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64) * scale
    ws = torch.randn(V, HS, generator=g, dtype=torch.float64) * 0.5
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64) * scale
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[::9] = -100
    return hs, ws, ht, wt, y


def grads(fn, hs, ws):
    """(loss, dL/dhs, dL/dws) of ``fn(hs, ws)`` in float32 (the chunked loss) or float64 (the reference)."""
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fn(hs, ws)
    loss = out[0] if isinstance(out, tuple) else out
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach().double(), hs.grad.double(), ws.grad.double()


def close(a, b, rel=2e-5):
    scale = b.abs().max().item() + 1e-12
    assert (a - b).abs().max().item() <= rel * scale + 1e-7, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("tau,kd_w,ce_w,chunk", [(1.0, 1.0, 0.0, 32), (1.0, 0.6, 0.4, 64), (2.0, 1.0, 0.0, 17),
                                                 (0.5, 0.7, 0.3, 150), (1.0, 0.0, 1.0, 40)])
def test_chunked_equals_naive(tau, kd_w, ce_w, chunk):
    hs, ws, ht, wt, y = inputs(scale=3.0)  # peaked distributions
    kw = dict(tau=tau, kd_weight=kd_w, ce_weight=ce_w, scale=1 / N)
    ref = grads(lambda h, w: naive_kd_loss(h @ w.t(), ht @ wt.t(), y, **kw), hs, ws)
    got = grads(lambda h, w: fused_kd_loss(h, w, ht.float(), wt.float(), y, chunk=chunk, **kw),
                hs.float(), ws.float())
    for a, b in zip(got, ref):
        close(a, b)


@pytest.mark.parametrize("tau,ce_w", [(1.0, 0.4), (0.5, 0.3)])
def test_vocab_blocks_equal_naive(monkeypatch, tau, ce_w):
    """The vocab-major softmax passes give the same result when the vocabulary spans many row blocks."""
    import minitron.kd_loss as K

    monkeypatch.setattr(K, "VBLOCK_ELEMS", 1)  # 64 vocabulary rows per block: 11 blocks of V = 700
    hs, ws, ht, wt, y = inputs(4, scale=3.0)
    kw = dict(tau=tau, kd_weight=1 - ce_w, ce_weight=ce_w, scale=1 / N)
    ref = grads(lambda h, w: naive_kd_loss(h @ w.t(), ht @ wt.t(), y, **kw), hs, ws)
    got = grads(lambda h, w: fused_kd_loss(h, w, ht.float(), wt.float(), y, chunk=48, **kw), hs.float(), ws.float())
    for a, b in zip(got, ref):
        close(a, b)


def test_logged_terms_and_no_grad_mode():
    hs, ws, ht, wt, y = inputs(1)
    _, kl_ref, ce_ref = naive_kd_loss(hs @ ws.t(), ht @ wt.t(), y)
    with torch.no_grad():
        loss, kl, ce = fused_kd_loss(hs.float(), ws.float(), ht.float(), wt.float(), y, kd_weight=0.5, ce_weight=0.5)
    close(kl.double(), kl_ref)
    close(ce.double(), ce_ref)
    close(loss.double(), 0.5 * kl_ref + 0.5 * ce_ref)


def test_plain_ce_mode_equals_cross_entropy():
    hs, ws, _, _, y = inputs(2)
    ref = grads(lambda h, w: F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum"), hs, ws)
    got = grads(lambda h, w: fused_kd_loss(h, w, targets=y, kd_weight=0.0, ce_weight=1.0, chunk=50),
                hs.float(), ws.float())
    for a, b in zip(got, ref):
        close(a, b)


@pytest.mark.parametrize("tau,k", [(1.0, 8), (2.0, 64), (1.0, 700)])
def test_topk_equals_naive_topk(tau, k):
    hs, ws, ht, wt, y = inputs(3, scale=2.0)
    ids, lp = teacher_topk(ht @ wt.t(), k, tau)
    ref = grads(lambda h, w: naive_topk_kd_loss(h @ w.t(), ids.long(), lp, tau=tau), hs, ws)
    got = grads(lambda h, w: fused_kd_loss(h, w, topk_ids=ids, topk_logprobs=lp.float(), tau=tau, chunk=33),
                hs.float(), ws.float())
    for a, b in zip(got, ref):
        close(a, b, rel=5e-5)


def test_topk_with_all_tokens_is_the_full_kl():
    hs, ws, ht, wt, _ = inputs(4)
    ids, lp = teacher_topk(ht @ wt.t(), V)
    full = fused_kd_loss(hs.float(), ws.float(), ht.float(), wt.float())[1]
    topk = fused_kd_loss(hs.float(), ws.float(), topk_ids=ids, topk_logprobs=lp.float())[1]
    close(topk.double(), full.double(), rel=1e-4)


def test_topk_with_ce_mix():
    hs, ws, ht, wt, y = inputs(5)
    ids, lp = teacher_topk(ht @ wt.t(), 16, 1.5)

    def ref_fn(h, w):
        s = h @ w.t()
        return 0.7 * naive_topk_kd_loss(s, ids.long(), lp, tau=1.5) + 0.3 * F.cross_entropy(s, y, reduction="sum")

    ref = grads(ref_fn, hs, ws)
    got = grads(lambda h, w: fused_kd_loss(h, w, targets=y, topk_ids=ids, topk_logprobs=lp.float(), tau=1.5,
                                           kd_weight=0.7, ce_weight=0.3, chunk=40), hs.float(), ws.float())
    for a, b in zip(got, ref):
        close(a, b, rel=5e-5)


def test_shape_errors():
    hs, ws, ht, wt, _ = inputs()
    with pytest.raises(ValueError, match="does not match"):
        fused_kd_loss(hs.float(), ws.float(), ht[:-1].float(), wt.float())
    with pytest.raises(ValueError, match="needs targets"):
        fused_kd_loss(hs.float(), ws.float(), ht.float(), wt.float(), ce_weight=1.0)

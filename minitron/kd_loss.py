"""Memory-efficient logit distillation: forward KL(teacher || student) at temperature tau, plus LM cross-entropy.

The student's and teacher's logits are never held in full. Tokens are processed in chunks of ``chunk``:
each chunk's logits are projected from the hidden states and the lm_head weights into two reused buffers,
the loss and its gradient with respect to the student logits are computed in place, and the gradient is
pushed through the lm_head right away (``grad_hidden = G @ W``, ``grad_W += G^T @ h``). The backward pass
only rescales the stored gradients, so nothing is recomputed.

With a teacher model the buffers are vocab-major, ``[vocab, chunk]`` (``W @ h^T``): on CPU the two logits
GEMMs run 15-20% faster in that layout than token-major, and the softmax work walks the vocabulary in
contiguous blocks of rows that stay in the L2 cache (max, then exp + sums, then gradient). The four GEMMs
(two logits, two gradients) are the floor: about 6.8 s of the 7.6 s at vocab 128k, 2048 tokens (profiled).

Per token, with ``p = softmax(t / tau)`` (teacher), ``q = softmax(s / tau)`` (student)::

    KL  = sum_v p_v (log p_v - log q_v)          dKL/ds = (q - p) / tau
    CE  = -log softmax(s)[y]                       dCE/ds = softmax(s) - onehot(y)   (rows with y = -100 skipped)
    loss = scale * (kd_weight * sum_tokens KL + ce_weight * sum_tokens CE)

``scale`` is usually ``1 / tokens`` of the whole optimizer step (gradient accumulation normalised by tokens).
No tau^2 factor is applied (the Minitron recipe uses tau = 1).

The top-k variant distils from offline teacher log-probabilities kept for ``k`` tokens only: the teacher's
remaining mass ``p_tail = 1 - sum_k p_k`` is matched against the student's mass outside the same k tokens,
``KL = sum_k p_k log(p_k / q_k) + p_tail log(p_tail / q_tail)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elementwise work is done a block of token rows at a time in reused scratch buffers of about
# BLOCK_ELEMS fp32 values each (8 MiB): big enough that per-op overhead vanishes, small enough to stay cheap.
BLOCK_ELEMS = 2**21


def row_block(vocab: int) -> int:
    """Token rows per elementwise block."""
    return max(8, BLOCK_ELEMS // vocab)
# Target size of one [chunk, vocab] fp32 logits buffer (two are alive: student and teacher).
CHUNK_BYTES = 64 * 2**20
# Vocab-major layout: the GEMMs want wider chunks (256 tokens at vocab 128k: 128 MiB per buffer) ...
VMAJOR_CHUNK_BYTES = 128 * 2**20
# ... and the softmax passes a [rows, chunk] block of about VBLOCK_ELEMS fp32 values (1 MiB: L2-resident).
VBLOCK_ELEMS = 2**18


def auto_chunk(n_tokens: int, vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one fp32 [chunk, vocab] buffer is at most about ``budget`` bytes: a multiple
    of 16 (GEMM widths that are not run up to 40% slower on CPU), at least 16, at most ``n_tokens``."""
    return min(n_tokens, max(16, budget // (4 * vocab) // 16 * 16))


def _logits_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``out <- (x @ y^T) * inv_tau`` in fp32: x = h [n, H], y = W [V, H] for token-major logits [n, V], or
    x = W, y = h for vocab-major ones [V, n]. Returns ``out``."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        torch.mm(x, y.t(), out=out)
    else:  # bf16/fp16 GEMM (GPU autocast), softmax statistics in fp32
        out.copy_(x @ y.t())
    if inv_tau != 1.0:
        out.mul_(inv_tau)
    return out


def _scratch(n: int, vocab: int, device) -> list[torch.Tensor]:
    """Two reusable [row_block, vocab] fp32 buffers for the elementwise work of one top-k row block."""
    return [torch.empty(min(n, row_block(vocab)), vocab, dtype=torch.float32, device=device) for _ in range(2)]


def _softmax_into(buf: torch.Tensor, x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """buf <- exp(factor * x) (x shifted, <= 0); returns the row sums [r] (buf is not normalised)."""
    if factor != 1.0:
        torch.mul(x, factor, out=buf)
        buf.exp_()
    else:
        torch.exp(x, out=buf)
    return buf.sum(-1)


def vmajor_rows(n: int) -> int:
    """Vocabulary rows per softmax block of a vocab-major [V, n] chunk (about VBLOCK_ELEMS values); sizes the
    scratch buffer of ``_chunk_full_vmajor``."""
    return max(64, VBLOCK_ELEMS // n)


def _vmajor_view(buf: torch.Tensor, vocab: int, n: int) -> torch.Tensor:
    """A contiguous [vocab, n] view of the start of a flat buffer (the last chunk is narrower)."""
    return buf[: vocab * n].view(vocab, n)


def _chunk_full_vmajor(s, t, y, tau, kd_w, ce_w, want_grad, scratch):
    """One chunk against full teacher logits, vocab-major; s becomes d(loss)/d(logits) when ``want_grad``.

    s, t: [V, n] fp32 logits / tau (both modified in place); y: [n] targets (-100 = no CE); scratch: a flat
    fp32 buffer whose size sets the softmax block (``vmajor_rows`` of the widest chunk).
    Three passes over blocks of vocabulary rows: (1) column maxima; (2) shifted exps written in place, their
    sums, and sum_v exp(t') (t - s); (3) the gradient ``kd_c (q - p) + ce_c (softmax(s) - onehot(y))``.
    Returns (kl [n], ce [n]).
    """
    vocab, n = s.shape
    rows = scratch.numel() // n  # a narrower last chunk gets taller blocks of the same size
    cols = torch.arange(n, device=s.device)
    valid = y != -100
    ys = y.clamp_min(0)
    s_y = s[ys, cols]  # student logit / tau at the target
    ms = torch.full((n,), -math.inf, device=s.device)
    mt = torch.full_like(ms, -math.inf)
    for v in range(0, vocab, rows):
        torch.maximum(ms, s[v:v + rows].amax(0), out=ms)
        torch.maximum(mt, t[v:v + rows].amax(0), out=mt)
    zs, zt, dot = torch.zeros_like(ms), torch.zeros_like(ms), torch.zeros_like(ms)
    ce1 = ce_w != 0 and tau != 1.0  # CE is at tau = 1: its softmax is exp(s')^tau
    z1 = torch.zeros_like(ms) if ce1 else zs
    for v in range(0, vocab, rows):
        sb, tb = s[v:v + rows], t[v:v + rows]
        diff = torch.sub(tb, sb, out=scratch[: sb.numel()].view(sb.shape))
        sb.sub_(ms).exp_()
        tb.sub_(mt).exp_()
        zs += sb.sum(0)
        zt += tb.sum(0)
        dot += diff.mul_(tb).sum(0)
        if ce1:
            z1 += sb.pow(tau).sum(0)
    kl = dot / zt - mt - zt.log() + ms + zs.log()
    ce = ((z1.log() + ms * tau) - s_y * tau) * valid
    if want_grad:
        kd_c, ce_c = kd_w / tau, valid.float() * ce_w
        a = (kd_c + (0.0 if ce1 else ce_c)) / zs  # s <- a * exp(s') - (kd_c / zt) * exp(t')
        b = -kd_c / zt
        for v in range(0, vocab, rows):
            sb = s[v:v + rows]
            if ce1:
                extra = sb.pow(tau).mul_(ce_c / z1)
                sb.mul_(a).addcmul_(t[v:v + rows], b).add_(extra)
            else:
                sb.mul_(a).addcmul_(t[v:v + rows], b)
        s[ys, cols] -= ce_c
    return kl, ce


def _block_topk(s, ids, lp, y, tau, kd_w, ce_w, want_grad, scratch):
    """One row block against the teacher's top-k log-probs ``lp`` [r, k] at token ids ``ids`` [r, k].

    The teacher's tail mass (outside its top k) is matched with the student's mass outside the same k tokens.
    """
    r = s.shape[0]
    a, c = (x[:r] for x in scratch)
    s.sub_(s.amax(-1, keepdim=True))
    valid = y != -100
    ys = y.clamp_min(0)[:, None]
    s_y = s.gather(1, ys).squeeze(1)
    s_k = s.gather(1, ids)  # [r, k] student logits at the teacher's top k
    s.scatter_(1, ids, -math.inf)  # so that the sum below is the student's tail directly (no 1 - x cancellation)
    z_tail = _softmax_into(a, s)
    zs = z_tail + s_k.exp().sum(-1)
    log_q_k = s_k - zs.log()[:, None]
    log_q_tail = z_tail.log() - zs.log()
    p_k = lp.exp()
    p_tail = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    has_tail = (p_tail > 0) & (z_tail > 0)  # k = vocab: no tail on either side
    tail_term = torch.where(has_tail, p_tail * log_q_tail, torch.zeros_like(p_tail))
    kl = (p_k * (lp - log_q_k)).sum(-1) + torch.xlogy(p_tail, p_tail) - tail_term
    ce1 = ce_w != 0 and tau != 1.0
    z1 = (_softmax_into(c, s, tau) + torch.exp(s_k * tau).sum(-1)) if ce1 else zs
    ce = (z1.log() - s_y * tau) * valid
    if want_grad:
        kd_c, ce_c = kd_w / tau, valid.float() * ce_w
        tail = kd_c * (1.0 - p_tail / (z_tail / zs).clamp_min(1e-30))  # outside top k: kd_c q (1 - p_tail / q_tail)
        a.mul_((tail / zs)[:, None])
        if ce_w != 0:  # + ce_c * softmax(s)
            a.addcmul_(c if ce1 else torch.exp(s, out=c), (ce_c / z1)[:, None])
        q_k = log_q_k.exp()
        g_k = (q_k - p_k) * kd_c + (torch.exp(s_k * tau) / z1[:, None] if ce1 else q_k) * ce_c[:, None]
        s.copy_(a).scatter_(1, ids, g_k).scatter_add_(1, ys, -ce_c[:, None])
    return kl, ce


class FusedKDFunction(torch.autograd.Function):
    """Chunked forward KL + CE from hidden states and lm_head weights, gradients computed in the forward pass.

    Inputs: h_s [N, Hs], w_s [V, Hs] (student); either h_t [N, Ht], w_t [V, Ht] (teacher) or
    topk_ids [N, k] (long), topk_lp [N, k] (teacher log-probs at tau); targets [N] (-100 = no CE).
    Outputs: loss (scalar, differentiable), kl_sum and ce_sum (scalars, for logging).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, topk_ids, topk_lp, targets, tau, kd_w, ce_w, scale, chunk):
        n_tok, vocab = h_s.shape[0], w_s.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = h_s.device
        with torch.autocast(device.type, enabled=False):
            cdt = h_s.dtype  # GEMM dtype (bf16 under GPU autocast); softmax math in fp32
            w_s_c = w_s.detach().to(cdt)
            grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=device) if want_h else None
            grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=device) if want_w else None
            kl_sum = torch.zeros((), dtype=torch.float32, device=device)
            ce_sum = torch.zeros((), dtype=torch.float32, device=device)
            if h_t is not None:
                chunk = chunk or auto_chunk(n_tok, vocab, VMAJOR_CHUNK_BYTES)
                width = min(chunk, n_tok)
                s_buf = torch.empty(vocab * width, dtype=torch.float32, device=device)
                t_buf = torch.empty_like(s_buf)
                scratch = torch.empty(vmajor_rows(width) * width, dtype=torch.float32, device=device)
                w_t_c = w_t.detach().to(h_t.dtype)
            else:
                chunk = chunk or auto_chunk(n_tok, vocab)
                s_buf = torch.empty(min(chunk, n_tok), vocab, dtype=torch.float32, device=device)
                scratch = _scratch(n_tok, vocab, device)
            for a in range(0, n_tok, chunk):
                b = min(a + chunk, n_tok)
                h = h_s[a:b].detach()
                if h_t is not None:  # vocab-major: s, t are [V, n]
                    s = _logits_into(_vmajor_view(s_buf, vocab, b - a), w_s_c, h, 1.0 / tau)
                    t = _logits_into(_vmajor_view(t_buf, vocab, b - a), w_t_c, h_t[a:b].detach(), 1.0 / tau)
                    kl, ce = _chunk_full_vmajor(s, t, targets[a:b], tau, kd_w, ce_w, want_h or want_w, scratch)
                    kl_sum += kl.sum()
                    ce_sum += ce.sum()
                    g, g_t = s.t(), s  # [n, V] and [V, n] views of the gradient
                else:  # top-k teacher (or plain CE): token-major, s is [n, V]
                    s = _logits_into(s_buf[: b - a], h, w_s_c, 1.0 / tau)
                    rb = row_block(vocab)
                    for i in range(0, b - a, rb):
                        j = min(i + rb, b - a)
                        rows = slice(a + i, a + j)
                        kl, ce = _block_topk(s[i:j], topk_ids[rows], topk_lp[rows].float(), targets[rows], tau, kd_w,
                                             ce_w, want_h or want_w, scratch)
                        kl_sum += kl.sum()
                        ce_sum += ce.sum()
                    g, g_t = s, s.t()
                if want_h:
                    grad_h[a:b] = g.to(cdt) @ w_s_c
                if want_w:
                    grad_w.addmm_(g_t, h.float())
        # Kept on ctx (not save_for_backward) so that backward can rescale them in place: no second
        # [V, Hs] buffer. A second backward through the same graph is refused.
        ctx.grads = (grad_h, grad_w)
        ctx.scale = scale
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        loss = (kd_w * kl_sum + ce_w * ce_sum) * scale
        return loss, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _g_kl, _g_ce):
        if ctx.grads is None:
            raise RuntimeError("FusedKDFunction: backward was already run for this loss (no retain_graph support)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        f = grad_loss * ctx.scale
        gh = grad_h.mul_(f).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = grad_w.mul_(f).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    tau: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale: float = 1.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scale * (kd_weight * sum KL + ce_weight * sum CE)`` over N tokens, chunked; returns (loss, kl_sum, ce_sum).

    student_hidden [N, Hs] (final-norm output), student_weight [V, Hs] (lm_head); teacher_hidden [N, Ht] and
    teacher_weight [V, Ht], or topk_ids [N, k] + topk_logprobs [N, k] (offline teacher); targets [N] next-token
    ids (-100 = ignore), needed when ce_weight != 0. Leading batch dims are flattened.
    """
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_tok = hs.shape[0]
    if targets is None:
        if ce_weight != 0:
            raise ValueError("fused_kd_loss: ce_weight != 0 needs targets")
        targets = torch.full((n_tok,), -100, dtype=torch.long, device=hs.device)
    y = targets.reshape(-1)
    if teacher_hidden is not None:
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if ht.shape[0] != n_tok or teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher {tuple(ht.shape)}/{tuple(teacher_weight.shape)} does not match student "
                             f"{tuple(hs.shape)}/{tuple(student_weight.shape)}")
        ids = lp = None
    elif topk_ids is not None:
        ht = None
        ids = topk_ids.reshape(n_tok, -1).long()
        lp = topk_logprobs.reshape(n_tok, -1)
    elif kd_weight != 0:
        raise ValueError("fused_kd_loss: kd_weight != 0 needs teacher hidden states or top-k log-probs")
    else:  # plain chunked CE: an empty top-k with no tail mass costs nothing
        ht, ids, lp = None, torch.zeros(n_tok, 0, dtype=torch.long, device=hs.device), hs.new_zeros(n_tok, 0)
    return FusedKDFunction.apply(hs, student_weight, ht, teacher_weight, ids, lp, y, float(tau), float(kd_weight),
                                 float(ce_weight), float(scale), chunk)


def naive_kd_loss(student_logits, teacher_logits, targets=None, *, tau=1.0, kd_weight=1.0, ce_weight=0.0, scale=1.0):
    """Reference: the same loss from full logits [N, V] with autograd (holds everything in memory)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    log_q = F.log_softmax(s / tau, -1)
    log_p = F.log_softmax(t / tau, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    ce = F.cross_entropy(s, targets.reshape(-1), ignore_index=-100, reduction="sum") if targets is not None else 0 * kl
    return (kd_weight * kl + ce_weight * ce) * scale, kl.detach(), ce.detach()


def naive_topk_kd_loss(student_logits, topk_ids, topk_logprobs, *, tau=1.0):
    """Reference top-k KL with the tail bucket, from full student logits [N, V] (autograd)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    ids = topk_ids.reshape(s.shape[0], -1)
    lp = topk_logprobs.reshape(s.shape[0], -1).float()
    log_q = F.log_softmax(s / tau, -1)
    log_q_k = log_q.gather(1, ids)
    log_q_tail = torch.log1p(-log_q_k.exp().sum(-1).clamp(max=1 - 1e-7))
    p_k = lp.exp()
    p_tail = (1 - p_k.sum(-1)).clamp_min(0)
    return ((p_k * (lp - log_q_k)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail).sum()


def teacher_topk(teacher_logits: torch.Tensor, k: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids [.., k] (int32) and their log-probs at temperature tau [.., k] (fp32) from logits [.., V]."""
    lp = F.log_softmax(teacher_logits.float() / tau, -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids.to(torch.int32), vals


def liger_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *, tau=1.0,
                  kd_weight=1.0, ce_weight=0.0, scale=1.0):
    """Liger's fused linear JSD at beta=0 (forward KL) on CUDA; same conventions as ``fused_kd_loss``.

    Liger averages over tokens, so the result is rescaled to a sum; only the combined loss is returned.
    Needs ``pip install liger-kernel`` and a CUDA device (untested on the CPU-only development machine).
    """
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    total = kd_weight + ce_weight
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=ce_weight / total, weight_soft_loss=kd_weight / total, beta=0.0,
                                 temperature=tau)
    loss = fn(hs, student_weight, ht, teacher_weight, targets.reshape(-1))
    return loss * hs.shape[0] * total * scale


def liger_available(device: torch.device) -> bool:
    """True when the Liger fused op can be used (CUDA device and ``liger_kernel`` importable)."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True

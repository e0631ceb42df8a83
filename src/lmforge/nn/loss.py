"""Next-token cross-entropy without the (N, vocab) logits.

Training needs the loss and its gradients, not the logits. With a large vocabulary (GPT-2's
50,257) the logits, their softmax and the softmax's gradient are each N x vocab floats and
dominate a step's memory. Both gradients of cross-entropy need only the softmax of one row:
d loss / d logits = softmax(z) - onehot(target). So the tokens are taken a chunk at a time:
the chunk's logits are made, turned into the loss and into the gradients for the hidden
states and the head's weight, and dropped. Backward then only scales what forward kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# logits elements alive at once (64 MiB in float32); below this one chunk covers every token
CHUNK_ELEMENTS = 1 << 24


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, label_smoothing: float, rows: int,
                need_grad: bool, compute_dtype: torch.dtype) -> torch.Tensor:
        eps = label_smoothing
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: float32 at least
        n_valid = (targets != ignore_index).sum()
        scale = 1.0 / n_valid.clamp(min=1).to(acc)  # a mean over the counted tokens
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        # gradients are kept in float32 (at least) and scaled by 1/n only there: in a 16-bit
        # compute dtype, softmax/n would underflow before a GradScaler could scale it up
        grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need_grad and ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) \
            if need_grad and bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.size(0), rows):
            hc, tc = h[start:start + rows].to(compute_dtype), targets[start:start + rows]
            z = F.linear(hc, w, b).to(acc)  # (n, vocab): the only logits alive
            valid = tc != ignore_index
            tc = tc.masked_fill(~valid, 0)  # any index: its row is masked out below
            lse = torch.logsumexp(z, dim=-1)
            # -log p(target), mixed with eps x the mean of -log p over the vocabulary
            per_token = lse - (1.0 - eps) * z.gather(1, tc[:, None]).squeeze(1)
            if eps:
                per_token -= eps * z.mean(dim=-1)
            total += (per_token * valid).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            p[torch.arange(len(tc), device=p.device), tc] -= 1.0 - eps  # - the smoothed target
            if eps:
                p -= eps / p.size(1)
            p.mul_(valid[:, None])  # ignored rows contribute nothing
            if grad_b is not None:
                grad_b += p.sum(0)
            p = p.to(compute_dtype)
            if grad_h is not None:
                grad_h[start:start + rows] = p @ w
            if grad_w is not None and compute_dtype == acc:
                grad_w.addmm_(p.t(), hc)
            elif grad_w is not None:
                grad_w += (p.t() @ hc).to(acc)
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # scale (e.g. by a GradScaler's factor) first, then go back to each input's dtype
        grads = [None if g is None else (g * grad_loss).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = -1,
                          label_smoothing: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of logits = h @ weight.T (+ bias) against targets, equal to
    F.cross_entropy(F.linear(h, weight, bias), targets, ignore_index=..., label_smoothing=...)
    but holding only chunk_elements logits at a time. h: (..., d), weight: (vocab, d),
    targets: (...)."""
    h = h.reshape(-1, h.size(-1))
    targets = targets.reshape(-1)
    rows = max(1, chunk_elements // weight.size(0))
    device_type = h.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else h.dtype)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, weight, bias))
    with torch.autocast(device_type, enabled=False):  # the chunks pick their dtype themselves
        return _ChunkedCrossEntropy.apply(h, weight, bias, targets, ignore_index, label_smoothing, rows,
                                          need_grad, compute_dtype)


def head_loss(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int = -1,
              label_smoothing: float = 0.0) -> torch.Tensor | None:
    """The mean cross-entropy of head(h) against targets without making its logits whole; None
    when they are small (making them is then the fastest way); the caller then makes them."""
    if targets.numel() * getattr(head, "out_features", 0) <= CHUNK_ELEMENTS:
        return None
    weight = head_weight(head)
    if weight is None:  # e.g. a quantized frozen head: chunks of tokens through the module itself
        return recomputed_chunk_loss(h, head, targets, ignore_index, label_smoothing)
    return chunked_cross_entropy(h, weight, targets, head.bias, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, chunk_elements=CHUNK_ELEMENTS)


def recomputed_chunk_loss(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int = -1,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """The mean cross-entropy of head(h) for any head module (e.g. a quantized frozen one, which
    has no weight to hand to chunked_cross_entropy), a chunk of tokens at a time: each chunk's
    logits are made, reduced to a loss and dropped, then made again in backward (activation
    checkpointing of the head), so only one chunk's logits ever exist."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    # a quarter of chunked_cross_entropy's chunk: such a head's own product holds copies of the
    # chunk's logits (its compute dtype, then float32, then their gradient) beside it
    rows = max(1, CHUNK_ELEMENTS // 4 // max(getattr(head, "out_features", 1), 1))

    def chunk_loss(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        z = head(hc)
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # the softmax in >= fp32
        return F.cross_entropy(z, tc, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)

    total = sum(checkpoint(chunk_loss, h[i:i + rows], targets[i:i + rows], use_reentrant=False)
                for i in range(0, h.size(0), rows))
    return total / (targets != ignore_index).sum().clamp(min=1)


def head_weight(head: nn.Module) -> torch.Tensor | None:
    """The output head's weight as one tensor, for chunked_cross_entropy: a plain Linear's own,
    or an adapted head's W + scaling B A (its `effective_weight`); None when the head's output
    is not x @ W.T + b for any single W (then the caller makes the logits as usual)."""
    if hasattr(head, "effective_weight"):
        return head.effective_weight()
    return head.weight if type(head) is nn.Linear else None

"""Scaled dot-product attention and the multi-head module used by every model.

`attention_reference` is the formula written out; `MultiHeadAttention` uses PyTorch's fused
`scaled_dot_product_attention`, and the tests check that the two agree."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .positional import apply_rotary
from .softcap import softcap


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i may look at key j.

    Queries are the last t_q of the t_k positions (the rest sit in a KV cache), so query i
    sits at position t_k - t_q + i and sees keys up to and including that position."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def sliding_window_mask(q_pos: torch.Tensor, t_k: int, window: int) -> torch.Tensor:
    """Boolean mask, True where a query at position p may look at key j: p - window < j <= p
    (causal, and at most `window` keys back, itself included; Mistral's and Gemma 2's rule).

    q_pos: (T,) or (B, T) positions of the queries; keys are at positions 0..t_k-1 (a KV cache
    keeps every position, so the window is a mask, not a rolling buffer).
    Returns (T, t_k) or (B, 1, T, t_k)."""
    j = torch.arange(t_k, device=q_pos.device)  # (t_k,)
    p = q_pos[..., None]  # (..., T, 1)
    mask = (j <= p) & (j > p - window)  # (..., T, t_k)
    return mask[:, None] if mask.dim() == 3 else mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap_at: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V, literally.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); mask: bool, broadcastable to (B, nh, Tq, Tk),
    True = may attend. Dividing by sqrt(d_k) keeps the scores' variance near 1 whatever the
    head size, so the softmax does not saturate into a one-hot and starve the gradients.
    `scale` replaces 1/sqrt(d_k) (Gemma 2: query_pre_attn_scalar^-0.5); `softcap_at` caps
    the scores with cap * tanh(s / cap) before the mask (`softcap`). The softmax runs in float32;
    `dropout` drops attention weights (training).
    Returns the output (B, nh, Tq, hs) and the attention weights (B, nh, Tq, Tk)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each K/V head serves several Q heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcap(q @ k.transpose(-2, -1) * scale, softcap_at)  # (B, nh, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (F.dropout(weights, dropout) if dropout else weights) @ v, weights


class KVCache:
    """Keys and values of the positions seen so far, preallocated once for `max_len` positions
    and every layer, so each decoding step only writes its own slot (no concatenation)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # number of positions filled, the same for every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) after the cached positions; return all keys and values."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its n new positions."""
        self.pos += n

    def split_by_layer(self) -> None:
        """Give every layer its keys and values in a tensor of its own (k[layer] still indexes
        them). A compiled step then writes them in place; writes into views of the one
        (n_layer, ...) tensor made inductor copy the whole cache at every layer."""
        self.k, self.v = [t.clone() for t in self.k], [t.clone() for t in self.v]


class MultiHeadAttention(nn.Module):
    """Several attention heads side by side; their outputs are concatenated and mixed by `proj`
    (W_O). Self-attention projects Q, K and V from `x` with one fused matrix `qkv`;
    cross-attention (`cross=True`) takes Q from `x` (`q`) and K, V from the encoder output
    (`kv`). With `n_kv_head < n_head`, groups of query heads share one K/V head (GQA)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, bias: bool = True,
                 dropout: float = 0.0, causal: bool = True, cross: bool = False,
                 qk_norm: bool = False, layer_idx: int = 0, head_dim: int | None = None,
                 qkv_bias: bool | None = None, qk_norm_eps: float | None = None,
                 window: int | None = None, scale: float | None = None, softcap_at: float | None = None):
        """head_dim: per-head width (default dim / n_head; Qwen3 and Gemma 2 decouple it).
        qkv_bias: biases on Q, K, V only (Qwen2), default `bias`. window: sliding-window
        attention over the last `window` positions. scale: replaces 1/sqrt(head_dim).
        softcap_at: cap the scores with cap * tanh(s / cap) (Gemma 2; runs the reference formula,
        which PyTorch's fused kernel cannot express)."""
        super().__init__()
        n_kv_head = n_kv_head or n_head
        assert (head_dim is not None or dim % n_head == 0) and n_head % n_kv_head == 0
        head_dim = head_dim or dim // n_head
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.causal, self.cross, self.layer_idx = causal, cross, layer_idx
        self.window, self.scale, self.softcap_at = window, scale, softcap_at
        q_dim, kv_dim = n_head * head_dim, 2 * n_kv_head * head_dim
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if cross:
            self.q = nn.Linear(dim, q_dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, kv_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, q_dim + kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(q_dim, dim, bias=bias)
        # QK-norm: normalise queries and keys per head, which keeps attention logits bounded.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else None
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.record_weights = False  # set True to keep the last attention map (for inspection)
        self.last_weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output memory (B, S, C), each
        (B, nkv, S, hs). A decoder computes them once per sentence and passes them as `kv` at
        every step, instead of re-projecting the same memory for each new token."""
        k, v = self.kv(memory).split(self.n_kv_head * self.head_dim, dim=2)
        k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)  # (B, nkv, S, hs)
        return (self.k_norm(k) if self.k_norm is not None else k), v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C). memory: (B, S, C), the encoder output, for cross-attention.
        mask: bool broadcastable to (B, nh, T, S), True = may attend (e.g. padding).
        rope: (cos, sin) for x's positions. cache: keys/values of earlier positions.
        kv: cross-attention only, `project_kv(memory)` computed earlier (memory is then unused).
        positions: (T,) or (B, T), the queries' positions, for a sliding window over a KV cache
        (default: the last T of the keys' positions; without a cache, always the tokens' slots)."""
        B, T, C = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            k, v = kv if kv is not None else self.project_kv(memory)  # (B, nkv, S, hs), normed
        else:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=2)
            q = self._heads(q, self.n_head)  # (B, nh, T, hs)
            k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)  # (B, nkv, T, hs)
            if self.k_norm is not None:
                k = self.k_norm(k)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)

        causal = self.causal and not self.cross
        t_k = k.shape[2]
        if self.window is not None and t_k > self.window:  # shorter: no key is out of the window
            if positions is None or cache is None:
                # without a cache the keys are this call's own tokens, so the window counts their
                # slots: a packed row's positions restart at each example, its slots do not
                positions = torch.arange(t_k - T, t_k, device=x.device)  # (T,)
            window = sliding_window_mask(positions, t_k, self.window)  # (T, S) or (B, 1, T, S)
            mask = window if mask is None else mask & window
        if self.record_weights or self.softcap_at is not None:
            y, w = attention_reference(q, k, v, causal=causal, mask=mask, scale=self.scale,
                                       softcap_at=self.softcap_at, dropout=self.dropout if self.training else 0.0)
            if self.record_weights:
                self.last_weights = w.detach()
        else:
            y = self._sdpa(q, k, v, causal, mask)
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # heads side by side again: (B, T, nh * hs)
        return self.resid_dropout(self.proj(y))

    def _sdpa(self, q, k, v, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
        t_q, t_k = q.shape[2], k.shape[2]
        is_causal = causal and mask is None and t_q == t_k  # the fused kernel's fast path
        if causal and not is_causal and t_q > 1:
            cm = causal_mask(t_q, t_k, q.device)
            mask = cm if mask is None else mask & cm
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head, scale=self.scale,
        )

"""GPT: a stack of decoder blocks that predicts the next token.

token ids -> token embedding (+ positions) -> n_layer x Block -> final norm -> LM head -> logits.
Each Block is pre-LN: x + attn(norm(x)), then x + mlp(norm(x)). The residual stream lets
gradients flow straight to the bottom layers; the norms keep each sub-layer's input well scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from ..nn import MLP, KVCache, LearnedPositions, MultiHeadAttention, RotaryEmbedding, SinusoidalPositions, make_norm
from ..config import ConfigBase, check_choice
from ..nn.loss import head_loss
from ..nn.softcap import softcap


@dataclass
class GPTConfig(ConfigBase):
    vocab_size: int = 50257
    block_size: int = 1024  # longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: yes; Llama: no)
    pos_encoding: str = "learned"  # learned | sinusoidal | rope
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    mlp_ratio: float = 4.0  # hidden width of the MLP as a multiple of n_embd
    n_kv_head: int | None = None  # < n_head for grouped-query attention; None = n_head
    qk_norm: bool = False
    rope_theta: float = 10000.0
    # --- the switches of today's open-weight families (defaults: off, the models above unchanged)
    head_dim: int | None = None  # per-head width; None = n_embd // n_head (Qwen3, Gemma 2 differ)
    mlp_hidden_size: int | None = None  # explicit MLP width; None = mlp_ratio * n_embd, rounded to 8
    qkv_bias: bool = False  # biases on Q, K, V even when bias=False (Qwen2)
    qk_norm_eps: float | None = None  # eps of the QK-norms; None = PyTorch's default
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1's frequency rescaling, the four below)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192  # the context the model was pretrained with
    sliding_window: int | None = None  # attend to at most this many positions back (Mistral, Gemma 2)
    sliding_window_layers: str = "all"  # all | even (Gemma 2: layers 0, 2, 4, ... slide, the others see all)
    attn_scale: float | None = None  # attention score scale; None = head_dim ** -0.5
    attn_softcap: float | None = None  # cap attention scores with cap * tanh(s / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
    norm_unit_offset: bool = False  # RMSNorm gain stored as 1 + w (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    post_norms: bool = False  # also norm each sub-layer's output before the residual add (Gemma 2)

    def validate(self) -> None:
        check_choice("pos_encoding", self.pos_encoding, ("learned", "sinusoidal", "rope"))
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("mlp", self.mlp, ("gelu", "swiglu", "geglu"))
        check_choice("rope_scaling", self.rope_scaling, ("none", "llama3"))
        check_choice("sliding_window_layers", self.sliding_window_layers, ("all", "even"))
        if self.head_dim is None:
            self.check_heads(self.n_embd, self.n_head, self.n_kv_head)
        else:
            self.check_heads(self.n_head * self.head_dim, self.n_head, self.n_kv_head)
        self.check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        for name in ("head_dim", "mlp_hidden_size", "sliding_window", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                self.fail(f"{name} must be positive or None, got {getattr(self, name)}")
        if self.pos_encoding == "rope" and self.head_size % 2:
            self.fail(f"rope needs an even head size, got {self.head_size}")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            self.fail("norm_unit_offset needs norm=rmsnorm")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return 8 * math.ceil(self.mlp_ratio * self.n_embd / 8)  # rounded up to a multiple of 8

    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (None: it sees the whole context)."""
        if self.sliding_window_layers == "even" and layer % 2:
            return None
        return self.sliding_window

    @property
    def llama3_rope(self) -> tuple[float, float, float, int] | None:
        if self.rope_scaling != "llama3":
            return None
        return (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_position)


class Block(nn.Module):
    """Pre-norm: x + attn(ln_1(x)), then x + mlp(ln_2(x)). With `post_norms` (Gemma 2's
    sandwich) each sub-layer's output is normed too before it joins the residual stream."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.ln_1 = norm()
        self.attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.bias, cfg.dropout,
                                       causal=True, qk_norm=cfg.qk_norm, layer_idx=layer_idx,
                                       head_dim=cfg.head_dim, qkv_bias=cfg.bias or cfg.qkv_bias,
                                       qk_norm_eps=cfg.qk_norm_eps, window=cfg.window(layer_idx),
                                       scale=cfg.attn_scale, softcap_at=cfg.attn_softcap)
        self.ln_2 = norm()
        self.mlp = MLP(cfg.n_embd, cfg.mlp_hidden, cfg.mlp, cfg.bias, cfg.dropout)
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = norm(), norm()

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn(self.ln_1(x), mask=mask, rope=rope, cache=cache, positions=positions)
        x = x + (self.post_attn_norm(h) if hasattr(self, "post_attn_norm") else h)
        h = self.mlp(self.ln_2(x))
        return x + (self.post_mlp_norm(h) if hasattr(self, "post_mlp_norm") else h)


class GPT(nn.Module):
    kind = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(
            cfg.pos_encoding, lambda *_: None)(cfg.block_size, cfg.n_embd)
        self.rope = (RotaryEmbedding(cfg.head_size, cfg.block_size, cfg.rope_theta, cfg.llama3_rope)
                     if cfg.pos_encoding == "rope" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # training: recompute each block in backward (the trainer sets it)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding and isinstance(self.pos_emb, LearnedPositions):
            n -= self.pos_emb.weight.numel()
        return n

    def make_cache(self, batch: int, max_len: int | None = None,
                   device=None, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        ref = self.tok_emb.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head or cfg.n_head, cfg.head_size,
                       max_len or cfg.block_size, device or ref.device, dtype or ref.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, return_logits: bool = True):
        """idx: (B, T) token ids. Returns logits (B, T, vocab); with `targets` (B, T) returns
        (logits, mean cross-entropy), ignoring target positions equal to -1. With
        `return_logits=False` the logits may come back as None: when they would be large, the
        loss is then computed a chunk of tokens at a time and they never exist whole.
        With a `cache`, idx holds only the new tokens, placed after the cached ones.
        For rows at different offsets (batched serving): `positions` (B, T) are each token's
        position (the caller keeps them below block_size) and `mask`, bool broadcastable to
        (B, nh, T, S), True = may attend, is handed to every attention layer."""
        B, T = idx.shape
        if positions is None:
            start = cache.pos if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.embed_scale:  # sqrt(C) rounded to the embedding's dtype, as Gemma does
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # + (T, C) or (B, T, C)
        rope = self.rope(positions) if self.rope is not None else None
        if rope is not None and positions.dim() == 2:
            rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hd): the same for every head
        x = self.drop(x)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, None, mask, positions, use_reentrant=False)
            else:
                x = block(x, rope=rope, cache=cache, mask=mask, positions=positions)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        if targets is not None and not return_logits and self.config.final_softcap is None:
            loss = head_loss(x, self.lm_head, targets)  # None: the logits are small, make them
            if loss is not None:
                return None, loss
        logits = softcap(self.lm_head(x), self.config.final_softcap)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        """Continue each row of idx (B, T); returns (B, T + max_new_tokens). Temperature 0 is
        greedy. Uses a KV cache; once the context is longer than block_size, keeps the last
        block_size tokens.

        Called in eval mode, it first stores each linear weight (in, out)-contiguous, the
        layout a batch-1 product reads fastest (`prepare_for_decoding(packed=False)`; once):
        the same Parameters and values, so the model still trains and saves as before."""
        from .decoding import generate_ids, prepare_for_decoding

        if not self.training:
            prepare_for_decoding(self, packed=False)  # a no-op once the weights are laid out
        return generate_ids(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, generator=generator, **kwargs)

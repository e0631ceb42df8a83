"""The encoder-decoder Transformer of "Attention Is All You Need", for translation.

source ids -> embedding * sqrt(d) + sinusoids -> n_enc_layer x EncoderBlock -> memory
target ids -> embedding * sqrt(d) + sinusoids -> n_dec_layer x DecoderBlock(memory) -> logits

An EncoderBlock is self-attention (padding masked) and a feed-forward network; a DecoderBlock
is causal self-attention, cross-attention (queries from the target, keys and values from the
encoder's memory) and a feed-forward network. Each sub-layer sits in a residual connection with
LayerNorm: after the sum (post-LN, the paper) or before the sub-layer (pre-LN, steadier to
train deep stacks). The encoder runs once per sentence; when decoding token by token, each
decoder layer keeps its own keys/values in a KV cache and its cross-attention keys/values
(which depend only on the source) are computed once and reused at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase, check_choice
from ..nn import MLP, KVCache, LearnedPositions, MultiHeadAttention, SinusoidalPositions, make_norm
from ..nn.loss import head_loss


@dataclass
class Seq2SeqConfig(ConfigBase):
    vocab_size: int = 8000  # one vocabulary shared by both languages
    max_len: int = 256  # longest source or target sequence, in tokens (special tokens included)
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    n_head: int = 4
    n_embd: int = 256  # d_model
    ffn_hidden: int = 1024  # d_ff, the feed-forward network's inner width
    mlp: str = "relu"  # relu (the paper) | gelu | swiglu
    dropout: float = 0.1  # after embeddings, inside attention, after every sub-layer
    bias: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "post"  # post (the paper: norm(x + f(x))) | pre (x + f(norm(x)))
    pos_encoding: str = "sinusoidal"  # sinusoidal | learned
    scale_embeddings: bool = True  # multiply embeddings by sqrt(n_embd), as the paper does
    tie_embeddings: bool = True  # source, target and output tables are one matrix
    label_smoothing: float = 0.1
    pad_id: int = 0  # padding, ignored by attention and by the loss
    bos_id: int = 1  # starts every decoder input
    eos_id: int = 2  # ends every source and target

    def validate(self) -> None:
        check_choice("norm_position", self.norm_position, ("post", "pre"))
        check_choice("pos_encoding", self.pos_encoding, ("sinusoidal", "learned"))
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("mlp", self.mlp, ("relu", "gelu", "swiglu"))
        self.check_heads(self.n_embd, self.n_head, None)
        self.check_positive("vocab_size", "max_len", "n_enc_layer", "n_dec_layer", "ffn_hidden")
        if not 0.0 <= self.label_smoothing < 1.0:
            self.fail(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                self.fail(f"{name} {getattr(self, name)} is outside the vocabulary (0..{self.vocab_size - 1})")


class SubLayer(nn.Module):
    """Residual connection + norm around one sub-layer, post-LN or pre-LN."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.pre = cfg.norm_position == "pre"

    def forward(self, x: torch.Tensor, f) -> torch.Tensor:
        if self.pre:
            return x + f(self.norm(x))
        return self.norm(x + f(x))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                       causal=False, layer_idx=layer_idx)
        self.mlp = MLP(cfg.n_embd, cfg.ffn_hidden, cfg.mlp, cfg.bias, cfg.dropout)
        self.sub_attn, self.sub_mlp = SubLayer(cfg), SubLayer(cfg)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.sub_attn(x, lambda h: self.attn(h, mask=src_mask))
        return self.sub_mlp(x, self.mlp)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                            causal=True, layer_idx=layer_idx)
        self.cross_attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                             cross=True, layer_idx=layer_idx)
        self.mlp = MLP(cfg.n_embd, cfg.ffn_hidden, cfg.mlp, cfg.bias, cfg.dropout)
        self.sub_self, self.sub_cross, self.sub_mlp = SubLayer(cfg), SubLayer(cfg), SubLayer(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor,
                cache: KVCache | None = None,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.sub_self(x, lambda h: self.self_attn(h, cache=cache))
        x = self.sub_cross(x, lambda h: self.cross_attn(h, memory=memory, mask=src_mask, kv=memory_kv))
        return self.sub_mlp(x, self.mlp)


@dataclass
class DecodeState:
    """What token-by-token decoding carries from step to step: the padding mask of the source,
    each decoder layer's cross-attention keys/values (fixed for the sentence) and the KV cache
    of the decoder's self-attention (one more position per step)."""

    src_mask: torch.Tensor  # (B, 1, 1, S)
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer, (B, nh, S, hs)
    cache: KVCache | None = None

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep rows `index` (B',) of the batch, e.g. the surviving beams. With cross=False the
        source side is left alone (all beams of a sentence share it)."""
        if self.cache is not None:
            self.cache.k = self.cache.k.index_select(1, index)
            self.cache.v = self.cache.v.index_select(1, index)
        if cross:
            self.src_mask = self.src_mask.index_select(0, index)
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]


class Transformer(nn.Module):
    kind = "seq2seq"
    config_class = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.src_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_id)
        self.tgt_emb = self.src_emb if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.n_embd,
                                                                           padding_idx=cfg.pad_id)
        positions = SinusoidalPositions if cfg.pos_encoding == "sinusoidal" else LearnedPositions
        self.pos_emb = positions(cfg.max_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_enc_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_dec_layer))
        # pre-LN leaves the residual stream un-normalised, so each stack ends with a norm
        pre = cfg.norm_position == "pre"
        self.enc_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps) if pre else nn.Identity()
        self.dec_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps) if pre else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def _init_weights(self) -> None:
        """Xavier for the projections; embeddings ~ N(0, d^-1/2), so that after the sqrt(d)
        scale they have unit variance and, tied to the output layer, give logits of unit scale."""
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "emb" not in name:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)
        for emb in {self.src_emb, self.tgt_emb}:
            nn.init.normal_(emb.weight, mean=0.0, std=self.config.n_embd ** -0.5)
            with torch.no_grad():
                emb.weight[self.config.pad_id].zero_()
        if isinstance(self.pos_emb, LearnedPositions):
            nn.init.normal_(self.pos_emb.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    # ---- the two halves ----------------------------------------------------------------
    def _embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len {self.config.max_len}")
        x = table(ids)  # (B, T, C)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.n_embd)
        pos = torch.arange(start, start + T, device=ids.device)
        return self.drop(x + self.pos_emb(pos))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (B, S) ids, padded with pad_id. Returns memory (B, S, C) and the key mask
        (B, 1, 1, S), True at real tokens, which every later attention over memory uses."""
        src_mask = (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_emb, src)
        for block in self.encoder:
            x = block(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
               hidden: bool = False) -> torch.Tensor:
        """Teacher forcing: tgt_in (B, T) = bos + target; returns logits (B, T, vocab) where
        position t predicts target token t (with `hidden`, the states (B, T, C) the head reads).
        Causal masking hides later positions (and with them the padding at the end of shorter
        targets)."""
        x = self._embed(self.tgt_emb, tgt_in)
        for block in self.decoder:
            x = block(x, memory, src_mask)
        x = self.dec_norm(x)
        return x if hidden else self.lm_head(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None,
                return_logits: bool = True):
        """Returns logits (B, T, vocab); with tgt_out (B, T) returns (logits, loss), the
        label-smoothed cross-entropy over the non-padding target tokens. With
        `return_logits=False` the logits may be None: large ones are then never made whole
        (the loss goes a chunk of tokens at a time, as in GPT)."""
        memory, src_mask = self.encode(src)
        x = self.decode(tgt_in, memory, src_mask, hidden=True)
        if tgt_out is not None and not return_logits:
            loss = head_loss(x, self.lm_head, tgt_out, ignore_index=self.config.pad_id,
                             label_smoothing=self.config.label_smoothing)
            if loss is not None:
                return None, loss
        logits = self.lm_head(x)
        if tgt_out is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt_out.reshape(-1),
                               ignore_index=self.config.pad_id, label_smoothing=self.config.label_smoothing)
        return logits, loss

    # ---- token-by-token decoding ---------------------------------------------------------
    def start_decoding(self, memory: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> DecodeState:
        """Project every decoder layer's cross-attention K/V from memory (once), and allocate
        the self-attention cache for up to max_len target positions."""
        cfg = self.config
        kv = [block.cross_attn.project_kv(memory) for block in self.decoder]
        cache = KVCache(cfg.n_dec_layer, memory.shape[0], cfg.n_head, cfg.n_embd // cfg.n_head,
                        min(max_len, cfg.max_len), memory.device, memory.dtype)
        return DecodeState(src_mask, kv, cache)

    def decode_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """tokens: (B, T) new target ids placed after those already in state.cache (T is 1 when
        generating). Returns logits (B, T, vocab) and advances the cache."""
        cache = state.cache
        x = self._embed(self.tgt_emb, tokens, start=cache.pos)
        for block, kv in zip(self.decoder, state.memory_kv):
            x = block(x, None, state.src_mask, cache=cache, memory_kv=kv)
        cache.advance(tokens.shape[1])
        return self.lm_head(self.dec_norm(x))

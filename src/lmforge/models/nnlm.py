"""The neural n-gram language model of Bengio et al. (2003), "A Neural Probabilistic
Language Model".

P(w_t | w_{t-n+1} .. w_{t-1}) is computed from the previous n-1 words only:

    x = [C(w_{t-n+1}); ...; C(w_{t-1})]          the n-1 embeddings, concatenated
    y = b + W x + U tanh(d + H x)                 W x is the optional direct connection
    P = softmax(y)

Unlike an n-gram count table, similar words get similar embeddings, so the model generalises
to word sequences it never saw. Unlike GPT, it cannot look further back than n-1 tokens.

To share the trainer, evaluator and sampler with GPT, `forward` takes a block of T tokens and
predicts the next token at every position, each from a sliding window of the n-1 tokens
ending there; positions with fewer than n-1 tokens before them in the block see a learned
padding embedding in the missing slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase


@dataclass
class NNLMConfig(ConfigBase):
    vocab_size: int = 65
    block_size: int = 64  # positions per training block (and the decoding window)
    context: int = 8  # n-1: how many previous tokens each prediction sees
    n_embd: int = 32  # m: size of each token's embedding
    n_hidden: int = 512  # h: width of the tanh hidden layer
    direct: bool = True  # the direct input -> output connection W x of the paper
    dropout: float = 0.0  # on the hidden layer

    def validate(self) -> None:
        self.check_positive("vocab_size", "block_size", "context", "n_embd", "n_hidden")
        if not 0.0 <= self.dropout < 1.0:
            self.fail(f"dropout must be in [0, 1), got {self.dropout}")


class NNLM(nn.Module):
    kind = "nnlm"
    config_class = NNLMConfig

    def __init__(self, config: NNLMConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.pad_id = cfg.vocab_size  # an extra embedding row for "before the block"
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)  # C
        n_in = cfg.context * cfg.n_embd
        self.hidden = nn.Linear(n_in, cfg.n_hidden)  # H, d
        self.out = nn.Linear(cfg.n_hidden, cfg.vocab_size)  # U, b
        self.direct = nn.Linear(n_in, cfg.vocab_size, bias=False) if cfg.direct else None  # W
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.tok_emb.weight, std=0.1)
        nn.init.zeros_(self.out.weight)  # start at the uniform distribution: loss = ln(vocab)
        nn.init.zeros_(self.out.bias)
        if self.direct is not None:
            nn.init.zeros_(self.direct.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> None:
        """No cache: each prediction reads only the last n-1 tokens, so decoding just reruns
        the model on its (short) window."""
        return None

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) -> (B, T, n-1): for each position t, the ids idx[t-n+2 .. t], with
        pad_id where the block has no token that far back."""
        n1 = self.config.context
        pad = idx.new_full((idx.shape[0], n1), self.pad_id)
        ext = torch.cat([pad, idx], dim=1)  # (B, n-1+T); ext[j] = idx[j-(n-1)]
        return ext.unfold(1, n1, 1)[:, 1:]  # (B, T, n-1), window t = ext[t+1 .. t+n-1]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: None = None):
        """idx: (B, T) token ids. Returns logits (B, T, vocab) for the token after each position;
        with `targets` (B, T) returns (logits, mean cross-entropy), ignoring targets equal to -1.
        `cache` is accepted for the shared decoding loop and must be None."""
        B, T = idx.shape
        x = self.tok_emb(self.windows(idx)).reshape(B, T, -1)  # (B, T, (n-1) * m)
        h = self.drop(torch.tanh(self.hidden(x)))  # (B, T, h)
        logits = self.out(h)  # (B, T, vocab)
        if self.direct is not None:
            logits = logits + self.direct(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Continue each row of idx (B, T); returns (B, T + max_new_tokens)."""
        from .decoding import generate_ids

        return generate_ids(self, idx, max_new_tokens, **kwargs)

"""Decoding a batch of source sentences: greedy search and beam search.

Both run the encoder once per batch, then the decoder one token at a time with its KV cache
and the cross-attention keys/values computed once (see `Transformer.start_decoding`). The
output length is capped at `max_len_a * source_length + max_len_b` tokens."""

from __future__ import annotations

import torch

from ..models.seq2seq import Transformer


def max_output_lens(model: Transformer, src: torch.Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    """Each sentence's own cap (so a long neighbour in the batch does not change it)."""
    src_lens = (src != model.config.pad_id).sum(1).tolist()
    return [max(1, min(int(max_len_a * n + max_len_b), model.config.max_len - 1)) for n in src_lens]


def _never_special(logits: torch.Tensor, model: Transformer) -> torch.Tensor:
    """Padding and bos are inputs only: never choose them as output. logits: (B, V)."""
    logits[:, [model.config.pad_id, model.config.bos_id]] = float("-inf")
    return logits


@torch.no_grad()
def greedy_search(model: Transformer, src: torch.Tensor, max_len_a: float = 1.5,
                  max_len_b: int = 10) -> list[list[int]]:
    """src: (B, S) padded ids. Returns each sentence's output ids, eos excluded."""
    cfg = model.config
    B = src.shape[0]
    limits = max_output_lens(model, src, max_len_a, max_len_b)
    limit = max(limits)
    memory, src_mask = model.encode(src)
    state = model.start_decoding(memory, src_mask, limit + 1)
    tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    out = torch.full((B, limit), cfg.eos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    capped = torch.tensor(limits, device=src.device)
    for t in range(limit):
        logits = _never_special(model.decode_step(tokens, state)[:, -1], model)  # (B, V)
        nxt = logits.argmax(-1).masked_fill(done, cfg.eos_id)  # (B,)
        out[:, t] = nxt
        done |= (nxt == cfg.eos_id) | (capped <= t + 1)
        if bool(done.all()):
            break
        tokens = nxt[:, None]
    return [_until_eos(row[:n], cfg.eos_id) for row, n in zip(out.tolist(), limits)]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + |Y|) / 6)^alpha: log-probabilities only fall as a hypothesis grows, so
    without it beam search prefers short outputs; alpha = 0 turns it off."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, beam: int = 5, alpha: float = 0.6,
                max_len_a: float = 1.5, max_len_b: int = 10) -> list[list[int]]:
    """Keep the `beam` best partial translations of each sentence. At every step each live
    hypothesis is extended by every token; of the best 2*beam extensions per sentence, those
    ending in eos among the first `beam` are set aside as finished (scored by log-probability /
    length_penalty), the others fill the beam. A sentence is done once `beam` hypotheses have
    finished, or at the length cap. Returns the best finished hypothesis per sentence."""
    cfg = model.config
    B, K = src.shape[0], beam
    limits = max_output_lens(model, src, max_len_a, max_len_b)
    limit = max(limits)
    memory, src_mask = model.encode(src)  # once per batch
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)  # (B*K, S, C)
    state = model.start_decoding(memory, src_mask, limit + 1)
    device = src.device
    tokens = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=device)
    hyps = torch.zeros(B * K, 0, dtype=torch.long, device=device)  # tokens chosen so far
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at the start all beams are the same hypothesis: expand only one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(limit):
        logits = _never_special(model.decode_step(tokens, state)[:, -1].float(), model)
        logp = torch.log_softmax(logits, dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (B, 2K)
        top_beam, top_tok = top_idx // V, top_idx % V
        new_rows, new_tok, new_scores = [], [], []
        ts, tb, tt = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
        for b in range(B):
            kept: list[tuple[int, int, float]] = []
            for rank in range(2 * K):
                if done[b] or len(kept) == K:
                    break
                s, k, tok = ts[b][rank], tb[b][rank], tt[b][rank]
                if s == float("-inf"):
                    break
                if tok == cfg.eos_id:
                    if rank < K:
                        row = hyps[b * K + k].tolist()
                        finished[b].append((s / length_penalty(len(row) + 1, alpha), row))
                    continue
                kept.append((b * K + k, tok, s))
            if not done[b] and t + 1 >= limits[b]:  # at its length cap: the live ones finish too
                for row, tok, s in kept:
                    finished[b].append((s / length_penalty(t + 1, alpha), hyps[row].tolist() + [tok]))
                done[b] = True
            if len(finished[b]) >= K:
                done[b] = True
            while len(kept) < K:  # a done sentence (or one short of candidates): fill with dead beams
                kept.append((b * K, cfg.eos_id, float("-inf")))
            for row, tok, s in kept:
                new_rows.append(row); new_tok.append(tok); new_scores.append(s)
        if all(done):
            break
        index = torch.tensor(new_rows, device=device)
        state.reorder(index, cross=False)  # cross-attention K/V are equal across a sentence's beams
        tokens = torch.tensor(new_tok, device=device)[:, None]  # (B*K, 1)
        hyps = torch.cat([hyps.index_select(0, index), tokens], dim=1)
        scores = torch.tensor(new_scores, device=device).view(B, K)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def translate_ids(model: Transformer, src: torch.Tensor, beam: int = 1, alpha: float = 0.6,
                  max_len_a: float = 1.5, max_len_b: int = 10) -> list[list[int]]:
    if beam <= 1:
        return greedy_search(model, src, max_len_a, max_len_b)
    return beam_search(model, src, beam, alpha, max_len_a, max_len_b)


@torch.no_grad()
def translate(model: Transformer, tokenizer, sentences: list[str], beam: int = 1, alpha: float = 0.6,
              max_tokens: int = 4096, max_len_a: float = 1.5, max_len_b: int = 10) -> list[str]:
    """Translate sentences, batched by length (so padding stays small); outputs in input order."""
    from .data import encode_sentences, pad_batch

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = encode_sentences(tokenizer, sentences, model.config.max_len)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        budget = max(1, max_tokens // max(beam, 1))
        out: list[str] = [""] * len(ids)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and len(ids[order[j]]) * (j - i + 1) <= budget:
                j += 1
            batch = order[i:j]
            src = pad_batch([ids[k] for k in batch], model.config.pad_id).to(device)
            for k, hyp in zip(batch, translate_ids(model, src, beam, alpha, max_len_a, max_len_b)):
                out[k] = tokenizer.decode(hyp).strip()
            i = j
        return out
    finally:
        model.train(was_training)

"""What the model attends to: rerun a sequence with one attention layer switched to the
reference formula (`attention_reference`, which keeps its softmax weights) and read them back.

The reference and the fused kernel are tested equal (tests/test_attention.py), so the map
shown is the attention the model actually computes."""

from __future__ import annotations

import threading

import torch

from ..nn.attention import MultiHeadAttention


def attention_layers(model: torch.nn.Module) -> list[MultiHeadAttention]:
    """The self-attention modules in the order they run (for GPT: one per block)."""
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention) and not m.cross]


@torch.no_grad()
def attention_map(model: torch.nn.Module, ids: list[int], layer: int = -1, head: int | None = None,
                  lock: threading.Lock | None = None) -> dict:
    """Weights (T, T) of `layer` for the token ids: row i is how query i spreads its attention
    over keys 0..i. head None averages the heads. Raises IndexError for a layer or head that
    does not exist."""
    layers = attention_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise IndexError(f"layer {layer} does not exist; the model has {len(layers)} layers (0..{len(layers) - 1})")
    attn = layers[layer]
    if head is not None and not 0 <= head < attn.n_head:
        raise IndexError(f"head {head} does not exist; each layer has {attn.n_head} heads (0..{attn.n_head - 1})")
    device = next(model.parameters()).device
    with lock or threading.Lock():
        attn.record_weights = True
        try:
            model(torch.tensor([ids], device=device))  # (1, T) -> logits, unused
            w = attn.last_weights[0].float()  # (nh, T, T)
        finally:
            attn.record_weights, attn.last_weights = False, None
    w = w.mean(dim=0) if head is None else w[head]  # (T, T)
    return {"layer": layer % len(layers), "head": head, "n_layer": len(layers), "n_head": attn.n_head,
            "weights": [[round(x, 5) for x in row] for row in w.cpu().tolist()]}

"""Building blocks shared by every model: attention, positions, feed-forward, norms, blocks."""

from .attention import KVCache, MultiHeadAttention, attention_reference
from .feedforward import MLP
from .norm import make_norm
from .positional import LearnedPositions, RotaryEmbedding, SinusoidalPositions, sinusoidal_table

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "attention_reference",
    "MLP",
    "make_norm",
    "LearnedPositions",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "sinusoidal_table",
]

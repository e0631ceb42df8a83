"""lmforge: language models from first principles on PyTorch.

    import lmforge
    model, tok = lmforge.load("RUN")
    text = lmforge.generate(model, tok, "To be", max_new_tokens=50, temperature=0.8, top_k=50, seed=0)
"""

from .checkpoint import load_run as load
from .errors import LMForgeError
from .generate import generate, stream
from .models.gpt import GPT, GPTConfig
from .tokenizers import BPETokenizer, CharTokenizer

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream", "GPT", "GPTConfig", "BPETokenizer", "CharTokenizer",
           "LMForgeError", "__version__"]

"""German -> English (or any pair) translation with the encoder-decoder Transformer: parallel
data in token-budget batches, greedy and beam search, BLEU, and the trainer set-up.

    from lmforge.translate import load_translator, translate
    model, tok = load_translator("RUN")
    translate(model, tok, ["Wo wohnst du?"], beam=5)
"""

from __future__ import annotations

from .data import read_parallel
from .search import beam_search, greedy_search, translate


def load_translator(run_dir, device="cpu"):
    """(model, tokenizer) of a seq2seq run directory; an error if the run holds another kind."""
    from ..checkpoint import load_run, read_run_config
    from ..errors import LMForgeError

    kind = read_run_config(run_dir).get("model")
    if kind != "seq2seq":
        raise LMForgeError(f"{run_dir} holds a {kind} model, not a translation model (seq2seq); "
                           f"train one with `lmforge translate train`")
    return load_run(run_dir, device=device)


__all__ = ["read_parallel", "greedy_search", "beam_search", "translate", "load_translator"]

"""Instruction fine-tuning data: chat, prompt/completion and Alpaca files rendered with a run's
chat format, a loss mask on the assistant's answers, and padded or packed batches.

    import lmforge
    from lmforge.chat import chat_format
    from lmforge.sft import SFTBatches, exact_match, hold_out, load_examples

    model, tok = lmforge.load("runs/base", inference=False)
    fmt = chat_format(tok, "runs/base")
    data = load_examples("chat.jsonl", tok, fmt, max_length=model.config.block_size)
    train, val = hold_out(data.examples, seed=0)
    batches = SFTBatches(train, val, batch_size=8, block_size=model.config.block_size, pack=True)
    _, loss = model(*batches.get_batch("train"))
    exact_match(model.eval(), tok, fmt, val)   # share of held-out answers reproduced exactly
"""

from .batches import SFTBatches, collate, count_tokens
from .examples import OVERLONG, VAL_FRACTION, ExampleSet, hold_out, load_examples
from .records import Conversation, read_conversations
from .render import Example, encode_conversation, render_spans
from .score import answer, exact_match

__all__ = ["OVERLONG", "VAL_FRACTION", "Conversation", "Example", "ExampleSet", "SFTBatches", "answer", "collate",
           "count_tokens", "encode_conversation", "exact_match", "hold_out", "load_examples", "read_conversations",
           "render_spans"]

"""Instruction fine-tuning data: chat, prompt/completion and Alpaca files rendered with a run's
chat format, a loss mask on the assistant's answers, and padded or packed batches.

    import lmforge
    from lmforge.chat import chat_format
    from lmforge.sft import load_examples, hold_out, SFTBatches

    model, tok = lmforge.load("runs/base", inference=False)
    fmt = chat_format(tok, "runs/base")
    data = load_examples("chat.jsonl", tok, fmt, max_length=model.config.block_size)
    train, val = hold_out(data.examples, seed=0)
    batches = SFTBatches(train, val, batch_size=8, block_size=model.config.block_size, pack=True)
    _, loss = model(*batches.get_batch("train"))
"""

from .batches import SFTBatches, collate, count_tokens
from .examples import OVERLONG, VAL_FRACTION, ExampleSet, hold_out, load_examples
from .records import Conversation, read_conversations
from .render import Example, encode_conversation, render_spans

__all__ = ["OVERLONG", "VAL_FRACTION", "Conversation", "Example", "ExampleSet", "SFTBatches", "collate",
           "count_tokens", "encode_conversation", "hold_out", "load_examples", "read_conversations",
           "render_spans"]

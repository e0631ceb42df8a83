"""Token ids -> text for serving, and the chat format for models without a template.

Both live in lower layers (`lmforge.detokenize`, `lmforge.chat.plain`); the names stay here for
the server's callers."""

from __future__ import annotations

from typing import Sequence

from ..chat.plain import ROLE_NAMES, STOP_STRINGS, render_plain
from ..detokenize import Detokenizer, stop_hold

CHAT_STOPS = STOP_STRINGS


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """[("system", "Be brief."), ("user", "Hi")] -> "System: Be brief.\\nUser: Hi\\nAssistant:"."""
    return render_plain([{"role": role, "content": content} for role, content in messages])


__all__ = ["CHAT_STOPS", "ROLE_NAMES", "Detokenizer", "render_chat", "stop_hold"]

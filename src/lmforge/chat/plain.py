"""The chat format for models without a template of their own (a base model, a run trained
here): each message on its own line as "Role: content", the prompt ending in "Assistant:" so
the model continues as the assistant, and generation stopped where it starts the next turn.
`lmforge chat`, `lmforge sample --chat` and the server's chat route all use it.

    System: Be brief.
    User: Hi
    Assistant:
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOP_STRINGS = ("\nUser:", "\nSystem:")


def message_text(content: Any) -> str:
    """A message's content as text: a string, None, or OpenAI's list of {"type": "text", "text"} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def render_plain(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    -> "System: Be brief.\\nUser: Hi\\nAssistant:"."""
    lines = [f"{ROLE_NAMES.get(m['role'], str(m['role']).capitalize())}: {message_text(m.get('content'))}"
             for m in messages]
    return "\n".join(lines + (["Assistant:"] if add_generation_prompt else []))

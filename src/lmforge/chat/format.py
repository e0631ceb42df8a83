"""How a run chats: its own template (or the plain default), the token ids of a rendered
conversation, and the ids and strings that end the assistant's turn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import LMForgeError
from .plain import STOP_STRINGS, message_text, render_plain
from .template import SPECIAL_NAMES, ChatTemplate, load_chat_template


@dataclass(frozen=True)
class ChatFormat:
    """template None: the plain "User:/Assistant:" format (`chat.plain`), which ends a turn at
    the stop strings "\\nUser:" / "\\nSystem:". eos_ids: the run's end-of-sequence ids."""

    template: ChatTemplate | None = None
    eos_ids: frozenset[int] = frozenset()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.template is not None else STOP_STRINGS

    def render(self, messages: Sequence[Mapping[str, Any]], tokenizer=None,
               add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        """The prompt text. The template sees the tokenizer's special-token strings where the
        run's template did not record them; a "developer" message counts as "system".
        continue_final_message: end the text right after the last message's content (no
        end-of-turn), so the model continues that message, e.g. an assistant answer begun
        by the caller (transformers' option of the same name)."""
        if continue_final_message and add_generation_prompt:
            raise LMForgeError("continue_final_message continues the last message; it cannot also "
                               "open a new assistant turn (add_generation_prompt)")
        if self.template is None:
            return render_plain(messages, add_generation_prompt)
        msgs = [{**m, "role": "system" if m.get("role") == "developer" else m.get("role")} for m in messages]
        fallback = {n: v for n in SPECIAL_NAMES
                    if n not in self.template.special_tokens and (v := getattr(tokenizer, n, None)) is not None}
        text = self.template.render(msgs, add_generation_prompt, **fallback)
        return _cut_after_final(text, messages[-1]) if continue_final_message else text

    def encode(self, tokenizer, text: str) -> list[int]:
        """Rendered text -> ids. Special-token text becomes its single id; BOS is added only when
        the tokenizer adds one and the template has not already written it."""
        ids = tokenizer.encode(text)
        bos = getattr(tokenizer, "bos_id", None)
        if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def prompt_ids(self, tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(tokenizer, self.render(messages, tokenizer))


def _cut_after_final(text: str, message: Mapping[str, Any]) -> str:
    """text up to the end of the message's content where the template last wrote it. Templates
    often strip the content, so the stripped content is looked for, and trailing whitespace of
    the message is kept only where the template kept it."""
    content = message_text(message.get("content"))
    core = content.strip()
    at = text.rfind(core) if core else -1
    if at < 0:
        raise LMForgeError("the chat template does not write the last message's text, so it cannot be "
                           "continued; end the conversation with a user message instead")
    kept = content.lstrip()
    return text[:at + (len(kept) if text.startswith(kept, at) else len(core))]


def chat_format(tokenizer, run_dir: str | Path | None = None) -> ChatFormat:
    """A run's chat format: RUN/chat_template.jinja if it has one, and the tokenizer's end-of-text
    id plus RUN/config.json's generation.eos_token_id as the turn's end."""
    from ..generation import eos_ids

    if run_dir is None:
        return ChatFormat(None, eos_ids(tokenizer))
    from ..checkpoint import read_run_config

    generation = read_run_config(run_dir).get("generation")
    return ChatFormat(load_chat_template(run_dir), eos_ids(tokenizer, generation))


__all__ = ["ChatFormat", "chat_format", "message_text"]

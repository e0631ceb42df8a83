"""Chat: a model's own Jinja2 chat template (rendered as transformers renders it), the plain
"User:/Assistant:" default for models without one, and the conversation loop of `lmforge chat`."""

from .format import ChatFormat, chat_format
from .plain import render_plain
from .template import (ChatTemplate, load_chat_template, read_hf_chat_template, save_chat_template,
                       write_hf_chat_template)

__all__ = ["ChatFormat", "ChatTemplate", "chat_format", "load_chat_template", "read_hf_chat_template",
           "render_plain", "save_chat_template", "write_hf_chat_template"]

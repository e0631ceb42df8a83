"""Request bodies of the OpenAI-compatible API (pydantic), with OpenAI's field names.

Fields OpenAI defines that a small local model cannot honour (presence_penalty, user, ...) are
accepted and ignored, so existing clients work unchanged. `top_k` and `return_token_ids` are
lmforge extensions (the playground uses the second to ask for attention maps)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: StrictStr
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=1, le=2**31 - 1)
    n: StrictInt = Field(1, ge=1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=-2**63, le=2**63 - 1)  # what a 64-bit generator takes
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: StrictBool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = ""
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


class AttentionRequest(_Body):
    """Either `prompt` (text, encoded by the server) or `token_ids`. `layer` counts from 0
    (negative counts from the top); `head` None averages the heads."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    token_ids: Optional[list[StrictInt]] = None
    layer: StrictInt = -1
    head: Optional[StrictInt] = None

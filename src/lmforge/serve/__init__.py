"""Serving: an OpenAI-compatible HTTP API over a batching scheduler, and a browser playground
that shows token probabilities and attention maps. `create_app(model, tokenizer)` builds the
FastAPI app; `lmforge serve --run RUN` runs it with uvicorn."""

from .app import create_app
from .engine import Engine, SamplingParams

__all__ = ["create_app", "Engine", "SamplingParams"]

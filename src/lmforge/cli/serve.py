"""`lmforge serve`: an OpenAI-compatible HTTP API and a browser playground for a run."""

from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    from .common import add_device_args

    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API",
                       description="Serve a run: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, and a playground page at /.")
    p.add_argument("--run", required=True, metavar="RUN", help="run directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter without merging")
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; without an API key only loopback, "
                        "unless you give --host yourself)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env LMFORGE_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run's folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for "
                                                                  "(default: the model's context)")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from ..errors import LMForgeError
    from ..serve import create_app
    from .sample import load_for_inference

    if args.max_batch < 1 or not 0 < args.port < 65536:
        raise LMForgeError("--max-batch must be >= 1 and --port in 1..65535")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    host = args.host or "127.0.0.1"  # no key and no explicit --host: loopback only
    model, tok = load_for_inference(args)
    name = args.model_name or Path(args.run).resolve().name
    app = create_app(model, tok, model_name=name, api_key=api_key, max_batch=args.max_batch,
                     max_tokens_limit=args.max_tokens)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{args.port}"
    print(f"serving {name!r} at {url}/v1 (playground: {url}/)"
          + ("" if api_key else "; no API key, anyone who can reach it may use it"), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: bound to {host} without an API key", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0

"""`lmforge serve`: an OpenAI-compatible HTTP API and a browser playground for a run."""

from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    from .common import add_device_args, add_draft_args

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
    p.add_argument("--max-context", type=int, default=4096, metavar="N",
                   help="positions a request may use, prompt + max_tokens, at most the model's context; the "
                        "KV cache for --max-batch rows of N positions is allocated at start (default 4096)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a batch row; past it, 429 with Retry-After (default 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="a request still generating after S seconds ends with finish_reason 'abort' "
                        "(default 600; 0: no limit)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, running requests get S seconds to finish (default 30)")
    p.add_argument("--log-prompts", action="store_true", help="put prompt text in the access log (default: not)")
    p.add_argument("--access-log", action="store_true", help="one JSON line per request on stderr")
    add_draft_args(p, "speculative decoding: a smaller run with the same tokenizer proposes tokens for every "
                      "active request, and the model checks them in one batched pass (same outputs)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step over all --max-batch rows and --max-context columns, "
                        "compiled at start-up (seconds to minutes, printed); eager stays the default")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..chat import chat_format
    from ..errors import LMForgeError
    from ..serve import create_app
    from ..serve.server import serve
    from .sample import load_for_inference

    if args.max_batch < 1 or args.max_context < 1 or not 0 < args.port < 65536:
        raise LMForgeError("--max-batch and --max-context must be >= 1 and --port in 1..65535")
    if args.max_queue < 0 or args.request_timeout < 0 or args.max_body_bytes < 1 or args.shutdown_timeout < 0:
        raise LMForgeError("--max-queue, --request-timeout and --shutdown-timeout must be >= 0, "
                           "--max-body-bytes >= 1")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    host = args.host or "127.0.0.1"  # no key and no explicit --host: loopback only
    if args.draft_tokens < 1:
        raise LMForgeError(f"--draft-tokens must be >= 1, not {args.draft_tokens}")
    model, tok = load_for_inference(args)
    if args.max_batch > 1 and not args.compile:  # batched steps: fp32 weights get a packed copy
        from ..models.decoding import prepare_for_batches

        prepare_for_batches(model)
    draft = None
    if args.draft is not None:
        from .sample import load_draft

        draft = load_draft(args, tok)
    name = args.model_name or Path(args.run).resolve().name
    app = create_app(model, tok, model_name=name, api_key=api_key, max_batch=args.max_batch,
                     max_tokens_limit=args.max_tokens, max_queue=args.max_queue,
                     request_timeout=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
                     log_prompts=args.log_prompts, max_context=args.max_context,
                     chat=chat_format(tok, args.run),  # the run's chat template and EOS ids
                     draft=draft, draft_tokens=args.draft_tokens, compile=args.compile)
    if args.compile:
        print(f"compiled the decode step in {app.state.engine.compile_seconds:.1f} s", flush=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{args.port}"
    print(f"serving {name!r} at {url}/v1 (playground: {url}/)"
          + ("" if api_key else "; no API key, anyone who can reach it may use it"), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: bound to {host} without an API key", flush=True)
    if args.access_log or args.log_prompts:
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("lmforge.serve.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    serve(app, host=host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0

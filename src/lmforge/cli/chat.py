"""`lmforge chat`: talk to a run in the terminal, with its own chat template when it has one."""

from __future__ import annotations

import argparse
import itertools
import sys

HELP = "/reset forgets the conversation, Ctrl-D (end of input) quits"


def register(sub) -> None:
    from .common import add_device_args, add_draft_args, add_sampling_args

    p = sub.add_parser("chat", help="chat with a run in the terminal",
                       description="An interactive chat: each line you type is a user message; the answer "
                                   "streams as it is generated. " + HELP + ". The run's chat template "
                                   "(RUN/chat_template.jinja) formats the conversation; a run without one "
                                   "uses the plain 'User: / Assistant:' format.")
    p.add_argument("--run", required=True, metavar="RUN", help="run directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter without merging")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd one-token step over a static KV cache of up to 2,048 "
                        "positions (the first answer waits for the compile)")
    add_draft_args(p, "a smaller run with the same tokenizer proposes tokens that the model checks "
                      "(speculative decoding: the answers are distributed as the model's own)")
    add_sampling_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def _lines(interactive: bool):
    """The user's lines until end of input; a prompt and line editing on a terminal."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print()
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def _show(pieces) -> None:
    """Print an answer as it streams; Ctrl-C stops the answer, not the chat."""
    started = False
    try:
        for piece in pieces:
            if not started:  # the plain format's answers begin with the space after "Assistant:"
                piece = piece.lstrip()
                started = bool(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from ..chat import chat_format
    from ..chat.session import ChatSession
    from ..errors import LMForgeError
    from .sample import load_for_inference

    if args.max_new_tokens < 1:
        raise LMForgeError("--max-new-tokens must be >= 1")
    model, tok = load_for_inference(args)
    fmt = chat_format(tok, args.run)
    extra = {}
    if args.draft is not None:
        from .sample import load_draft

        extra.update(draft=load_draft(args, tok), draft_tokens=args.draft_tokens)
    if args.compile:
        from .sample import compiled_decoder

        extra["compiled"] = compiled_decoder(model, 2048)
        extra["context"] = extra["compiled"].max_len
    session = ChatSession(model, tok, fmt, system=args.system, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          **extra)
    interactive = sys.stdin.isatty()
    if interactive:
        kind = "its own chat template" if fmt.template is not None else "the plain User:/Assistant: format"
        print(f"chatting with {args.run} ({kind}); {HELP}")
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {HELP}", file=sys.stderr)
            continue
        try:
            answer = session.reply(text)
            first = next(answer, "")  # renders the conversation: a template may refuse it
        except LMForgeError as e:
            print(f"lmforge chat: error: {e}", file=sys.stderr)
            continue
        if interactive:
            sys.stdout.write("model> ")
        _show(itertools.chain([first], answer))
    return 0

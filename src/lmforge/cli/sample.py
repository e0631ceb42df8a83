"""`lmforge sample`: generate text from a trained run."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from .common import add_device_args, add_draft_args, add_sampling_args

    p = sub.add_parser("sample", help="generate text from a run",
                       description="Continue a prompt with a trained model.")
    p.add_argument("--run", required=True, metavar="RUN", help="run directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter without merging")
    p.add_argument("--prompt", default="", help="text to continue (default: start from scratch); "
                                                 "with --chat, the user's message")
    p.add_argument("--chat", action="store_true",
                   help="treat --prompt as a user message: render it with the run's chat template (or the "
                        "plain 'User: / Assistant:' format) and print the assistant's answer")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations (default 1)")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop a sample at any of these strings")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_draft_args(p, "speculative decoding: a smaller run with the same tokenizer proposes tokens "
                      "that the model checks in one pass (same output distribution; batch 1)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd one-token step and a static KV cache (compiling takes "
                        "seconds to minutes, printed; pays off for long generations where eager ops dominate)")
    add_device_args(p)
    p.set_defaults(func=run)


def load_for_inference(args: argparse.Namespace):
    """Load a run (and adapter) in eval mode with its weights laid out for fast decoding."""
    from .. import load
    from ..errors import LMForgeError
    from ..models.decoding import prepare_for_decoding
    from .common import device_and_dtype

    device, dtype = device_and_dtype(args)
    int8, int4 = getattr(args, "int8", False), getattr(args, "int4", False)
    if int8 and int4:
        raise LMForgeError("--int8 and --int4 exclude each other; choose one")
    if (int8 or int4) and device.type != "cpu":
        raise LMForgeError(f"--int{8 if int8 else 4} runs on the CPU only (its kernel is a CPU one); "
                           "drop it or use --device cpu")
    adapter = getattr(args, "adapter", None)
    if getattr(args, "compile", False) and getattr(args, "draft", None):
        raise LMForgeError("--compile and --draft do not combine (speculative decoding runs eager); choose one")
    plain = int8 or int4 or getattr(args, "compile", False)  # compile traces nn.Linear, not packed layers
    model, tok = load(args.run, adapter=adapter, device=device, dtype=dtype, inference=not plain)
    return (prepare_for_decoding(model, int8=int8, int4=int4) if int8 or int4 else model), tok


def load_draft(args: argparse.Namespace, tokenizer):
    """The --draft run for speculative decoding, loaded as the target is; it must share the tokenizer."""
    from ..errors import LMForgeError

    draft, draft_tok = load_for_inference(argparse.Namespace(**{**vars(args), "run": args.draft, "adapter": None}))
    if draft_tok.to_dict() != tokenizer.to_dict():
        raise LMForgeError(f"the draft {args.draft} has another tokenizer than {args.run}; "
                           "speculative decoding needs the same one")
    return draft


def compiled_decoder(model, positions: int):
    """A CompiledDecoder for `positions` (rounded up to a multiple of 256, at most the model's
    context, so prompts of other lengths reuse the graph)."""
    from ..models.compiled import CompiledDecoder

    return CompiledDecoder(model, max_len=min(model.config.block_size, -(-positions // 256) * 256))


def run(args: argparse.Namespace) -> int:
    from ..chat import chat_format
    from ..errors import LMForgeError
    from ..generation import stream

    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise LMForgeError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if args.system is not None and not args.chat:
        raise LMForgeError("--system needs --chat")
    model, tok = load_for_inference(args)
    if args.num_samples > 1 and not args.stream and not args.compile:  # decoded as one batch
        from ..models.decoding import prepare_for_batches

        prepare_for_batches(model)
    fmt = chat_format(tok, args.run)  # the run's end-of-sequence ids, and its chat template
    prompt, shown, stop = args.prompt, args.prompt, list(args.stop)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = fmt.prompt_ids(tok, messages + [{"role": "user", "content": args.prompt}])
        shown, stop = "", stop + list(fmt.stop_strings)  # print the answer only
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop=stop, stop_ids=fmt.eos_ids)
    stats = None
    if args.draft is not None:
        from ..models.speculative import SpeculativeStats

        if args.num_samples != 1:
            raise LMForgeError("--draft makes one sample at a time; drop --num-samples")
        draft = load_draft(args, tok)
        stats = SpeculativeStats()
        kw.update(draft=draft, draft_tokens=args.draft_tokens, draft_stats=stats)
    if args.compile:
        n_prompt = len(prompt) if not isinstance(prompt, str) else len(tok.encode(prompt)) + 1
        kw["compiled"] = compiled_decoder(model, n_prompt + args.max_new_tokens)
    if args.stream:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            seed = None if args.seed is None else args.seed + i
            sys.stdout.write(shown)
            started = not args.chat
            for pieces in stream(model, tok, prompt, **{**kw, "seed": seed}):
                piece = pieces[0] if started else pieces[0].lstrip()  # a chat answer's leading space
                started = started or bool(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        if args.compile:
            print(f"compiled the decode step in {kw['compiled'].compile_seconds:.1f} s", file=sys.stderr)
        return 0
    texts = [""] * args.num_samples
    for pieces in stream(model, tok, prompt, num_samples=args.num_samples, **kw):
        texts = [t + p for t, p in zip(texts, pieces)]
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(shown + (text.strip() if args.chat else text))
    if args.compile:
        print(f"compiled the decode step in {kw['compiled'].compile_seconds:.1f} s", file=sys.stderr)
    if stats is not None:
        print(f"speculative decoding: {stats.accepted}/{stats.proposed} proposals kept "
              f"({stats.acceptance_rate:.0%}) in {stats.rounds} rounds", file=sys.stderr)
    return 0

"""`lmforge translate`: translate sentences with a trained run, and train, score and demo one.

    lmforge translate --run RUN [--beam 5] "Wo wohnst du?"     (or sentences on stdin, one a line)
    lmforge translate train --train-src F --train-tgt F --val-src F --val-tgt F --out RUN ...
    lmforge translate eval --run RUN --src test.de --ref test.en [--beam 5] [--hyp-out FILE]
    lmforge translate demo [--max-iters N] [--out DIR]

argparse cannot mix a free positional sentence with sub-commands on one parser (the sentence
would be taken for an unknown sub-command), so `translate` collects everything after its own
options and dispatches here: a first word train / eval / demo picks that action's parser,
anything else is text to translate."""

from __future__ import annotations

import argparse
import sys

ACTIONS = ("train", "eval", "demo")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy (default 5)")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent (default 0.6; 0 = none)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per decoding batch (default 4096)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def register(sub) -> None:
    p = sub.add_parser("translate", help="translate sentences; translate train / eval / demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Translate with an encoder-decoder run (sentences as arguments, or one a "
                                   "line on stdin), or one of the actions:\n"
                                   "  translate train --train-src F --train-tgt F --val-src F --val-tgt F --out RUN\n"
                                   "  translate eval --run RUN --src test.de --ref test.en [--beam 5]\n"
                                   "  translate demo [--max-iters N] [--out DIR]\n"
                                   "`lmforge translate ACTION --help` describes each.")
    p.add_argument("--run", metavar="RUN", help="run directory of a seq2seq model")
    _add_decoding_args(p)
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="SENTENCE | ACTION ...",
                   help="sentences to translate, or train / eval / demo and their options")
    p.set_defaults(func=run)


def _action_parser(action: str) -> argparse.ArgumentParser:
    from .common import add_progress_flag

    prog = f"lmforge translate {action}"
    if action == "train":
        p = argparse.ArgumentParser(prog=prog, description="Train an encoder-decoder Transformer on parallel "
                                    "text (one sentence a line, aligned) with the same trainer as `lmforge train`; "
                                    "a shared BPE vocabulary is trained on both sides unless --tokenizer is given.",
                                    epilog="settings: the model's (n_enc_layer n_dec_layer n_embd n_head ffn_hidden "
                                           "dropout label_smoothing norm_position vocab_size max_len ...), the "
                                           "trainer's (max_iters learning_rate warmup_iters ...) and max_tokens "
                                           "bleu_every bleu_sentences bleu_beam")
        for name in ("train-src", "train-tgt", "val-src", "val-tgt"):
            p.add_argument(f"--{name}", metavar="FILE", help="(taken from the run when resuming)")
        p.add_argument("--out", required=True, metavar="RUN")
        p.add_argument("--preset", default=None, help="transformer-multi30k (default) or transformer-tiny")
        p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
        p.add_argument("--tokenizer", default=None, metavar="FILE", help="use this tokenizer instead of training one")
        p.add_argument("--resume", action="store_true")
        add_progress_flag(p)
    elif action == "eval":
        p = argparse.ArgumentParser(prog=prog, description="Translate --src and print sacreBLEU (13a, cased) "
                                    "against --ref with its signature, and the papers' tokenized, lower-cased BLEU "
                                    "when --tok-ref is given.")
        p.add_argument("--run", required=True, metavar="RUN")
        p.add_argument("--src", required=True, metavar="FILE")
        p.add_argument("--ref", required=True, metavar="FILE")
        p.add_argument("--tok-ref", default=None, metavar="FILE", help="lower-cased Moses-tokenized references")
        p.add_argument("--hyp-out", default=None, metavar="FILE", help="write the translations here, one a line")
        _add_decoding_args(p)
    else:
        p = argparse.ArgumentParser(prog=prog, description="Train transformer-tiny on the bundled Tatoeba "
                                    "German-English pairs (a few minutes on a CPU) and translate a few sentences.")
        p.add_argument("--out", default="lmforge-translate-demo", metavar="DIR")
        p.add_argument("--max-iters", type=int, default=None, help="training iterations (default: the preset's)")
        p.add_argument("--seed", type=int, default=1,
                       help="seeds the initial weights, batches and dropout (default 1; see docs/translation.md)")
        add_progress_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] in ACTIONS:
        sub = _action_parser(words[0]).parse_args(words[1:])
        return {"train": run_train, "eval": run_eval, "demo": run_demo}[words[0]](sub)
    # options may also follow the sentence: parse the rest again with ours as defaults
    p = argparse.ArgumentParser(prog="lmforge translate")
    p.add_argument("--run", default=args.run)
    _add_decoding_args(p)
    p.set_defaults(beam=args.beam, alpha=args.alpha, max_tokens=args.max_tokens, device=args.device)
    p.add_argument("sentences", nargs="*")
    rest = p.parse_args(words)
    return run_sentences(rest)


def _load(run_dir: str, device: str):
    from ..train.trainer import resolve_device
    from ..translate import load_translator

    return load_translator(run_dir, device=resolve_device(device))


def run_sentences(args: argparse.Namespace) -> int:
    from ..errors import LMForgeError
    from ..translate import translate

    if not args.run:
        raise LMForgeError("give --run RUN (a run made by `lmforge translate train` or `translate demo`)")
    if not args.sentences and sys.stdin.isatty():
        raise LMForgeError('give sentences to translate (lmforge translate --run RUN "Wo wohnst du?") '
                           'or pipe them in, one a line')
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin]
    model, tok = _load(args.run, args.device)
    for line in translate(model, tok, sentences, beam=args.beam, alpha=args.alpha, max_tokens=args.max_tokens):
        print(line, flush=True)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..train import distributed
    from ..translate.train import build_translation_trainer

    main_rank = distributed.env_rank() == 0  # under torchrun, only rank 0 prints
    trainer = build_translation_trainer(args.train_src, args.train_tgt, args.val_src, args.val_tgt, args.out,
                                        args.preset, args.overrides, resume=args.resume,
                                        tokenizer_path=args.tokenizer, progress=not args.no_progress,
                                        verbose=main_rank)
    try:
        res = trainer.fit()
    finally:
        distributed.cleanup()
    if "val_loss" in res and main_rank:
        bleu = f", val BLEU {res['val_bleu']:.2f}" if "val_bleu" in res else ""
        print(f"done: iter {trainer.iter}, train loss {res['train_loss']:.4f}, val loss {res['val_loss']:.4f}"
              f"{bleu}; run saved in {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import time

    from ..errors import LMForgeError
    from ..fileio import atomic_open
    from ..translate import read_parallel, translate
    from ..translate.bleu import sacre_bleu, tokenized_bleu
    from ..translate.data import read_lines

    src, refs = read_parallel(args.src, args.ref)
    tok_refs = read_lines(args.tok_ref) if args.tok_ref else None
    if tok_refs is not None and len(tok_refs) != len(src):
        raise LMForgeError(f"{args.tok_ref} has {len(tok_refs)} lines but {args.src} has {len(src)}; "
                           f"give the tokenized references of the same test set")
    model, tok = _load(args.run, args.device)
    t0 = time.perf_counter()
    hyps = translate(model, tok, src, beam=args.beam, alpha=args.alpha, max_tokens=args.max_tokens)
    dt = time.perf_counter() - t0
    if args.hyp_out:
        with atomic_open(args.hyp_out) as f:
            f.writelines(h + "\n" for h in hyps)
    score, sig = sacre_bleu(hyps, refs)
    print(f"sacreBLEU {score:.2f}  ({sig})")
    if tok_refs is not None:
        score, sig = tokenized_bleu(hyps, tok_refs)
        print(f"tokenized lower-cased BLEU {score:.2f}  ({sig}, hypotheses Moses-tokenized)")
    print(f"{len(src)} sentences in {dt:.1f}s ({len(src) / dt:.1f} sentences/s, beam {args.beam})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..translate.demo import run_demo as demo

    return demo(args)

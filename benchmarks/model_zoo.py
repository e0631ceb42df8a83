"""lmforge against real peers, in one process run, contenders alternating round by round.

    python benchmarks/model_zoo.py --parts a --train-presets char-tiny      (or: lmforge bench)

Each part refreshes its own tables in docs/benchmarks.md (between `<!-- NAME:begin -->` and
`<!-- NAME:end -->`, with the command line and the machine); --no-doc prints them only,
--markdown FILE writes them there instead.

a) training tokens/s, `char-tiny` and `shakespeare-small` shapes: lmforge's Trainer.step vs
   transformers GPT2LMHeadModel with the same shapes, batches, threads and AdamW settings;
   both then report the val loss after the same timed steps on the same batches.
b) batch-1 greedy decoding, GPT-2 124M shape, 16-token prompt, 128 new tokens, fp32 and bf16:
   lmforge (plain, after `prepare_for_decoding`, and `lmforge.load` + `model.generate` on a run
   made by `lmforge import-hf`) vs transformers `generate` (KV cache on), with this machine's
   memory bandwidth measured in the same run and the bound it implies (decode_speed.py).
c) BPE training seconds and encoding MB/s: lmforge vs HF `tokenizers` and sentencepiece.
d) val loss on char tinyshakespeare after a fixed budget (2,000 x 12 x 64 tokens): nnlm,
   seed GPT (learned and sinusoidal positions) and llama-tiny, with parameters and wall time.

Timings on a shared machine swing; only ratios taken side by side in the same run mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when `lmforge bench` loads this file
from decode_speed import bench_decoding, decoding_markdown  # noqa: E402
from doc_tables import add_doc_args, block, command_line, machine, publish  # noqa: E402
from timing import median_time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "src/lmforge/assets/tinyshakespeare.txt"


# ---- a) training speed ------------------------------------------------------------------
def bench_training(data_dir: Path, preset: str, steps: int, rounds: int) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.data import TokenBatches, TokenData
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset
    from lmforge.train import TrainConfig, Trainer

    p = get_preset(preset)
    mc, tc = p["model_config"], p["train"]
    data = TokenData(data_dir)
    tc = {**tc, "max_iters": steps * rounds, "warmup_iters": 10, "device": "cpu"}
    cfg = TrainConfig.from_dict(tc)
    torch.manual_seed(0)
    model = build_model("gpt", {**mc, "vocab_size": data.vocab_size})
    batches = TokenBatches(data, cfg.batch_size, mc["block_size"], seed=cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, batches, cfg, tmp, tokenizer=None, progress=False)
        torch.manual_seed(0)  # the same model trained with bf16 autocast, for the record
        bf16 = Trainer(build_model("gpt", {**mc, "vocab_size": data.vocab_size}),
                       TokenBatches(data, cfg.batch_size, mc["block_size"], seed=cfg.seed),
                       cfg.replace(dtype="bfloat16"), tmp, tokenizer=None, progress=False)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=data.vocab_size, n_positions=mc["block_size"], n_embd=mc["n_embd"],
        n_layer=mc["n_layer"], n_head=mc["n_head"], resid_pdrop=mc["dropout"], embd_pdrop=mc["dropout"],
        attn_pdrop=mc["dropout"], attn_implementation="sdpa"))
    hf.train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                               weight_decay=cfg.weight_decay)
    hf_batches = TokenBatches(data, cfg.batch_size, mc["block_size"], seed=cfg.seed)  # the same stream
    hf_iter = [0]

    def hf_step() -> None:
        for group in hf_opt.param_groups:
            group["lr"] = cfg.lr_at(hf_iter[0])
        x, y = hf_batches.get_batch("train")
        logits = hf(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        hf_iter[0] += 1

    def lmf_steps() -> None:
        for _ in range(steps):
            trainer.step()

    def hf_steps() -> None:
        for _ in range(steps):
            hf_step()

    def bf16_steps() -> None:
        for _ in range(steps):
            bf16.step()

    lmf_steps(), hf_steps(), bf16_steps()  # warm-up round (not timed, counted in the tokens below)
    times = median_time({"lmforge": lmf_steps, "transformers": hf_steps, "lmforge_bf16": bf16_steps}, rounds)
    tokens = steps * cfg.batch_size * mc["block_size"]
    out: dict[str, Any] = {"preset": preset, "batch": cfg.batch_size, "block": mc["block_size"],
                           "steps_per_round": steps, "rounds": rounds}
    for name, ts in times.items():
        out[f"{name}_tok_s"] = tokens / statistics.median(ts)
        out[f"{name}_rounds_s"] = ts
    out["ratio"] = out["lmforge_tok_s"] / out["transformers_tok_s"]
    out["ratio_bf16"] = out["lmforge_bf16_tok_s"] / out["transformers_tok_s"]
    # quality after the same (rounds + 1) * steps optimizer steps on the same batches
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    with torch.no_grad():
        model.eval(), hf.eval()
        vl, vh, g1, g2 = [], [], gen(), gen()
        for _ in range(10):
            vl.append(model(*batches.get_batch("val", generator=g1))[1].item())
            x, y = batches.get_batch("val", generator=g2)
            logits = hf(input_ids=x).logits
            vh.append(torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item())
    out["lmforge_val_loss"], out["transformers_val_loss"] = statistics.mean(vl), statistics.mean(vh)
    out["trained_tokens"] = (rounds + 1) * tokens
    return out


# ---- c) tokenizers ------------------------------------------------------------------------
def bench_tokenizers(corpus: Path | None, big_vocab: int, rounds: int) -> dict[str, Any]:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizers import BPETokenizer

    def hf_train(path: Path, vocab: int) -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([str(path)], trainer)
        return tok

    def sp_train(path: Path, vocab: int, prefix: str):
        spm.SentencePieceTrainer.train(input=str(path), model_prefix=prefix, vocab_size=vocab, model_type="bpe",
                                       byte_fallback=True, num_threads=torch.get_num_threads(),
                                       minloglevel=2, max_sentence_length=1 << 16,
                                       input_sentence_size=0, train_extremely_large_corpus=False)
        return spm.SentencePieceProcessor(model_file=prefix + ".model")

    out: dict[str, Any] = {"train": [], "encode": {}}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("tinyshakespeare 1.1 MB", SHAKESPEARE, 4096)]
        if corpus is not None:
            jobs.append((f"{corpus.name} {corpus.stat().st_size / 1e6:.1f} MB", corpus, big_vocab))
        trained: dict[str, Any] = {}
        for label, path, vocab in jobs:
            fns = {"lmforge": lambda: trained.__setitem__("lmforge", BPETokenizer.train(path, vocab)),
                   "HF tokenizers": lambda: trained.__setitem__("hf", hf_train(path, vocab)),
                   "sentencepiece": lambda: trained.__setitem__("sp", sp_train(path, vocab, f"{tmp}/sp"))}
            times = median_time(fns, rounds)
            out["train"].append({"data": label, "vocab": vocab,
                                 **{k: statistics.median(v) for k, v in times.items()}})
        # encoding: the last corpus, in lines, with the tokenizers just trained on it
        text = jobs[-1][1].read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        mb = len(text.encode("utf-8")) / 1e6
        workers = torch.get_num_threads()  # HF's encode_batch uses as many threads as there are cores
        enc = {"lmforge encode_batch": lambda: trained["lmforge"].encode_batch(lines),
               f"lmforge encode_batch, num_workers={workers}":
                   lambda: trained["lmforge"].encode_batch(lines, num_workers=workers),
               "HF tokenizers encode_batch": lambda: trained["hf"].encode_batch(lines),
               "sentencepiece encode": lambda: trained["sp"].encode(lines)}
        times = median_time(enc, rounds)
        out["encode"] = {k: mb / statistics.median(v) for k, v in times.items()}
        out["encode_data"] = jobs[-1][0]
        out["encode_ratio_vs_hf"] = out["encode"]["lmforge encode_batch"] / out["encode"]["HF tokenizers encode_batch"]
        out["encode_workers"] = workers
        out["encode_workers_ratio_vs_hf"] = (out["encode"][f"lmforge encode_batch, num_workers={workers}"]
                                             / out["encode"]["HF tokenizers encode_batch"])
    return out


# ---- d) quality at a fixed budget ------------------------------------------------------------
def bench_quality(data_dir: Path, iters: int) -> list[dict[str, Any]]:
    from lmforge.train.setup import build_trainer

    contenders = [("nnlm (nnlm-char)", "nnlm-char", []),
                  ("seed GPT, learned positions (char-tiny)", "char-tiny", []),
                  ("seed GPT, sinusoidal positions", "char-tiny", ["pos_encoding=sinusoidal"]),
                  ("llama-tiny", "llama-tiny", [])]
    rows = []
    for label, preset, extra in contenders:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            trainer = build_trainer(data_dir, Path(tmp) / "run", preset,
                                    overrides=extra + [f"max_iters={iters}", "batch_size=12", "block_size=64",
                                                       "device=cpu"], progress=False, verbose=False)
            res = trainer.fit()
            rows.append({"model": label, "preset": preset, "params": trainer.model.num_params(),
                         "val_loss": res["val_loss"], "train_loss": res["train_loss"],
                         "wall_s": time.perf_counter() - t0})
            print(f"d) {rows[-1]}", flush=True)  # partial results survive an interrupted run
    return rows


# ---- report: one section of docs/benchmarks.md per measurement ------------------------------
def training_markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        f"Median of {r['rounds']} alternating rounds of {r['steps_per_round']} optimizer steps; val loss after the "
        "same steps on the same batches.", "",
        "| shape | batch x block | lmforge tok/s | transformers tok/s | ratio | lmforge bf16 autocast tok/s (ratio) "
        "| val loss lmforge / transformers |", "|---|---|---|---|---|---|---|",
        f"| {r['preset']} | {r['batch']} x {r['block']} | {r['lmforge_tok_s']:,.0f} | {r['transformers_tok_s']:,.0f} | "
        f"**{r['ratio']:.2f}x** | {r['lmforge_bf16_tok_s']:,.0f} ({r['ratio_bf16']:.2f}x) | "
        f"{r['lmforge_val_loss']:.3f} / {r['transformers_val_loss']:.3f} after {r['trained_tokens']:,} tokens |"])


def tokenizers_markdown(t: dict[str, Any]) -> str:
    lines = ["| training data | vocab | lmforge s | HF tokenizers s | sentencepiece s |", "|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['vocab']:,} | {r['lmforge']:.2f} | {r['HF tokenizers']:.2f} | "
              f"{r['sentencepiece']:.2f} |" for r in t["train"]]
    lines += ["", f"| encoder ({t['encode_data']}, by lines) | MB/s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in t["encode"].items()]
    lines += ["", f"lmforge / HF `encode_batch`: **{t['encode_ratio_vs_hf']:.2f}x** in one process, "
                  f"**{t['encode_workers_ratio_vs_hf']:.2f}x** with num_workers={t['encode_workers']}."]
    return "\n".join(lines)


def quality_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | val loss | train loss | wall time |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['val_loss']:.3f} | {r['train_loss']:.3f} | {r['wall_s']:.0f} s |"
              for r in rows]
    return "\n".join(lines)


def sections(res: dict[str, Any]) -> dict[str, str]:
    """{marker name: section text}; a run of some parts refreshes only their sections."""
    cmd, out = res["command"], {}
    for r in res.get("training", []):
        out[f"train_{r['preset']}"] = block(cmd, training_markdown(r))
    if "decoding" in res:
        out["decoding"] = block(cmd, decoding_markdown(res["decoding"]))
    if "tokenizers" in res:
        out["bpe"] = block(cmd, tokenizers_markdown(res["tokenizers"]))
    if "quality" in res:
        out["quality"] = block(cmd, quality_markdown(res["quality"]))
    return out


TRAIN_STEPS_DIVISOR = {"char-tiny": 1, "shakespeare-small": 5}  # part a's shapes; the larger takes fewer steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="lmforge vs peers: training, decoding, tokenizers, quality")
    ap.add_argument("--parts", default="a,b,c,d", help="which of a,b,c,d to run (default all)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per timing")
    ap.add_argument("--train-steps", type=int, default=10, help="optimizer steps per training round")
    ap.add_argument("--train-presets", default="char-tiny,shakespeare-small",
                    help="part a's shapes (shakespeare-small takes a fifth of --train-steps per round)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="part b's new tokens per generation")
    ap.add_argument("--quality-iters", type=int, default=2000)
    ap.add_argument("--corpus", default=None, help="the 11 MB corpus (../shared/data/make-pydocs-corpus.sh); "
                                                    "without it, part c uses tinyshakespeare only")
    ap.add_argument("--big-vocab", type=int, default=32768)
    ap.add_argument("--json", default=None, help="write the results here")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from lmforge.data import prepare

    hf_logging.set_verbosity_error()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - set("abcd"):
        ap.error(f"--parts takes letters from a,b,c,d separated by commas, got {args.parts!r}")
    train_presets = [x.strip() for x in args.train_presets.split(",") if x.strip()]
    if not train_presets or set(train_presets) - TRAIN_STEPS_DIVISOR.keys():
        ap.error(f"--train-presets takes {','.join(TRAIN_STEPS_DIVISOR)} separated by commas, got {args.train_presets!r}")
    if args.corpus and not Path(args.corpus).is_file():
        ap.error(f"--corpus: file not found: {args.corpus}")
    import transformers

    res: dict[str, Any] = {"command": command_line("benchmarks/model_zoo.py", argv), "machine": machine(),
                           "transformers": transformers.__version__, "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "shakespeare-char"
        if parts & {"a", "d"}:
            prepare([SHAKESPEARE], "char", data_dir, progress=False)
        if "a" in parts:
            res["training"] = [bench_training(data_dir, name, max(1, args.train_steps // TRAIN_STEPS_DIVISOR[name]),
                                              args.rounds) for name in train_presets]
        if "b" in parts:
            res["decoding"] = bench_decoding(max(2, args.rounds // 2), new_tokens=args.decode_tokens)
        if "c" in parts:
            res["tokenizers"] = bench_tokenizers(Path(args.corpus) if args.corpus else None, args.big_vocab,
                                                 max(1, args.rounds // 2))
        if "d" in parts:
            res["quality"] = bench_quality(data_dir, args.quality_iters)
    publish(args, sections(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()

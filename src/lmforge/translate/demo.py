"""`lmforge translate demo`: train transformer-tiny on the bundled Tatoeba German-English pairs
(CC BY 2.0 FR, see assets/TATOEBA-NOTICE.md) and translate a few sentences."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..errors import LMForgeError
from ..fileio import atomic_open
from .data import read_parallel

N_VAL = 50  # the last pairs are held out for val loss and BLEU
# A few pairs written for lmforge (no licence burden): Tatoeba's 1,000 pairs never use the verb
# "wohnen", and never ask "Wo ... du?" with a verb that English turns into "Where do you ...?",
# so without them the demo could not translate its own first sentence. "Wo wohnst du?" itself
# (or a synonym such as "Wo lebst du?") is deliberately not among them.
EXTRA_PAIRS = [("Ich wohne in Berlin.", "I live in Berlin."),
               ("Wohnst du hier?", "Do you live here?"),
               ("Wo wohnt Tom?", "Where does Tom live?"),
               ("Wir wohnen in einem kleinen Haus.", "We live in a small house."),
               ("Sie wohnt bei ihrer Mutter.", "She lives with her mother."),
               ("Wohnt ihr in der Stadt?", "Do you live in the city?"),
               ("Wo arbeitest du?", "Where do you work?"),
               ("Wo schläfst du?", "Where do you sleep?"),
               ("Wo spielst du Tennis?", "Where do you play tennis?")]
SENTENCES = ["Wo wohnst du?", "Ich habe Hunger.", "Wo ist der Bahnhof?", "Tom ist mein Freund.",
             "Das ist nicht gut."]


def bundled_pairs() -> tuple[list[str], list[str]]:
    root = resources.files("lmforge") / "assets"
    return read_parallel(str(root / "tatoeba.deu-eng.de"), str(root / "tatoeba.deu-eng.en"))


def write_splits(out: Path) -> dict[str, str]:
    """Write the bundled pairs as train/val files under out; returns their paths."""
    de, en = bundled_pairs()
    parts = {"train": (de[:-N_VAL] + [d for d, _ in EXTRA_PAIRS], en[:-N_VAL] + [e for _, e in EXTRA_PAIRS]),
             "val": (de[-N_VAL:], en[-N_VAL:])}
    paths = {}
    for split, (src, tgt) in parts.items():
        for lang, lines in (("de", src), ("en", tgt)):
            path = out / f"{split}.{lang}"
            with atomic_open(path) as f:
                f.writelines(line + "\n" for line in lines)
            paths[f"{split}_{'src' if lang == 'de' else 'tgt'}"] = str(path)
    return paths


def run_demo(args: argparse.Namespace) -> int:
    from ..plot import plot_run
    from . import load_translator, translate
    from .train import build_translation_trainer

    if args.max_iters is not None and args.max_iters < 1:
        raise LMForgeError("--max-iters must be at least 1")
    out = Path(args.out)
    run_dir = out / "run"
    if (run_dir / "trainer.pt").exists():
        raise LMForgeError(f"{run_dir} already holds a demo run; remove it or pass another --out")
    progress = not args.no_progress
    print(f"[1/4] writing the bundled Tatoeba pairs ({N_VAL} held out for validation) and "
          f"{len(EXTRA_PAIRS)} pairs of our own to {out / 'data'}")
    paths = write_splits(out / "data")
    overrides = [f"seed={args.seed}"]
    if args.max_iters is not None:
        overrides += [f"max_iters={args.max_iters}", f"lr_decay_iters={args.max_iters}",
                      f"eval_interval={max(1, min(200, args.max_iters))}",
                      f"warmup_iters={min(100, max(1, args.max_iters // 10))}"]
    print("[2/4] training transformer-tiny")
    trainer = build_translation_trainer(paths["train_src"], paths["train_tgt"], paths["val_src"], paths["val_tgt"],
                                        run_dir, "transformer-tiny", overrides, progress=progress)
    res = trainer.fit()
    bleu = f", val BLEU {res['val_bleu']:.1f}" if "val_bleu" in res else ""
    print(f"      iter {trainer.iter}: val loss {res['val_loss']:.4f} (train {res['train_loss']:.4f}){bleu}")
    print(f"[3/4] loss curve: {plot_run(run_dir)}")
    print("[4/4] translations (beam 5):")
    model, tok = load_translator(run_dir)
    for de, en in zip(SENTENCES, translate(model, tok, SENTENCES, beam=5)):
        print(f"      {de}  ->  {en}")
    print(f"run saved in {run_dir}: try `lmforge translate --run {run_dir} \"Wo wohnst du?\"`")
    return 0

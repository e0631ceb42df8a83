"""How much of full fine-tuning's gain survives when its weight update is cut to rank k?

A diagnostic for the LoRA study (docs/finetuning.md): it takes the study's base run and its
best full fine-tuning run, replaces the update W_ft - W_base of chosen matrices by its best
rank-k approximation (truncated SVD), and reports the captions val loss as a share of full
fine-tuning's drop. If rank 8 keeps little of the gain in some matrix, a rank-8 adapter there
has to find a different route to the same loss.

    python benchmarks/finetune_rank.py --work /tmp/ft3 --full ft-full-0.001

Reads only the study's work directory; nothing is trained. The table goes into
docs/finetuning.md (section `finetune_rank`); --no-doc prints it only, --markdown FILE writes it there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

EMB = ("tok_emb.weight", "lm_head.weight")  # one tied matrix, listed under both names


def low_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the study's work directory (base/, captions-val/)")
    p.add_argument("--full", default="ft-full-0.001", help="the full fine-tuning run inside --work")
    p.add_argument("--ranks", default="8,32,128")
    p.add_argument("--threads", type=int, default=1)
    add_doc_args(p, "docs/finetuning.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import lmforge
    from lmforge.data import TokenData
    from lmforge.evaluate import split_loss

    work = Path(args.work)
    model, _ = lmforge.load(work / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    full = lmforge.load(work / args.full)[0].state_dict()
    data = TokenData(work / "captions-val")

    def val_loss(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        return split_loss(model, data, "val", batch_size=16)[0]

    before, after = val_loss(base), val_loss(full)
    share = lambda loss: 100 * (before - loss) / (before - after)  # noqa: E731
    matrices = [k for k, v in base.items() if v.dim() == 2 and k != "pos_emb.weight"]
    emb_delta = full["tok_emb.weight"] - base["tok_emb.weight"]

    def with_emb(emb: torch.Tensor, rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**rest, **{k: emb for k in EMB}}

    rows: list[tuple[str, float]] = []
    for k in map(int, args.ranks.split(",")):
        cut = {n: base[n] + low_rank(full[n] - base[n], k) if n in matrices else full[n] for n in base}
        rows.append((f"every matrix's update cut to rank {k} (vectors as fine-tuned)", share(val_loss(cut))))
    rows.append(("the embedding's update alone (the rest as in the base)",
                 share(val_loss(with_emb(full["tok_emb.weight"], base)))))
    rows.append(("everything but the embedding (the embedding as in the base)",
                 share(val_loss(with_emb(base["tok_emb.weight"], full)))))
    for k in map(int, args.ranks.split(",")):
        emb = base["tok_emb.weight"] + low_rank(emb_delta, k)
        rows.append((f"only the embedding's update cut to rank {k}", share(val_loss(with_emb(emb, full)))))
    energy = {}
    for n in matrices:
        if n == "lm_head.weight":
            continue
        s2 = torch.linalg.svdvals(full[n] - base[n]) ** 2
        energy[n] = float(s2[:8].sum() / s2.sum())

    lines = [f"Captions val loss: base {before:.4f}, full fine-tuning ({args.full}) {after:.4f}.", "",
             "| weights | share of full fine-tuning's drop |", "|---|---|"]
    lines += [f"| {name} | {s:.1f}% |" for name, s in rows]
    lines += ["", "Share of each update's squared singular values in its top 8: "
              + ", ".join(f"`{n}` {e:.2f}" for n, e in energy.items()) + "."]
    publish(args, {"finetune_rank": block(command_line("benchmarks/finetune_rank.py"), "\n".join(lines))})


if __name__ == "__main__":
    main()

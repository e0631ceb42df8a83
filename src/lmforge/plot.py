"""Loss curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LMForgeError
from .fileio import atomic_path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LMForgeError(f"{path} not found; train the run first")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise LMForgeError(f"{path} line {i} is not JSON; the file is damaged") from None
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/loss.png: training loss (every log step) and train/val loss (every eval)
    against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not logs and not evals:
        raise LMForgeError(f"{run_dir}/metrics.jsonl has no losses to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if logs:
        ax.plot([r["tokens"] for r in logs], [r["loss"] for r in logs], lw=0.8, alpha=0.5, label="train (batch)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out

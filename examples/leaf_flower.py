"""The first neural network of the seeds: is this thing a leaf or a flower?

Each object is described by 4 numbers, its colour (R, G, B) and its volume, all in [0, 1].
The network is 4 inputs -> 3 hidden units (ReLU) -> 2 outputs (scores for leaf and flower),
trained by plain gradient descent written out by hand: autograd computes the gradients, and
we update each weight ourselves with w <- w - lr * dL/dw (no optimizer class).

Run it:  python examples/leaf_flower.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

LEAF, FLOWER = 0, 1


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n objects: (n, 4) features (R, G, B, volume) and (n,) labels. Leaves are green and
    small-to-medium; flowers are red, yellow or purple, and smaller; both are noisy."""
    labels = torch.randint(0, 2, (n,), generator=generator)  # (n,)
    noise = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    leaf = torch.stack([0.1 + 0.3 * noise(n), 0.5 + 0.5 * noise(n), 0.1 + 0.3 * noise(n),
                        0.3 + 0.6 * noise(n)], dim=1)  # green, any size
    flower = torch.stack([0.4 + 0.6 * noise(n), 0.0 + 0.6 * noise(n), 0.2 + 0.8 * noise(n),
                          0.05 + 0.5 * noise(n)], dim=1)  # red / yellow / purple, smaller
    x = torch.where(labels[:, None] == LEAF, leaf, flower)  # (n, 4)
    return x, labels


def init_params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights start small and random (so the 3 hidden units differ); biases at zero."""
    def weight(n_in: int, n_out: int) -> torch.Tensor:
        return (torch.randn(n_in, n_out, generator=generator) * (2 / n_in) ** 0.5).requires_grad_()

    return {"W1": weight(4, 3), "b1": torch.zeros(3, requires_grad=True),
            "W2": weight(3, 2), "b2": torch.zeros(2, requires_grad=True)}


def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x: (n, 4) -> scores (n, 2). Each layer: weighted sum plus bias, then (hidden) ReLU."""
    h = torch.relu(x @ params["W1"] + params["b1"])  # (n, 3)
    return h @ params["W2"] + params["b2"]  # (n, 2): one score per class


def accuracy(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (forward(params, x).argmax(dim=1) == y).float().mean().item()


def train(epochs: int = 300, lr: float = 0.5, n_train: int = 400, seed: int = 0,
          log_every: int = 30, verbose: bool = True) -> dict[str, float]:
    """Full-batch gradient descent on the cross-entropy loss; returns the first and last loss
    and the accuracy on held-out objects."""
    gen = torch.Generator().manual_seed(seed)
    x, y = make_data(n_train, gen)
    x_test, y_test = make_data(200, gen)
    params = init_params(gen)
    first = None
    for epoch in range(epochs + 1):
        loss = F.cross_entropy(forward(params, x), y)  # softmax + negative log-likelihood
        first = loss.item() if first is None else first
        if verbose and epoch % log_every == 0:
            print(f"epoch {epoch:4d}  loss {loss.item():.4f}  train accuracy {accuracy(params, x, y):.1%}")
        if epoch == epochs:
            break
        for p in params.values():
            p.grad = None
        loss.backward()  # dL/dw for every weight, by the chain rule
        with torch.no_grad():
            for p in params.values():
                p -= lr * p.grad  # one step downhill
    result = {"first_loss": first, "last_loss": loss.item(), "test_accuracy": accuracy(params, x_test, y_test)}
    if verbose:
        print(f"test accuracy on {len(y_test)} new objects: {result['test_accuracy']:.1%}")
        probe = torch.tensor([[0.2, 0.8, 0.2, 0.6], [0.9, 0.2, 0.6, 0.1]])  # a green leaf, a pink flower
        for row, pred in zip(probe.tolist(), forward(params, probe).argmax(1).tolist()):
            print(f"  R, G, B, volume = {', '.join(f'{v:.1f}' for v in row)} -> {'flower' if pred == FLOWER else 'leaf'}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train(args.epochs, args.lr, seed=args.seed)

"""Data parallelism on CPU: 2 processes (gloo) with per-rank batch B train exactly like one
process with batch 2B on the same data, replicated (DDP) or sharded (FSDP); their checkpoint
loads in a single process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.checkpoint import load_run
from lmforge.errors import LMForgeError
import lmforge.nn.loss as loss_module
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizers import CharTokenizer
from lmforge.train import TrainConfig, Trainer

B, T, STEPS = 4, 16, 6
MODEL = dict(vocab_size=20, block_size=T, n_layer=2, n_head=2, n_embd=32)


class SlicedBatches:
    """A fixed stream of global batches of 2B rows; process `rank` of `world` takes its slice,
    a single process (world 1) takes all of them."""

    def __init__(self, world: int):
        self.world, self.rank, self.step = world, 0, 0
        gen = torch.Generator().manual_seed(0)
        self.stream = torch.randint(0, 20, (64, 2 * B, T + 1), generator=gen)

    def for_rank(self, rank: int) -> None:
        self.rank = rank

    def get_batch(self, split, generator=None):
        if generator is not None:  # evaluation: the same fixed batch on every process
            xy = self.stream[-1]
            return xy[:, :-1], xy[:, 1:]
        xy = self.stream[self.step]
        self.step += 1
        rows = 2 * B // self.world
        xy = xy[self.rank * rows:(self.rank + 1) * rows]
        return xy[:, :-1], xy[:, 1:]

    def tokens_per_batch(self) -> int:
        return 2 * B // self.world * T

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def train(out_dir, world: int, steps: int = STEPS, resume: bool = False, fsdp: bool = False,
          accumulation: int = 1, chunk: int | None = None) -> Trainer:
    """chunk: compute the loss through chunks of this many logits (as for a large vocabulary)."""
    torch.manual_seed(0)
    default_chunk = loss_module.CHUNK_ELEMENTS
    loss_module.CHUNK_ELEMENTS = chunk or default_chunk
    cfg = TrainConfig(max_iters=steps, batch_size=2 * B // world, log_interval=1, eval_interval=3,
                      eval_iters=1, warmup_iters=2, learning_rate=3e-3, device="cpu", fsdp=fsdp,
                      gradient_accumulation_steps=accumulation)
    trainer = Trainer(GPT(GPTConfig(**MODEL)), SlicedBatches(world), cfg, out_dir,
                      CharTokenizer.from_text("abcdefghijklmnopqrst"), progress=False, eval_hook=by_hand)
    if resume:
        trainer.resume()
    try:
        trainer.fit()
    finally:
        loss_module.CHUNK_ELEMENTS = default_chunk
    return trainer


@torch.no_grad()
def by_hand(trainer: Trainer) -> dict:
    """An eval hook that calls the layers inside each block, not model(...) or the blocks, as
    beam search does: under FSDP it only works if the trainer gathers the weights for it."""
    m, x = trainer.model, torch.arange(T)[None] % 20
    h = m.tok_emb(x) + m.pos_emb(torch.arange(T))
    for block in m.blocks:
        h = h + block.attn(block.ln_1(h))
        h = h + block.mlp(block.ln_2(h))
    return {"by_hand": m.lm_head(m.ln_f(h)).square().mean().item()}


def _worker(rank: int, world: int, port: int, out_dir: str, steps: int, resume: bool, fsdp: bool,
            accumulation: int, chunk: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lmforge.train import distributed

    try:
        train(out_dir, world, steps, resume, fsdp, accumulation, chunk)
    finally:
        distributed.cleanup()


def run_two_ranks(out_dir, steps: int = STEPS, resume: bool = False, fsdp: bool = False,
                  accumulation: int = 1, chunk: int | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out_dir), steps, resume, fsdp, accumulation, chunk), nprocs=2, join=True)


def records(run_dir, key):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r[key]) for r in lines if key in r]


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    run_two_ranks(tmp_path / "ddp")
    single = train(tmp_path / "single", world=1)
    for key in ("loss", "val_loss"):
        a, b = records(tmp_path / "ddp", key), records(tmp_path / "single", key)
        assert [i for i, _ in a] == [i for i, _ in b] and len(a) > 1
        for (_, la), (_, lb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-5)
    assert records(tmp_path / "ddp", "tokens")[-1] == records(tmp_path / "single", "tokens")[-1]

    # the 2-rank checkpoint is an ordinary run directory: it loads in one process
    model, _ = load_run(tmp_path / "ddp")
    for (name, p), q in zip(model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    state = torch.load(tmp_path / "ddp" / "trainer.pt", weights_only=False)
    assert len(state["ranks"]) == 2

    # resuming needs the same number of processes
    with pytest.raises(LMForgeError, match="nproc-per-node 2"):
        train(tmp_path / "ddp", world=1, resume=True)


@pytest.mark.slow
def test_two_rank_resume_is_exact(tmp_path):
    run_two_ranks(tmp_path / "straight", steps=STEPS)
    run_two_ranks(tmp_path / "split", steps=3)
    run_two_ranks(tmp_path / "split", steps=STEPS, resume=True)
    for key in ("loss", "val_loss"):
        a, b = records(tmp_path / "straight", key), records(tmp_path / "split", key)
        assert [i for i, _ in a] == [i for i, _ in b]
        for (_, la), (_, lb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-6)


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tmp_path):
    """Sharded weights, gradients and AdamW state: 3 steps, a gathered checkpoint, a resumed
    3 more (the optimizer state goes through the file), with 2 micro-batches per step; the
    losses and final weights equal one process with twice the batch. The sharded runs compute
    the loss in chunks of 5 tokens (the large-vocabulary path), the single process whole."""
    run_two_ranks(tmp_path / "fsdp", steps=3, fsdp=True, accumulation=2, chunk=100)
    run_two_ranks(tmp_path / "fsdp", steps=STEPS, resume=True, fsdp=True, accumulation=2, chunk=100)
    single = train(tmp_path / "single", world=1, accumulation=2)
    for key in ("loss", "val_loss", "by_hand"):
        a, b = records(tmp_path / "fsdp", key), records(tmp_path / "single", key)
        assert [i for i, _ in a] == [i for i, _ in b] and len(a) > 1
        for (_, la), (_, lb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-5)

    # the gathered checkpoint is an ordinary run: one file per weight, the tied head not repeated
    model, _ = load_run(tmp_path / "fsdp")
    for (name, p), q in zip(model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fsdp" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "tok_emb.weight" in f.keys()

    # a sharded run resumes sharded only
    with pytest.raises(Exception, match="resume with --set fsdp=true"):
        run_two_ranks(tmp_path / "fsdp", steps=STEPS + 1, resume=True, fsdp=False, accumulation=2)


def _from_main_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from lmforge.train import distributed

    def make():  # leaves a trace of every process that ran it
        open(os.path.join(out_dir, f"ran-{rank}"), "w").close()
        return {"made_by": rank, "merges": [[1, 2], [3, 4]]}

    try:
        distributed.setup(torch.device("cpu"))
        got = distributed.from_main(make)
        with open(os.path.join(out_dir, f"got-{rank}.json"), "w") as f:
            json.dump(got, f)
    finally:
        distributed.cleanup()


def test_from_main_runs_once_and_every_rank_gets_rank_0s_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_from_main_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-0"]
    for r in (0, 1):
        assert json.loads((tmp_path / f"got-{r}.json").read_text()) == {"made_by": 0, "merges": [[1, 2], [3, 4]]}

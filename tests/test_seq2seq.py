"""The encoder-decoder Transformer: masking, caching, the loss, and learning two toy tasks."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.models.seq2seq import Seq2SeqConfig, Transformer
from lmforge.translate.search import beam_search, greedy_search

PAD, BOS, EOS = 0, 1, 2
V = 16  # ids 3..15 are "words"


def tiny(**kw) -> Transformer:
    cfg = dict(vocab_size=V, max_len=32, n_enc_layer=2, n_dec_layer=2, n_head=4, n_embd=32, ffn_hidden=64,
               dropout=0.0, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    torch.manual_seed(0)
    return Transformer(Seq2SeqConfig(**{**cfg, **kw}))


def batch_of(seqs, pad=PAD):
    w = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (w - len(s)) for s in seqs])


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_cached_decoding_equals_full_decoder(norm_position):
    model = tiny(norm_position=norm_position).eval()
    src = batch_of([[5, 6, 7, 8, EOS], [9, 10, EOS]])
    tgt = torch.tensor([[BOS, 3, 4, 5, 6, 7], [BOS, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        memory, mask = model.encode(src)
        full = model.decode(tgt, memory, mask)  # (B, T, V), no cache
        state = model.start_decoding(memory, mask, tgt.shape[1])
        steps = torch.cat([model.decode_step(tgt[:, t:t + 1], state) for t in range(tgt.shape[1])], dim=1)
    assert (full - steps).abs().max().item() <= 1e-5


def test_cross_attention_kv_is_computed_once_per_layer():
    model = tiny().eval()
    calls = []
    for block in model.decoder:
        block.cross_attn.kv.register_forward_hook(lambda *a: calls.append(1))
    src = batch_of([[5, 6, 7, EOS], [8, EOS]])
    greedy_search(model, src, max_len_a=0, max_len_b=8)
    assert len(calls) == model.config.n_dec_layer  # not once per step


def test_encoder_runs_once_per_batch_in_beam_search(monkeypatch):
    model = tiny().eval()
    n = []
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda src: (n.append(1), real(src))[1])
    beam_search(model, batch_of([[5, 6, EOS], [7, 8, 9, EOS], [3, EOS]]), beam=3, max_len_b=6)
    assert len(n) == 1


def test_padding_does_not_change_a_sentence():
    model = tiny().eval()
    alone = batch_of([[5, 6, 7, EOS]])
    padded = batch_of([[5, 6, 7, EOS], [8, 9, 10, 11, 12, 13, 14, 3, 4, EOS]])  # a longer neighbour
    with torch.no_grad():
        m1, _ = model.encode(alone)
        m2, _ = model.encode(padded)
        assert (m1[0] - m2[0, :4]).abs().max().item() <= 1e-5
        tgt = torch.tensor([[BOS, 3, 4, 5]])
        l1 = model(alone, tgt)
        l2 = model(padded, torch.cat([tgt, tgt]))
        assert (l1[0] - l2[0]).abs().max().item() <= 1e-5
    assert greedy_search(model, alone, max_len_b=6)[0] == greedy_search(model, padded, max_len_b=6)[0]
    assert beam_search(model, alone, beam=3, max_len_b=6)[0] == beam_search(model, padded, beam=3, max_len_b=6)[0]


def test_loss_is_label_smoothed_cross_entropy_ignoring_padding():
    model = tiny(label_smoothing=0.1)
    src = batch_of([[5, 6, EOS], [7, EOS]])
    tgt_in = torch.tensor([[BOS, 3, 4], [BOS, 5, PAD]])
    tgt_out = torch.tensor([[3, 4, EOS], [5, EOS, PAD]])
    logits, loss = model(src, tgt_in, tgt_out)
    keep = tgt_out.reshape(-1) != PAD
    logp = F.log_softmax(logits.reshape(-1, V)[keep], dim=-1)  # the formula, on the 5 real tokens
    nll = -logp.gather(1, tgt_out.reshape(-1)[keep, None]).squeeze(1)
    ref = (0.9 * nll - 0.1 * logp.mean(dim=-1)).mean()
    assert abs(loss.item() - ref.item()) <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_loss_in_chunks_equals_loss_from_logits(monkeypatch, tie):
    """return_logits=False with a chunk of 2 tokens: the same label-smoothed, padding-ignoring
    loss and gradients as from whole logits (1e-6)."""
    import lmforge.nn.loss as loss_module

    model = tiny(label_smoothing=0.1, tie_embeddings=tie)
    src = batch_of([[5, 6, EOS], [7, EOS]])
    tgt_in = torch.tensor([[BOS, 3, 4], [BOS, 5, PAD]])
    tgt_out = torch.tensor([[3, 4, EOS], [5, EOS, PAD]])
    params = list(model.parameters())
    _, ref = model(src, tgt_in, tgt_out)
    ref_grads = torch.autograd.grad(ref, params)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 2 * V)
    logits, loss = model(src, tgt_in, tgt_out, return_logits=False)
    grads = torch.autograd.grad(loss, params)
    assert logits is None and abs(loss.item() - ref.item()) <= 1e-6
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_tied_and_untied_embeddings():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.src_emb.weight is tied.tgt_emb.weight
    assert untied.lm_head.weight is not untied.tgt_emb.weight and untied.src_emb is not untied.tgt_emb
    assert untied.num_params() - tied.num_params() == 2 * V * 32


def test_config_errors_are_user_errors():
    with pytest.raises(LMForgeError, match="norm_position"):
        tiny(norm_position="middle")
    with pytest.raises(LMForgeError, match="pad_id"):
        tiny(pad_id=V)
    with pytest.raises(LMForgeError, match="unknown"):
        build_model("seq2seq", {"n_layers": 3})


def test_beam_one_equals_greedy():
    torch.manual_seed(1)
    model = tiny().eval()
    src = batch_of([[3 + (i * 7 + j) % 13 for j in range(2 + i % 5)] + [EOS] for i in range(8)])
    assert beam_search(model, src, beam=1, alpha=0.0, max_len_b=10) == greedy_search(model, src, max_len_b=10)


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from a second thread, and lose a lot when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_toy(task, steps=400, seed=0):
    """Random sequences of 'words' 3..15 -> the same sequence (copy) or reversed."""
    model = tiny(dropout=0.0, label_smoothing=0.0, norm_position="pre", n_embd=64, ffn_hidden=128)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def sample(n):
        seqs = [torch.randint(3, V, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
        return seqs, [task(s) for s in seqs]

    for step in range(steps):
        seqs, outs = sample(32)
        src = batch_of([s + [EOS] for s in seqs])
        tgt = batch_of([[BOS] + o + [EOS] for o in outs])
        for group in opt.param_groups:  # warm up, then decay linearly to 0
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        _, loss = model(src, tgt[:, :-1], tgt[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    seqs, outs = sample(200)
    hyps = greedy_search(model, batch_of([s + [EOS] for s in seqs]), max_len_a=1.0, max_len_b=3)
    return sum(h == o for h, o in zip(hyps, outs)) / len(outs), model, seqs, outs


@pytest.mark.parametrize("task", [lambda s: s, lambda s: s[::-1]], ids=["copy", "reverse"])
def test_learns_toy_task(task, one_thread):
    acc, model, seqs, outs = _train_toy(task)
    assert acc >= 0.95, acc
    beams = beam_search(model, batch_of([s + [EOS] for s in seqs[:50]]), beam=4, max_len_a=1.0, max_len_b=3)
    assert sum(b == o for b, o in zip(beams, outs[:50])) / 50 >= 0.95

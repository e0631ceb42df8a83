"""The compiled decode step computes what the eager model does: the same greedy tokens, logits
within float tolerance, through the Python API and `lmforge sample --compile`."""

import pytest
import torch

from lmforge import GPT, GPTConfig
from lmforge.checkpoint import save_run
from lmforge.cli.main import main
from lmforge.models.compiled import CompiledDecoder
from lmforge.models.decoding import generate_ids
from lmforge.tokenizers import CharTokenizer

# RoPE, grouped-query attention and a sliding window shorter than prompt + new tokens
MISTRAL_LIKE = dict(vocab_size=61, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                    pos_encoding="rope", norm="rmsnorm", mlp="swiglu", sliding_window=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**MISTRAL_LIKE)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)  # logits far apart: greedy ties do not decide the test
    return m


def test_compiled_greedy_tokens_and_logits_equal_eager(model):
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    dec = CompiledDecoder(model, max_len=48)
    got = dec.generate(prompt, 24, temperature=0.0)
    assert torch.equal(got, generate_ids(model, prompt, 24, temperature=0.0))
    assert dec.compile_seconds > 0
    # the last token was yielded, never fed: one compiled step at its position against the
    # eager forward of the whole sequence
    dec.step_pos.fill_(got.shape[1] - 1)
    dec.cache.index = dec.step_pos
    with torch.no_grad():
        step = dec._step(got[:, -1:], dec.step_pos)
        full = model(got)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    again = dec.generate(prompt[:1, :5], 10, temperature=0.0)  # another batch size and prompt length
    assert torch.equal(again, generate_ids(model, prompt[:1, :5], 10, temperature=0.0))
    with pytest.raises(ValueError, match="exceed"):
        next(dec.steps(prompt, 48))


def last_step_logits(m, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of m compiled equals m eager; returns the compiled step's logits at the
    last generated token and the whole sequence (for a reference forward)."""
    prompt = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(seed))
    dec = CompiledDecoder(m, max_len=32)
    got = dec.generate(prompt, 16, temperature=0.0)
    assert torch.equal(got, generate_ids(m, prompt, 16, temperature=0.0))
    dec.step_pos.fill_(got.shape[1] - 1)
    dec.cache.index = dec.step_pos
    with torch.no_grad():
        return dec._step(got[:, -1:], dec.step_pos).float(), got


def test_compiled_bf16_step_equals_eager_bf16(model):
    """bf16 goes through other kernels when compiled on a CPU (frozen weights, inductor's GEMM
    templates): the same greedy tokens on logits this far apart, logits within bf16 rounding."""
    import copy

    step, seq = last_step_logits(copy.deepcopy(model).to(torch.bfloat16), seed=2)
    with torch.no_grad():
        full = model(seq)[:, -1]
    # eager bf16 is 1.2% of the largest logit off fp32 here, the compiled step 1.1%
    assert (step - full).abs().max() <= 0.03 * full.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_step_equals_eager_quantized(model, bits):
    """int8 and int4 weights compile too (on a CPU inductor picks its own weight-only GEMM
    template where it times faster than torch's kernel): the same greedy tokens as the eager
    quantized model, logits within bf16 rounding of its logits (both round activations to bf16)."""
    import copy

    from lmforge.models.decoding import prepare_for_decoding

    m = prepare_for_decoding(copy.deepcopy(model), int8=bits == 8, int4=bits == 4, group_size=32)
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert f"Int{bits}Linear" in kinds
    step, seq = last_step_logits(m, seed=3)
    with torch.no_grad():
        full = m(seq)[:, -1]
    assert (step - full).abs().max() <= 0.01 * full.abs().max()


def test_sample_compile_prints_the_same_text(tmp_path, model, capsys):
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-")
    save_run(tmp_path, GPT(GPTConfig(**{**MISTRAL_LIKE, "vocab_size": tok.vocab_size})), tok)
    args = ["sample", "--run", str(tmp_path), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    out = capsys.readouterr()
    assert out.out == eager and "compiled the decode step in" in out.err
    assert main([*args, "--int8"]) == 0
    eager_int8 = capsys.readouterr().out
    assert main([*args, "--compile", "--int8"]) == 0
    assert capsys.readouterr().out == eager_int8
    assert main([*args, "--compile", "--draft", str(tmp_path)]) == 2
    assert "do not combine" in capsys.readouterr().err


@pytest.mark.parametrize("int8", [False, True])
def test_serving_engine_compiled_step_equals_eager(model, int8):
    """The engine's compiled step (all rows, all columns, one graph) against its eager step:
    requests of different lengths decoding together give the same tokens and log-probabilities,
    also with int8 weights (`serve --compile --int8`)."""
    import asyncio
    import copy

    from lmforge.models.decoding import prepare_for_decoding
    from lmforge.serve.engine import Engine, SamplingParams

    tok = CharTokenizer("".join(chr(ord("0") + i) for i in range(61)))
    rng = torch.Generator().manual_seed(2)
    requests = [(torch.randint(0, 61, (n,), generator=rng).tolist(), SamplingParams(max_tokens=m, temperature=0.0,
                                                                                   logprobs=0))
                for n, m in ((3, 20), (15, 30), (40, 24))]

    async def run(engine):
        async def one(ids, params):
            got = [(ev.token, ev.logprob) async for ev in engine.submit(ids, 1, params).events() if ev.token is not None]
            return [t for t, _ in got], torch.tensor([lp for _, lp in got])
        return await asyncio.gather(*(one(*r) for r in requests))

    results = []
    for compile in (False, True):
        m = prepare_for_decoding(copy.deepcopy(model), int8=True) if int8 else model
        engine = Engine(m, tok, max_batch=4, compile=compile)
        try:
            results.append(asyncio.run(run(engine)))
        finally:
            engine.close()
        assert (engine.compile_seconds > 0) == compile
    for (ta, la), (tb, lb) in zip(*results):
        assert ta == tb and len(ta) > 0
        # int8: both steps round the activations to bf16, each kernel its own way (2^-8 relative)
        torch.testing.assert_close(lb, la, atol=1e-2 if int8 else 1e-4, rtol=0)

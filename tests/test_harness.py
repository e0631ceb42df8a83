"""lmforge's lm-evaluation-harness model against lm-eval's own `hf` model on the same trained
model exported to Hugging Face format, on three tasks defined here from local JSONL files
(multiple choice, generation with exact match, rolling perplexity). Nothing is downloaded.

Tolerances: per-request log-likelihoods within 1e-4 (observed ~1e-5: the same arithmetic in
another order). A rolling-perplexity document's total, a sum over hundreds of tokens that `hf`
adds up in float32, within 1e-4 + 1e-7 x |total| (float32's rounding of a 1,000-nat sum is
6e-5). Accuracies, greedy flags and generated texts: identical."""

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

# before lm-eval imports `datasets`, which reads these once
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
import datasets.config  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lmforge  # noqa: E402
from lmforge import harness, scoring  # noqa: E402
from lmforge.checkpoint import load_run, read_run_config, save_run  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.harness import LMForgeLM  # noqa: E402
from lmforge.interop import export_hf  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import BPETokenizer  # noqa: E402

TOL = 1e-4
TASKS = ["lmf_choice", "lmf_gen", "lmf_ppl"]
GEN = "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 10\n  do_sample: false\n"
TASK_YAML = {
    "lmf_choice": ("multiple_choice", 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                   "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "lmf_gen": ("generate_until", 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n' + GEN
                + "metric_list:\n  - metric: exact_match\n"),
    "lmf_ppl": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL + 1e-7 * abs(b)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """lm-eval's json loader, cached under a temporary directory and kept off the network."""
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_text):
    """A tiny GPT trained for 200 steps on Shakespeare (enough for greedy continuations that
    differ from prompt to prompt), as a run and exported to HF."""
    torch.manual_seed(0)
    tok = BPETokenizer.train(shakespeare_text[:60_000], 600, pattern="gpt2")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64))
    data = torch.tensor(tok.encode(shakespeare_text[:30_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s:s + 65] for s in starts])  # (8, 65)
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("harness")
    save_run(root / "run", model.eval(), tok)
    export_hf(root / "run", root / "hf")
    return root


@pytest.fixture(scope="module")
def tasks(trained, shakespeare_text):
    """Three task YAMLs over JSONL files. The generation answers: lmforge.generate's greedy
    continuation for even documents (so exact match is 0.5 if the harness decodes as it does),
    a wrong one for odd documents."""
    lines = [line for line in shakespeare_text[60_000:90_000].split("\n") if len(line) > 24]
    choice = [{"context": line[:len(line) // 2], "label": i % 3,
               "choices": [line[len(line) // 2:] if k == i % 3 else lines[i + 5 * k + 40][len(line) // 2:]
                           for k in range(3)]} for i, line in enumerate(lines[:24])]
    model, tok = load_run(trained / "run")
    gen = []
    for i, line in enumerate(lines[100:116]):
        prompt = line[:8 + i % 12]  # prompts of different lengths: the batches are left-padded
        answer = lmforge.generate(model, tok, prompt, max_new_tokens=10, temperature=0.0, stop=["\n"])
        gen.append({"prompt": prompt, "answer": answer if i % 2 == 0 else answer + "#"})
    start = 100_000
    ppl = [{"text": shakespeare_text[start + 900 * i:start + 900 * i + 150 + 110 * i]} for i in range(6)]
    directory = trained / "tasks"
    directory.mkdir()
    for name, docs in (("lmf_choice", choice), ("lmf_gen", gen), ("lmf_ppl", ppl)):
        (trained / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
        kind, body = TASK_YAML[name]
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {trained / name}.jsonl\n"
            f"test_split: test\noutput_type: {kind}\n{body}", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def both(trained, tasks, offline):
    """simple_evaluate's results, samples included, for lmforge's model and for `hf`'s."""
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    ours = LMForgeLM(run=str(trained / "run"), batch_size=4)
    theirs = HFLM(pretrained=str(trained / "hf"), batch_size=4, device="cpu", dtype="float32")
    return {name: simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True)
            for name, lm in (("lmforge", ours), ("hf", theirs))}


def responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_hf(both):
    ours, theirs = both["lmforge"], both["hf"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["lmf_choice"][metric] == theirs["results"]["lmf_choice"][metric]
    pairs = [(a[0], b[0]) for x, y in zip(responses(ours, "lmf_choice"), responses(theirs, "lmf_choice"))
             for a, b in zip(x, y)]
    assert len(pairs) == 72
    assert max(abs(a[0] - b[0]) for a, b in pairs) <= TOL
    assert [a[1] for a, _ in pairs] == [b[1] for _, b in pairs]


def test_generation_matches_hf_and_lmforge_generate(both):
    ours, theirs = both["lmforge"], both["hf"]
    texts = [r[0][0] for r in responses(ours, "lmf_gen")]
    assert texts == [r[0][0] for r in responses(theirs, "lmf_gen")]
    assert any(texts) and len(set(texts)) > 4
    assert ours["results"]["lmf_gen"]["exact_match,none"] == theirs["results"]["lmf_gen"]["exact_match,none"] == 0.5


def test_batched_generation_equals_one_row_at_a_time(trained):
    """Left-padded rows decoded together with one KV cache, each at its own positions, give
    what the model's own generate gives each prompt alone (greedy, the full max_new_tokens)."""
    model, tok = load_run(trained / "run")
    contexts = [tok.encode(p) for p in ("Thou", "What say you to this, my", "O", "Now is the winter of our disc")]
    assert len({len(c) for c in contexts}) == 4
    texts = scoring.generate_batch(model, tok, contexts, 12)
    alone = [tok.decode(model.generate(torch.tensor([c]), 12, temperature=0.0)[0, len(c):].tolist(),
                        skip_special_tokens=True) for c in contexts]
    assert texts == alone and len(set(texts)) > 1


def test_rolling_perplexity_matches_hf(both):
    ours, theirs = both["lmforge"], both["hf"]
    lls = [(a[0][0], b[0][0]) for a, b in zip(responses(ours, "lmf_ppl"), responses(theirs, "lmf_ppl"))]
    assert len(lls) == 6 and all(close(a, b) for a, b in lls), lls
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["results"]["lmf_ppl"][metric], theirs["results"]["lmf_ppl"][metric], rel_tol=1e-6)


def test_rolling_windows_score_every_token_once(trained):
    """A document longer than block_size, scored by hand: the first 64 tokens from the prefix
    token on, then each next 64 tokens from the 64 tokens before them (lm-eval's windows)."""
    model, tok = load_run(trained / "run")
    lm = LMForgeLM(model=model, tokenizer=tok, batch_size=3)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 5
    toks = tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.eot_id, *toks[:63]]]))[0], -1)
        total, done = sum(logp[k, toks[k]].item() for k in range(64)), 64
        while done < len(toks):
            end = min(done + 64, len(toks))
            logp = torch.log_softmax(model(torch.tensor([toks[end - 65:end - 1]]))[0], -1)
            total += sum(logp[k - end + 64, toks[k]].item() for k in range(done, end))
            done = end
    assert len(toks) > 150
    (ours,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert close(ours, total)


def test_packed_rows_equal_one_sequence_per_request(trained):
    """Shared-context rows (a block mask, positions restarting after the context) give each
    request's score as a plain forward over that request alone, truncation included."""
    model, _ = load_run(trained / "run")
    torch.manual_seed(3)
    pairs = []
    for n_ctx in (5, 30, 70):  # 70: longer than block_size, cut from the left
        ctx = torch.randint(0, 599, (n_ctx,)).tolist()
        pairs += [(ctx, torch.randint(0, 599, (k,)).tolist()) for k in (1, 4, 9, 2)]
    packed = scoring.score_pairs(model, pairs, 64, batch_size=2, share=True)
    alone = scoring.score_pairs(model, pairs, 64, batch_size=5, share=False)
    assert len(scoring.pack_rows(pairs, 64)) < len(pairs)  # the contexts really were shared
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(pairs, alone):
            inp = (ctx + cont)[-65:-1]
            logp = torch.log_softmax(model(torch.tensor([inp]))[0, -len(cont):], -1)
            assert abs(lp - sum(logp[j, t].item() for j, t in enumerate(cont))) <= TOL
            assert greedy == (logp.argmax(-1).tolist() == cont)
    assert max(abs(a[0] - b[0]) for a, b in zip(packed, alone)) <= TOL
    assert [a[1] for a in packed] == [b[1] for b in alone]


def test_adapter_matches_hf_with_peft(trained):
    """run + LoRA adapter through model_args, against `hf` with the same adapter in PEFT's format."""
    pytest.importorskip("peft")
    from lmforge.adapters import save_adapter
    from lmforge.nn.lora import apply_lora

    model, _ = load_run(trained / "run", inference=False)
    apply_lora(model, ["attn.qkv", "mlp.fc"], r=4, alpha=8, dropout=0.0)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # a fresh adapter has B = 0: no difference to see
    save_adapter(model, trained / "ad", base_config=read_run_config(trained / "run"))
    export_hf(trained / "run", trained / "hf-ad", adapter=trained / "ad")
    reqs = [Instance("loglikelihood", {}, (c, t), i) for i, (c, t) in
            enumerate([("Romeo, Romeo, wherefore", " art thou"), ("My lord", ", I"), ("", "Good night")])]
    ours = LMForgeLM(run=str(trained / "run"), adapter=str(trained / "ad")).loglikelihood(reqs, disable_tqdm=True)
    theirs = HFLM(pretrained=str(trained / "hf-ad"), peft=str(trained / "hf-ad" / "adapter"), device="cpu",
                  batch_size=2).loglikelihood(reqs, disable_tqdm=True)
    plain = LMForgeLM(run=str(trained / "run")).loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)) <= TOL
    assert min(abs(a[0] - b[0]) for a, b in zip(ours, plain)) > 1e-3  # the adapter changed every score


def test_registered_beside_lm_evals_own_models():
    assert get_model("lmforge") is LMForgeLM
    assert get_model("hf") is HFLM  # registering first must not hide lm-eval's built-in models


def test_missing_lm_eval_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LMForgeError, match="pip install"):
        harness.model_class.__wrapped__()


def test_bad_model_args(trained):
    with pytest.raises(LMForgeError, match="unknown lmforge model_args"):
        LMForgeLM(run=str(trained / "run"), temperature=1)
    with pytest.raises(LMForgeError, match="run=RUN"):
        LMForgeLM()
    with pytest.raises(LMForgeError, match="batch_size"):
        LMForgeLM(run=str(trained / "run"), batch_size="many")


def test_cli_tasks_writes_results(trained, tasks, offline, tmp_path, capsys, both):
    out = tmp_path / "res" / "results.json"
    assert main(["eval", "--run", str(trained / "run"), "--tasks", "lmf_choice,lmf_ppl", "--include-path", str(tasks),
                 "--batch-size", "3", "--output", str(out), "--no-progress"]) == 0
    assert "lmf_choice" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    assert res["lmf_choice"]["acc,none"] == both["hf"]["results"]["lmf_choice"]["acc,none"]
    assert math.isclose(res["lmf_ppl"]["bits_per_byte,none"], both["hf"]["results"]["lmf_ppl"]["bits_per_byte,none"],
                        rel_tol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_cli_needs_data_or_tasks(trained, capsys):
    run = str(trained / "run")
    assert main(["eval", "--run", run]) == 2
    assert "--data DIR" in capsys.readouterr().err
    assert main(["eval", "--run", run, "--data", run, "--tasks", "lmf_choice"]) == 2
    assert "two modes" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_unknown_task(trained, tasks, offline, capsys):
    """Looked for under --include-path, then among lm-eval's own tasks (~10 s to index)."""
    run = str(trained / "run")
    assert main(["eval", "--run", run, "--tasks", "nope", "--include-path", str(tasks)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_command_line_knows_lmforge(trained, tasks):
    """`python -m lmforge.harness` is lm-eval's command line with `--model lmforge` registered."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(trained / "hf-datasets-cli")}
    proc = subprocess.run([sys.executable, "-m", "lmforge.harness", "--model", "lmforge", "--model_args",
                           f"run={trained / 'run'},dtype=float32", "--tasks", "lmf_choice",
                           "--include_path", str(tasks), "--limit", "6", "--batch_size", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lmf_choice" in proc.stdout and "acc" in proc.stdout


def test_plain_lm_eval_command_knows_lmforge(trained, tasks, both, tmp_path):
    """The `lm_eval` console script itself: lmforge's .pth file registers the model class at
    start-up, and the scores equal the in-process run's."""
    script = Path(sysconfig.get_path("scripts")) / "lm_eval"
    assert script.exists(), f"lm-eval's console script is not at {script}"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run([str(script), "--model", "lmforge", "--model_args", f"run={trained / 'run'},dtype=float32",
                           "--tasks", "lmf_choice", "--include_path", str(tasks), "--batch_size", "4",
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(written.read_text())["results"]["lmf_choice"]
    want = both["hf"]["results"]["lmf_choice"]
    assert (got["acc,none"], got["acc_norm,none"]) == (want["acc,none"], want["acc_norm,none"])


def test_start_up_hook_defers_lmforge_and_keeps_lm_evals_models():
    """The hook imports neither torch nor lmforge.harness until lm-eval asks for the model."""
    code = ("import sys, lm_eval.api.registry as r\n"
            "assert 'lmforge.lm_eval_hook' in sys.modules and 'torch' not in sys.modules\n"
            "import lm_eval.models\n"
            "assert 'lmforge.harness' not in sys.modules\n"
            "print(r.get_model('lmforge').__name__, r.get_model('hf').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LMForgeLM", "HFLM"]


# ---- chat templates (--apply_chat_template) ----------------------------------------------------

CHAT = ("{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] | trim + eos_token + "
        "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def chat_models(trained, tasks):
    """The trained run with a chat template of its own, as a run and exported to HF; and a
    multiple-choice task whose answers start with a prefix the assistant turn is given
    (lm-eval's gen_prefix: the last message continued, not a new turn)."""
    import shutil

    from lmforge.chat import ChatTemplate, save_chat_template

    shutil.copytree(trained / "run", trained / "chat-run")
    save_chat_template(ChatTemplate(CHAT), trained / "chat-run")
    export_hf(trained / "chat-run", trained / "chat-hf")
    body = (tasks / "lmf_choice.yaml").read_text().replace("task: lmf_choice", "task: lmf_prefixed")
    (tasks / "lmf_prefixed.yaml").write_text(body + 'gen_prefix: "The line ends: "\n', encoding="utf-8")
    return trained / "chat-run", trained / "chat-hf"


@pytest.fixture(scope="module")
def chat_both(chat_models, tasks, offline):
    run, hf = chat_models
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    models = {"lmforge": LMForgeLM(run=str(run), batch_size=4),
              "hf": HFLM(pretrained=str(hf), batch_size=4, device="cpu", dtype="float32")}
    return {name: simple_evaluate(model=lm, tasks=["lmf_choice", "lmf_prefixed", "lmf_gen"], task_manager=manager,
                                  log_samples=True, apply_chat_template=True, system_instruction="Finish the line.")
            for name, lm in models.items()}


def prompts(results, task):
    return [[a[0] for a in s["arguments"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("task", ["lmf_choice", "lmf_prefixed", "lmf_gen"])
def test_chat_template_prompts_and_scores_match_hf(chat_both, task):
    ours, theirs = chat_both["lmforge"], chat_both["hf"]
    assert prompts(ours, task) == prompts(theirs, task)
    first = prompts(ours, task)[0][0]
    assert first.startswith("<|system|>\nFinish the line.<|endoftext|>\n<|user|>\n")
    assert first.endswith("The line ends:" if task == "lmf_prefixed" else "<|assistant|>\n")
    metrics = {k: v for k, v in ours["results"][task].items() if "stderr" not in k and k != "alias"}
    assert metrics == {k: theirs["results"][task][k] for k in metrics}
    if task != "lmf_gen":
        pairs = [(a[0][0], b[0][0]) for x, y in zip(responses(ours, task), responses(theirs, task)) for a, b in zip(x, y)]
        assert max(abs(a - b) for a, b in pairs) <= TOL
    else:
        assert responses(ours, task) == responses(theirs, task)


def test_chat_template_recorded_and_cli_option(chat_models, tasks, offline, chat_both, tmp_path, capsys):
    lm = LMForgeLM(run=str(chat_models[0]))
    assert lm.chat_template(True) == CHAT and lm.chat_template(False) is None
    with pytest.raises(LMForgeError, match="no chat template named 'tool_use'"):
        lm.chat_template("tool_use")
    assert LMForgeLM(run=str(chat_models[0]).replace("chat-run", "run")).chat_template(True) == harness.PLAIN_FORMAT
    out = tmp_path / "chat.json"
    assert main(["eval", "--run", str(chat_models[0]), "--tasks", "lmf_choice", "--include-path", str(tasks),
                 "--batch-size", "3", "--apply-chat-template", "--system-instruction", "Finish the line.",
                 "--output", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())["results"]["lmf_choice"]
    assert got["acc,none"] == chat_both["lmforge"]["results"]["lmf_choice"]["acc,none"]
    assert main(["eval", "--run", str(chat_models[0]), "--tasks", "lmf_choice", "--include-path", str(tasks),
                 "--system-instruction", "x"]) == 2
    assert "--apply-chat-template" in capsys.readouterr().err

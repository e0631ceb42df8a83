"""Hugging Face model directories <-> lmforge run directories, for every family in
`hf_families`, a tensor at a time.

    import_hf("llama-dir", "runs/llama")      # config.json, weights, generation_config.json, tokenizer
    export_hf("runs/llama", "hf-dir")         # AutoModelForCausalLM.from_pretrained("hf-dir")

Neither direction builds the model: names and shapes come from the family's table and a
GPT built on the meta device (no memory), and each tensor is read from its memory-mapped
shard, converted (concatenated, split or transposed) and streamed to the output file. Both
write into a temporary directory next to the destination and rename it at the end, so a
failure leaves nothing behind. transformers itself is never imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..chat.template import (ChatTemplate, load_chat_template, read_hf_chat_template, save_chat_template,
                             write_hf_chat_template)
from ..checkpoint import RUN_FORMAT, read_run_config
from ..errors import LMForgeError
from ..fileio import read_json, write_json
from ..models.gpt import GPT, GPTConfig
from ..tokenizers import BPETokenizer, Tokenizer, load_tokenizer
from ..tokenizers.hf_bpe import HFBPETokenizer
from .hf_families import Family, family_for, family_of, part_rows
from .hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer
from .hf_weights import TORCH_DTYPES, HFWeights, open_run_weights, write_safetensors, write_sharded
from .peft import export_peft_adapter, read_peft_adapter, write_imported_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_KEYS = ("temperature", "top_p", "top_k")
DEFAULT_SHARD = 5 * 2**30  # transformers' own default shard size before version 5


# --- the tensor plan: lmforge name -> Hugging Face names ------------------------------------------
def tensor_plan(family: Family, cfg: GPTConfig) -> list[tuple[str, list[str], list[tuple[int, ...]], bool]]:
    """(lmforge name, HF names, each HF tensor's shape, transposed?) for every weight of the
    model `cfg` describes (a tied head once, as the embedding), in the model's order."""
    with torch.device("meta"):  # shapes only
        params = list(GPT(cfg).named_parameters())
    plan = []
    for name, p in params:
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            hf = [family.layer_prefix.format(i=i) + h for h in family.layer[rest]]
            transposed = rest in family.transposed
        else:
            hf, transposed = list(family.top[name]), False
        shape = tuple(p.shape[::-1]) if transposed else tuple(p.shape)
        rows = part_rows(rest if name.startswith("blocks.") else name, cfg, len(hf), shape[0])
        plan.append((name, hf, [(r, *shape[1:]) for r in rows], transposed))
    return plan


# --- directories ----------------------------------------------------------------------------------
@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed to `out` if the block succeeds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LMForgeError(f"{out} already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_hf_config(directory: Path) -> tuple[Family, GPTConfig, dict[str, Any]]:
    if not directory.is_dir():
        raise LMForgeError(f"Hugging Face model directory not found: {directory}")
    hf = read_json(directory / "config.json", "Hugging Face config")
    where = str(directory / "config.json")
    family = family_of(hf, where)
    return family, family.from_hf(hf, where), hf


def read_generation(directory: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json (or config.json's token ids) -> the run's "generation" entry."""
    path = directory / "generation_config.json"
    gen = read_json(path, "generation config") if path.is_file() else {}
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    out = {"bos_token_id": gen.get("bos_token_id", hf.get("bos_token_id")),
           "eos_token_id": [] if eos is None else [eos] if isinstance(eos, int) else list(eos)}
    return out | {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def read_tokenizer(directory: Path) -> tuple[Tokenizer, ChatTemplate | None]:
    """The one place tokenizer files are read on import: the tokenizer and its chat template."""
    return read_hf_tokenizer(directory), read_hf_chat_template(directory)


def write_tokenizer(tok: Tokenizer, chat: ChatTemplate | None, directory: Path, cfg: GPTConfig) -> None:
    """The one place tokenizer files are written on export (with the chat template, if any)."""
    write_hf_tokenizer(tok, directory, model_max_length=cfg.block_size)
    if chat is not None:
        write_hf_chat_template(chat, directory)


def check_weights(weights: HFWeights, family: Family, plan, cfg: GPTConfig) -> dict[str, str]:
    """Every tensor the config implies is there with its shape, and nothing else is. Returns
    {family's name: name in the file} (files of a headless model lack the `model.` prefix)."""
    names = {}
    for stored in weights.names():
        full = stored
        if not stored.startswith((family.optional_prefix, "lm_head.")):
            full = family.optional_prefix + stored
        names[full] = stored
    where = weights.directory
    wanted = [(hf, shape) for _, hfs, shapes, _ in plan for hf, shape in zip(hfs, shapes)]
    missing = [hf for hf, _ in wanted if hf not in names]
    if missing:
        raise LMForgeError(f"{where}: the checkpoint lacks {missing[0]} ({len(missing)} tensors missing); "
                           "it does not match its config.json")
    for hf, shape in wanted:
        got = weights.shape(names[hf])
        if got != shape:
            raise LMForgeError(f"{where / weights.file_of(names[hf])}: tensor {names[hf]} has shape {got}, "
                               f"but config.json implies {shape}")
    used = {hf for hf, _ in wanted} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unexpected = sorted(n for n in set(names) - used if not n.endswith(family.skip_suffixes))
    if unexpected:
        raise LMForgeError(f"{where / weights.file_of(names[unexpected[0]])}: unexpected tensor {unexpected[0]} "
                           f"({len(unexpected)} in all); not a plain {family.name} checkpoint")
    return names


def import_hf(directory: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
              adapter: str | Path | None = None, adapter_out: str | Path | None = None,
              dtype: str | None = None) -> Path:
    """A Hugging Face model directory -> lmforge run directory `out`, in one pass. With
    `adapter` (a PEFT LoRA directory), also its lmforge adapter at `adapter_out` (default
    out/adapter). `dtype`: float32 | bfloat16 | float16; default: the checkpoint's own."""
    directory, out = Path(directory), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise LMForgeError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    family, cfg, hf = read_hf_config(directory)
    tokenizer, chat = read_tokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LMForgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                           "they do not belong together")
    weights = HFWeights(directory)
    plan = tensor_plan(family, cfg)
    names = check_weights(weights, family, plan, cfg)
    lora = read_peft_adapter(adapter, cfg, family) if adapter is not None else None  # checked before writing
    first = names[plan[0][1][0]]
    target = DTYPES[dtype] if dtype else weights.get(first).dtype
    if not target.is_floating_point:
        raise LMForgeError(f"{directory}: {first} is {target}, not a floating-point tensor")

    def produce(name: str) -> torch.Tensor:
        _, hfs, _, transposed = by_name[name]
        parts = [weights.get(names[h]) for h in hfs]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]  # (sum of rows, ...)
        return (t.t() if transposed else t).to(target).contiguous()

    by_name = {p[0]: p for p in plan}
    specs = [(name, target, _ours_shape(shapes, transposed)) for name, _, shapes, transposed in plan]
    run_config = {"format": RUN_FORMAT, "version": 1, "model": "gpt", "model_config": cfg.to_dict(),
                  "source": {"format": f"huggingface-{family.model_type}", "model_type": family.model_type,
                             "path": str(directory.resolve())},
                  "generation": read_generation(directory, hf)}
    with staged_dir(out) as tmp:
        write_safetensors(tmp / "model.safetensors", specs, produce)
        tokenizer.save(tmp / "tokenizer.json")
        if chat is not None:
            save_chat_template(chat, tmp)
        write_json(tmp / "config.json", run_config)
        if lora is not None and adapter_out is None:
            write_imported_adapter(lora, cfg, run_config, tmp / "adapter", base_run=out, source=adapter)
    if lora is not None and adapter_out is not None:
        with staged_dir(Path(adapter_out)) as tmp:
            write_imported_adapter(lora, cfg, run_config, tmp, base_run=out, source=adapter)
    return out


def _ours_shape(shapes: list[tuple[int, ...]], transposed: bool) -> tuple[int, ...]:
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shape[::-1]) if transposed else shape


def export_hf(run: str | Path, out: str | Path, adapter: str | Path | None = None,
              adapter_out: str | Path | None = None, tokenizer: bool = True,
              max_shard_size: int = DEFAULT_SHARD) -> Path:
    """lmforge run -> a directory that transformers' AutoModelForCausalLM and AutoTokenizer
    load: config.json, model.safetensors (sharded past `max_shard_size` bytes),
    generation_config.json, tokenizer files. With `adapter`, also the adapter in PEFT's format
    at `adapter_out` (default out/adapter), pointing at `out` as its base model."""
    run, out = Path(run), Path(out)
    rc = read_run_config(run)
    if rc["model"] != "gpt":
        raise LMForgeError(f"{run} holds a {rc['model']!r} model; only GPT runs export to Hugging Face")
    cfg = GPTConfig.from_dict(rc["model_config"], where="gpt model config")
    family = family_for(cfg, rc.get("source", {}).get("model_type"))
    tok = load_tokenizer(run / "tokenizer.json") if tokenizer else None
    if tok is not None and not isinstance(tok, (BPETokenizer, HFBPETokenizer)):
        raise LMForgeError(f"the run's {tok.kind!r} tokenizer has no Hugging Face form; "
                           "export the weights alone with --no-tokenizer")
    path = run / "model.safetensors"
    handle = open_run_weights(path)
    plan = tensor_plan(family, cfg)
    stored = set(handle.keys())
    missing = [name for name, *_ in plan if name not in stored]
    if missing:
        raise LMForgeError(f"{path} lacks {missing[0]}; it does not match the run's config.json")
    dtypes = {name: TORCH_DTYPES[handle.get_slice(name).get_dtype()] for name, *_ in plan}
    specs, source = [], {}
    for name, hfs, shapes, transposed in plan:
        for k, (hf, shape) in enumerate(zip(hfs, shapes)):
            specs.append((hf, dtypes[name], shape))
            source[hf] = (name, k, [s[0] for s in shapes], transposed)
    current: dict[str, torch.Tensor] = {}  # the lmforge tensor being split, read once

    def produce(hf: str) -> torch.Tensor:
        name, k, rows, transposed = source[hf]
        if name not in current:
            current.clear()
            current[name] = handle.get_tensor(name)
        t = current[name]
        t = t.t() if transposed else t
        return t.split(rows, dim=0)[k].contiguous()

    gen = rc.get("generation") or _generation_from_tokenizer(tok)
    hf_cfg = {**family.to_hf(cfg), "bos_token_id": gen.get("bos_token_id"),
              "eos_token_id": _one_or_list(gen.get("eos_token_id", [])), "pad_token_id": None,
              "dtype": str(dtypes[plan[0][0]]).removeprefix("torch."),
              "torch_dtype": str(dtypes[plan[0][0]]).removeprefix("torch."), "use_cache": True}
    with staged_dir(out) as tmp:
        write_sharded(tmp, specs, produce, max_shard_size)
        current.clear()
        write_json(tmp / "config.json", hf_cfg)
        write_json(tmp / "generation_config.json",
                   {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"],
                    **{k: gen[k] for k in GENERATION_KEYS if k in gen}})
        if tok is not None:
            write_tokenizer(tok, load_chat_template(run), tmp, cfg)
    if adapter is not None:
        export_peft_adapter(run, adapter, Path(adapter_out) if adapter_out is not None else out / "adapter",
                            base=out, family=family)
    return out


def _generation_from_tokenizer(tok: Tokenizer | None) -> dict[str, Any]:
    eot = getattr(tok, "eot_id", None)
    bos = getattr(tok, "bos_id", None)
    # GPT-2's convention, for lmforge's own BPE: <|endoftext|> begins and ends a text
    return {"bos_token_id": eot if bos is None else bos, "eos_token_id": [] if eot is None else [eot]}


def _one_or_list(ids: list[int]) -> int | list[int] | None:
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def describe(directory: str | Path) -> str:
    """One line about an exported or imported directory (for the CLI)."""
    directory = Path(directory)
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    return f"{directory}{os.sep}: {', '.join(files)}"


__all__ = ["import_hf", "export_hf", "tensor_plan", "describe", "read_generation"]

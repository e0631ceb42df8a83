"""Hugging Face interop: GPT-2 checkpoints and tokenizers, PEFT LoRA adapters, both ways.

    from lmforge.interop import import_hf, export_hf
    import_hf("gpt2-dir", "runs/gpt2")            # HF GPT-2 directory -> lmforge run directory
    export_hf("runs/mine", "hf-dir")              # run -> GPT2LMHeadModel.from_pretrained("hf-dir")

transformers and peft are not needed here: the files are read and written directly.
"""

from .hf_gpt2 import export_hf, gpt_config_from_hf, hf_config_from_gpt, import_hf
from .hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer

__all__ = ["import_hf", "export_hf", "gpt_config_from_hf", "hf_config_from_gpt",
           "read_hf_tokenizer", "write_hf_tokenizer"]

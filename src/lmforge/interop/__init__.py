"""Hugging Face interop: checkpoints of every supported family (GPT-2, Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Phi-3), their tokenizers, and PEFT LoRA adapters, both ways.

    from lmforge.interop import import_hf, export_hf
    import_hf("llama-dir", "runs/llama")          # HF model directory -> lmforge run directory
    export_hf("runs/mine", "hf-dir")              # run -> AutoModelForCausalLM.from_pretrained("hf-dir")

transformers and peft are not needed here: the files are read and written directly.
"""

from .hf_families import FAMILIES
from .hf_gpt2 import gpt_config_from_hf, hf_config_from_gpt
from .hf_model import export_hf, import_hf
from .hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer

__all__ = ["import_hf", "export_hf", "FAMILIES", "gpt_config_from_hf", "hf_config_from_gpt",
           "read_hf_tokenizer", "write_hf_tokenizer"]

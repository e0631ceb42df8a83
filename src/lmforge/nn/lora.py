"""LoRA (Hu et al., 2021): adapt a frozen linear layer W by a low-rank update.

    h = W x + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

Only A and B train, so an adapter is r * (in + out) numbers per layer instead of in * out.
B starts at zero, so the adapted model *is* the base model at step 0 (bitwise), and A starts
like a Linear layer (Kaiming-uniform) so gradients reach B from the first step. After
training, `merge()` folds scaling * B A into W: the layer becomes an ordinary linear layer
again, at exactly the base model's inference cost.

`LoRALinear` keeps nn.Linear's `weight` / `bias` names, so a base checkpoint loads unchanged
into an adapted model; the adapter lives in `lora_A` / `lora_B`.

An embedding table E (vocab, d) can be adapted the same way, E + scaling * B A with B (vocab, r)
and A (r, d) (`LoRAEmbedding`). When the output head shares E (tied weights, as in GPT), the
head uses the same update (`LoRATiedLinear`), so the pair stays tied and merges once. This is
what lets a small adapter move which tokens are frequent when the new text uses words the
base barely saw (docs/finetuning.md measures it).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase
from ..errors import LMForgeError
from .quantized_base import FrozenLinear

ALL_LINEAR = "all-linear"
LORA_PARAMS = ("lora_A", "lora_B")
DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


@dataclass
class LoRAConfig(ConfigBase):
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the adapter's input (the frozen path sees x unchanged)
    # module-name patterns; by default the attention projections, as in the LoRA paper
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False  # rank-stabilised scaling (Kalajdzievski, 2023)

    def validate(self) -> None:
        self.check_positive("r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            self.fail(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            self.fail("targets must name at least one module pattern (or all-linear)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def plain_linear(layer: nn.Module) -> nn.Linear:
    """An nn.Linear sharing `layer`'s weight and bias Parameters (ties stay ties)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    out.weight = layer.weight
    if layer.bias is not None:
        out.bias = layer.bias
    return out


def add_adapter(module: nn.Module, r: int, alpha: float, rslora: bool, n_in: int, n_out: int,
                like: torch.Tensor) -> None:
    """Give `module` the low-rank pair: A (r, n_in) initialised as nn.Linear initialises its
    weight, B (n_out, r) zeros, so B A = 0 and the adapted layer starts equal to the base."""
    module.r, module.alpha, module.rslora = r, alpha, rslora
    module.scaling = alpha / (math.sqrt(r) if rslora else r)
    kw = dict(device=like.device, dtype=like.dtype)
    module.lora_A = nn.Parameter(torch.empty(r, n_in, **kw))
    module.lora_B = nn.Parameter(torch.zeros(n_out, r, **kw))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. The base may also be a FrozenLinear
    (a bf16 / int8 / nf4 base, nn/quantized_base.py): A and B are then float32 and train as
    usual, but merging needs the full-precision base (`lmforge merge`)."""

    def __init__(self, base: nn.Linear | FrozenLinear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise LMForgeError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, FrozenLinear):
            self.base_layer = base
            self.weight, self.bias = None, None
            like = torch.empty(0, device=next(base.buffers()).device)  # float32 adapters
        else:
            self.base_layer = None
            self.weight = base.weight  # the same Parameter: a base checkpoint loads unchanged
            self.bias = base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            like = base.weight
        add_adapter(self, r, alpha, rslora, self.in_features, self.out_features, like)  # A (r, in), B (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, the update W receives on merge: (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)  # (..., out)
        if self.merged:
            return y
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        # scale the small B, not the (..., out) product, and add in place (F.linear does not
        # keep y for backward): one output-sized tensor instead of three
        return y.add_(F.linear(h, self.lora_B * self.scaling))  # (..., out)

    def effective_weight(self) -> torch.Tensor | None:
        """W + scaling B A as one tensor (the chunked loss uses it in place of the logits);
        None while adapter dropout is active, which no single weight can express, or on a
        quantized base, whose whole weight is never made in floating point."""
        if self.base_layer is not None:
            return None
        if self.merged:
            return self.weight
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return None
        return self.weight + self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A. The forward pass is then one matrix product, as the base's."""
        if self.merged:
            raise LMForgeError("this LoRA layer is already merged; unmerge() it before merging again")
        if getattr(self, "base_layer", None) is not None:
            raise LMForgeError("cannot merge into a quantized base; merge the adapter into the full-precision "
                               "base run instead (lmforge merge --base BASE --adapter ADAPTER --out RUN)")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A: the base weight again (up to float rounding, ~1 ulp)."""
        if not self.merged:
            raise LMForgeError("this LoRA layer is not merged; there is nothing to unmerge")
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the current (merged) weight, for shipping a merged model."""
        if not self.merged:
            raise LMForgeError("merge() the LoRA layer before turning it into a plain Linear")
        return plain_linear(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding E plus a trainable low-rank update: E + scaling * B A, with
    B (vocab, r) starting at zero and A (r, d) like LoRALinear's A."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise LMForgeError(f"LoRA rank r must be positive, got {r}")
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight
        self.weight.requires_grad_(False)
        add_adapter(self, r, alpha, rslora, self.embedding_dim, self.num_embeddings, base.weight)  # A (r, d), B (vocab, r)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (vocab, d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, self.weight, self.padding_idx)  # (..., d)
        if self.merged:
            return x
        # the padding row's B gets no gradient, so it stays zero and padding stays padding
        return x + F.embedding(idx, self.lora_B, self.padding_idx) @ self.lora_A * self.scaling

    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge

    def to_embedding(self) -> nn.Embedding:
        if not self.merged:
            raise LMForgeError("merge() the LoRA embedding before turning it into a plain Embedding")
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        out.weight = self.weight
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, scaling={self.scaling:g}, "
                f"merged={self.merged}")


class LoRATiedLinear(nn.Module):
    """An output head whose weight is an adapted embedding's E: x (E + scaling B A)^T, with the
    embedding's own A and B (it holds no adapter tensors of its own; merging the embedding
    merges it too)."""

    def __init__(self, base: nn.Linear, source: LoRAEmbedding):
        super().__init__()
        if base.weight is not source.weight:
            raise LMForgeError("LoRATiedLinear needs a linear layer that shares the embedding's weight")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        object.__setattr__(self, "source", source)  # not a submodule: A and B are saved once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., vocab)
        src = self.source
        if src.merged:
            return y
        return y.add_(F.linear(F.linear(x, src.lora_A), src.lora_B * src.scaling))  # as LoRALinear

    def effective_weight(self) -> torch.Tensor:
        """E + scaling B A: the adapted embedding, which this head reads as its weight."""
        src = self.source
        return self.weight if src.merged else self.weight + src.delta_weight().to(self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self)


@dataclass
class LoRAReport:
    """What apply_lora did: the adapted modules and the parameter counts."""

    modules: list[str]
    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"LoRA on {len(self.modules)} modules: {self.trainable:,} trainable of {self.total:,} "
                f"parameters ({100 * self.trainable_fraction:.3f}%)")


def linear_kind(name: str) -> str:
    """A module's name without its layer indices' prefix: 'blocks.3.attn.qkv' -> 'attn.qkv'.
    These are the names a user writes as targets."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1:])


def _tied(model: nn.Module, module: nn.Linear) -> bool:
    """True if the Linear's weight is shared with another module (e.g. GPT's LM head and the
    token embedding): an update to it would silently change the other module too."""
    if isinstance(module, FrozenLinear):
        return module.tied
    ptr = module.weight.data_ptr()
    return sum(1 for m in model.modules() for p in m.parameters(recurse=False)
               if p.data_ptr() == ptr) > 1


def linear_modules(model: nn.Module) -> dict[str, nn.Linear | FrozenLinear]:
    """Every nn.Linear or frozen quantized linear (not yet adapted) by its full name."""
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, FrozenLinear)}


def embedding_modules(model: nn.Module) -> dict[str, nn.Embedding]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Embedding}


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a child (a module may sit under two names, e.g. a seq2seq
    model's shared source and target embedding)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips a repeated child
            if child is old:
                setattr(parent, name, new)


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a name that ends with it at a word boundary ('.' or '_'):
    'attn.qkv' matches 'blocks.0.attn.qkv' and 'layers.0.self_attn.qkv', 'attn.q' matches
    'cross_attn.q' but not 'attn.qkv'. Full names and glob patterns ('blocks.0.*') match too."""
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return name.endswith(pattern) and name[-len(pattern) - 1] in "._"


def parse_targets(targets: list[str] | str) -> list[str]:
    """'attn.qkv,mlp.fc' or ['attn.qkv', 'mlp.fc'] -> ['attn.qkv', 'mlp.fc']."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return [t for item in items for t in re.split(r"[,\s]+", item) if t]


def select_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The full names of the Linear modules the target patterns pick."""
    targets = parse_targets(targets)
    linears, embeddings = linear_modules(model), embedding_modules(model)
    tied = {n for n, m in linears.items() if _tied(model, m)}
    kinds = ", ".join(sorted({linear_kind(n) for n in linears}))
    if embeddings:
        kinds += f"; embeddings: {', '.join(embeddings)}"
    chosen: list[str] = []
    for pattern in targets:
        if pattern == ALL_LINEAR:
            # every Linear but tied ones and a module named lm_head (GPT's output head), as PEFT does
            hits = [n for n in linears if n not in tied and linear_kind(n) != "lm_head"]
        else:
            hits = [n for n in [*linears, *embeddings] if _matches(n, pattern)]
            if not hits:
                raise LMForgeError(f"LoRA target {pattern!r} matches no linear module; this model's "
                                   f"linear modules are: {kinds} (or use {ALL_LINEAR})")
            bad = [n for n in hits if n in tied]
            if bad:
                emb = next((e for e, m in embeddings.items() if m.weight is linears[bad[0]].weight), "the embedding")
                raise LMForgeError(f"LoRA target {pattern!r} picks {bad[0]}, whose weight is tied to the "
                                   f"token embedding; target the embedding ({emb}) instead: the head then "
                                   f"gets the same update and stays tied")
        chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise LMForgeError(f"LoRA targets {targets} select no module; linear modules: {kinds}")
    return chosen


def apply_lora(model: nn.Module, targets: list[str] | str = DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.05, rslora: bool = False) -> LoRAReport:
    """Wrap the target Linear modules in LoRALinear and Embedding modules in LoRAEmbedding (a
    head tied to an adapted embedding follows it), in place; freeze every other parameter, and
    record the settings on `model.lora_config` (what save_adapter writes)."""
    if lora_layers(model):
        raise LMForgeError("the model already has LoRA adapters; merge_lora(model, unload=True) first")
    cfg = LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), targets=parse_targets(targets),
                     rslora=rslora)
    cfg.validate()
    names = select_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            adapted = LoRAEmbedding(module, r, alpha, rslora)
            for head in [m for m in linear_modules(model).values() if m.weight is module.weight]:
                _replace_module(model, head, LoRATiedLinear(head, adapted))
        else:
            adapted = LoRALinear(module, r, alpha, dropout, rslora)
        _replace_module(model, module, adapted)
    model.lora_config = cfg
    return lora_report(model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """The modules that hold adapter tensors, by name (a shared module under its first name)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def lora_report(model: nn.Module) -> LoRAReport:
    params = {id(p): p for p in model.parameters()}.values()  # tied parameters once
    frozen = sum(m.n_weights for m in model.modules() if isinstance(m, FrozenLinear))  # a quantized base's
    return LoRAReport(modules=list(lora_layers(model)),
                      trainable=sum(p.numel() for p in params if p.requires_grad),
                      total=sum(p.numel() for p in params) + frozen)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: {'blocks.0.attn.qkv.lora_A': (r, in), ...}."""
    return {f"{name}.{p}": getattr(m, p).detach().contiguous()
            for name, m in lora_layers(model).items() for p in LORA_PARAMS}


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Merge every adapter into its weight. With `unload`, also replace each LoRALinear by a
    plain nn.Linear (the model is then exactly the base architecture and saves as such)."""
    layers = lora_layers(model)
    if not layers:
        raise LMForgeError("the model has no LoRA adapters to merge")
    if not unload and any(layer.merged for layer in layers.values()):
        raise LMForgeError("the model's LoRA adapters are already merged; unmerge_lora(model) first")
    for layer in layers.values():
        if not layer.merged:
            layer.merge()
    if unload:
        for layer in [m for m in model.modules() if isinstance(m, LoRATiedLinear)] + list(layers.values()):
            plain = layer.to_embedding() if isinstance(layer, LoRAEmbedding) else layer.to_linear()
            _replace_module(model, layer, plain)
    if unload and hasattr(model, "lora_config"):
        del model.lora_config
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (without unload): subtract every adapter from its weight again."""
    layers = lora_layers(model)
    if not layers:
        raise LMForgeError("the model has no LoRA adapters to unmerge")
    for layer in layers.values():
        layer.unmerge()
    return model

"""Where a classifier keeps what freezing touches (its embedding modules and its layer list, found by shape, not
by a table of names), freezing a prefix of it, and the AdamW groups of what still trains."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from core.errors import UsageError

# Modules that run before the first layer; ELECTRA projects small embeddings up to the hidden size.
EMBEDDING_MODULES = ("embeddings", "embeddings_project")

SUPPORTED = ("BERT-like encoders whose layers are one list (DistilBERT, BERT, MiniLM, RoBERTa, ELECTRA, "
             "DeBERTa, MPNet, ModernBERT, …; README: First run, --model)")


def num_layers(config: PretrainedConfig) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UsageError(f"cannot tell how many layers a {config.model_type!r} model has: freezing supports "
                         f"{SUPPORTED}")
    return count


def check_freeze_depth(depth: int, config: PretrainedConfig, name: str) -> None:
    layers = num_layers(config)
    if not 0 <= depth <= layers:
        raise UsageError(f"--freeze-depth {depth} is invalid for {name!r}, which has {layers} layers: use 0 to "
                         f"{layers}")


@dataclass
class Backbone:
    """Where a model keeps what freezing touches: the base model, its embedding modules and its layer list."""
    base: nn.Module
    embedding_names: tuple[str, ...]
    layers_parent: nn.Module
    layers_name: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.layers_parent, self.layers_name)

    def embedding_modules(self) -> list[nn.Module]:
        return [getattr(self.base, n) for n in self.embedding_names]


def find_backbone(model: nn.Module) -> Backbone:
    base = getattr(model, model.base_model_prefix, None)
    kind = model.config.model_type
    if base is None or not isinstance(getattr(base, "embeddings", None), nn.Module):
        raise UsageError(f"cannot find the embeddings of a {kind!r} model: freezing supports {SUPPORTED}")
    count = num_layers(model.config)
    # The layer list is the ModuleList as long as the model is deep, closest to the base (encoder.layer,
    # transformer.layer, ...), so new BERT-like architectures work without a table of names.
    candidates = [(name, module) for name, module in base.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == count and name]
    if not candidates:
        raise UsageError(f"cannot find the {count} encoder layers of a {kind!r} model: freezing supports "
                         f"{SUPPORTED}")
    path = min(candidates, key=lambda c: c[0].count("."))[0]
    parent_path, _, attr = path.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    embeddings = tuple(n for n in EMBEDDING_MODULES if isinstance(getattr(base, n, None), nn.Module))
    return Backbone(base, embeddings, parent, attr)


def frozen_modules(backbone: Backbone, depth: int) -> list[nn.Module]:
    if depth == 0:
        return []
    return backbone.embedding_modules() + list(backbone.layers[:depth])


def freeze(model: nn.Module, depth: int) -> Backbone:
    """Freeze the embeddings and layers 0..depth-1 (depth 0 trains everything), as the reference study did."""
    backbone = find_backbone(model)
    check_freeze_depth(depth, model.config, model.config.name_or_path or model.config.model_type)
    for parameter in model.parameters():
        parameter.requires_grad = True
    for module in frozen_modules(backbone, depth):
        for parameter in module.parameters():
            parameter.requires_grad = False
    return backbone


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def decays(param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies: not to biases and normalisation weights (fewer than 2 dims)."""
    return param.ndim >= 2


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: `weight_decay` on the parameters that `decays`, none on the others."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if decays(p)], "weight_decay": weight_decay},
            {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0}]


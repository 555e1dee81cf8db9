"""Load a classifier, find its embeddings and layer list, freeze a prefix of it."""
from __future__ import annotations

import copy
import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from core.errors import UsageError, first_line
from core.hub import check_model_source, is_local, offline_hint

# Modules that run before the first layer; ELECTRA projects small embeddings up to the hidden size.
EMBEDDING_MODULES = ("embeddings", "embeddings_project")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
SUPPORTED = ("BERT-like encoders whose layers are one list (DistilBERT, BERT, MiniLM, RoBERTa, ELECTRA, "
             "DeBERTa, MPNet, ModernBERT, …; README: First run, --model)")


def model_config(name: str) -> PretrainedConfig:
    """Read and check the model's config, and that a local folder has readable weights and a tokenizer (no
    weights are loaded): the cheap check run before anything heavy."""
    folder = Path(name).expanduser()
    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(str(folder) if is_local(name) else name)
    except Exception as error:
        reason = first_line(error)
        where = "folder" if is_local(name) else "from the Hugging Face Hub"
        raise UsageError(f"could not load model {name!r} {where} ({reason}); offline, pass a local model folder: "
                         f"{offline_hint()}") from None
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING or config.is_encoder_decoder:
        raise UsageError(f"model {name!r} is a {config.model_type!r} model, not a text encoder with a "
                         f"sequence-classification head: freezing supports {SUPPORTED}")
    if is_local(name):
        check_model_files(folder, name)
    return config


def check_model_files(folder: Path, name: str) -> None:
    """A local model folder holds intact weights and a tokenizer; without tokenizer files transformers builds a
    5-token vocabulary that maps every word to [UNK], and the run trains on nothing."""
    weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not weights:
        raise UsageError(f"model folder {name!r} has no weights ({', '.join(WEIGHT_FILES[::2])})")
    if weights[0].name == "model.safetensors.index.json":
        try:
            shards = sorted(set(json.loads(weights[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, OSError) as error:
            raise UsageError(f"the weight index {str(weights[0])!r} is unreadable ({first_line(error)})") from None
        for shard in shards:
            check_safetensors(folder / shard)
    elif weights[0].suffix == ".safetensors":
        check_safetensors(weights[0])
    elif weights[0].stat().st_size == 0:
        raise UsageError(f"the weights file {str(weights[0])!r} is empty: download or save the model again")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"model folder {name!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                         "save the tokenizer with the model (tokenizer.save_pretrained)")


def check_safetensors(path: Path) -> None:
    """Read a safetensors header (8-byte length, JSON, then the tensor bytes) and check the file holds every
    tensor it lists: a zero-byte, truncated or foreign file fails here in one line, not in a loader's traceback."""
    def bad(why: str) -> UsageError:
        return UsageError(f"the weights file {str(path)!r} is not a usable safetensors file ({why}): download or "
                          "save the model again")
    if not path.is_file():
        raise bad("it is missing")
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, 100_000_000):
            raise bad("its header length is beyond the end of the file")
        try:
            header = json.loads(file.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise bad("its header is not safetensors JSON") from None
    if 8 + length + end > size:
        raise bad(f"truncated: {size} bytes of {8 + length + end}")


def check_settings(config) -> PretrainedConfig:
    """Every check of a run's settings that needs no weights (the dataset path, the model's config, the freeze
    depth and --max-length against it); returns the model's config. `core.prepare.check` and `preflight`."""
    from core.sources import check_dataset
    check_dataset(config.dataset)
    model_cfg = model_config(config.model)
    check_freeze_depth(config.freeze_depth, model_cfg, config.model)
    check_max_length(config.max_length, config.model)
    return model_cfg


def preflight(config, session) -> PretrainedConfig:
    """Resolve and check everything a study's runs share, once, before any trial is recorded: the model (config,
    weights, tokenizer, finite weight values, a layer list to freeze) and the dataset (it loads, its columns and
    labels). Loaded through the command's `core.session.Session`, so the first run finds them loaded."""
    model_cfg = check_settings(config)
    tokenizer = session.tokenizer(config.model)
    data = session.text_data(config.dataset, tokenizer, config.text_column, config.label_column, config.max_length)
    find_backbone(session.model(config.model, data.label_names))
    return model_cfg


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


def meta_model(name: str) -> nn.Module:
    """The model's classifier built on the meta device: its shapes, with no memory and no initialisation."""
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(model_config(name))


def check_max_length(max_length: int, name: str) -> None:
    """Refuse a --max-length the model's position table cannot hold: a longer input stopped the run mid-epoch
    with a shape or index error from inside the model."""
    limit = token_limit(name)
    if limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} is beyond {name!r}, whose position table holds {limit} tokens: "
                         f"use --max-length {limit} or less")


@functools.lru_cache(maxsize=16)
def token_limit(name: str) -> int | None:
    """The longest input, in tokens with the special ones, that the model's learned position table holds: its rows,
    less the rows RoBERTa-style models skip (they count positions from their padding index + 1). None where the
    model has no such table (relative or rotary positions) or cannot be built here. Read off the model built on
    the meta device (shapes only), so every family's own names and offsets are the model's, not a list's."""
    try:
        model = meta_model(name)
    except Exception:  # the run itself reports a model it cannot build
        return None
    limits = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module_name.endswith(("position_embeddings", "embed_positions")) and getattr(weight, "ndim", 0) == 2:
            skipped = getattr(module, "padding_idx", None)
            limits.append(weight.shape[0] - (skipped + 1 if isinstance(skipped, int) else 0))
    return min(limits, default=None)


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(os.path.expanduser(name))


def load_pretrained(name: str, label_names: list[str]) -> tuple[nn.Module, list[str]]:
    """The pristine classifier as the checkpoint gives it, and the modules it did not provide (the new head)."""
    return _from_pretrained(os.path.expanduser(name), [str(n) for n in label_names])


def fresh_model(pristine: nn.Module, fresh: list[str]) -> nn.Module:
    """A copy of the pristine model whose new head is drawn from the global RNG (seed it first).

    A grid's later cells copy the pristine model kept in host memory (`core.session`) and draw their head
    again from the RNG state they were called with, so every cell gets exactly the weights a fresh
    `from_pretrained` under the same seed gives (tested), without reading the checkpoint again."""
    rng = torch.random.get_rng_state()
    model = copy.deepcopy(pristine)
    torch.random.set_rng_state(rng)
    with torch.no_grad():
        for module_name in fresh:
            model._init_weights(model.get_submodule(module_name))
    return model


def load_model(name: str, label_names: list[str]) -> nn.Module:
    """A fresh classifier from the pretrained weights (reads the checkpoint; `Session.model` reads it once)."""
    rng = torch.random.get_rng_state()
    pristine, fresh = load_pretrained(name, label_names)
    torch.random.set_rng_state(rng)
    return fresh_model(pristine, fresh)


def _from_pretrained(name: str, labels: list[str]) -> tuple[nn.Module, list[str]]:
    """The model and the names of its modules that the checkpoint did not provide (the new head), in model order."""
    # A fresh classification head is the point of fine-tuning: silence the per-run "newly initialized" report
    # and the weight-loading bar.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True, output_loading_info=True,
            dtype=torch.float32)  # fp32 master weights even from an fp16/bf16 checkpoint; autocast does the rest
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    broken = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
                  None)
    if broken is not None:
        raise UsageError(f"the checkpoint in {name!r} holds NaN or infinite weights ({broken}): it cannot be "
                         "fine-tuned; download or save the model again")
    new = {k[0] if isinstance(k, tuple) else k for k in (*info["missing_keys"], *info["mismatched_keys"])}
    owners = {key.rsplit(".", 1)[0] for key in new}
    return model, [module_name for module_name, _ in model.named_modules() if module_name in owners]


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"

"""Load a classifier: check its folder and config before anything heavy, load the pretrained weights once and
copy them per run with a freshly drawn head. Its backbone and freezing (`core.backbone`) are part of this
module's public names, so callers import the whole model side from here."""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from core.backbone import (SUPPORTED, Backbone, check_freeze_depth, count_parameters, decay_groups, decays,
                           find_backbone, freeze, frozen_modules, num_layers)
from core.errors import UsageError, first_line
from core.hub import check_model_source, is_local, offline_hint
from core.model_files import check_model_files

__all__ = ["Backbone", "check_freeze_depth", "check_max_length", "check_settings", "count_parameters", "decay_groups",
           "decays", "device_name", "find_backbone", "fresh_model", "freeze", "frozen_modules", "load_model",
           "load_pretrained", "load_tokenizer", "meta_model", "model_config", "num_layers", "preflight",
           "token_limit"]


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
    labels). Loaded through the command's `core.session.Session`, so the first run finds them loaded.

    Loading and tokenizing take a core for seconds: as a project worker (`core.lease`), so that another worker's
    timing (a frozen-prefix build, a sitting) waits for it to end instead of counting it as foreign load, and it
    does not start while one runs."""
    model_cfg = check_settings(config)
    with session.timer.working():
        tokenizer = session.tokenizer(config.model)
        data = session.text_data(config.dataset, tokenizer, config.text_column, config.label_column,
                                 config.max_length)
        find_backbone(session.model(config.model, data.label_names))
    return model_cfg


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

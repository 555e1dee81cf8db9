"""The first stage of a run (`core.train.run`): check the config, load data and model, freeze, and cache the frozen
prefix's outputs; what it leaves is a `Prepared`, which the other stages (train epochs, evaluate, record) read.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import set_seed

from core.batches import carve_dev, subsample
from core.config import RunConfig
from core.data import Split, TextData
from core.device import autocast_for, loss_scaler, precision_for, resolve_device
from core.host_memory import reuse_freed_memory
from core.model import Backbone, check_settings, count_parameters, freeze, num_layers
from core.prefix_cache import layer_view, prefix_states
from core.session import Session


def check(config: RunConfig):
    """Every check that needs no weights: run before anything heavy is loaded."""
    return check_settings(config)


@dataclass
class Prepared:
    """Everything a run needs before its first step: data, model (frozen prefix cached or not), device."""
    config: RunConfig
    device: torch.device
    precision: str
    data: TextData
    splits: dict[str, Split]
    labels: dict[str, torch.Tensor]
    model: torch.nn.Module
    backbone: Backbone
    params: list[torch.nn.Parameter]   # the trainable ones
    trainable: int
    total: int
    cached: bool                       # the frozen prefix's outputs are cached: the loop runs layers depth..
    prefix: dict                       # cached, build seconds and reused per split
    sources: dict                      # per split: the tokenized rows, or the cached prefix states
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (`core.device.loss_scaler`; else passes through)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    def autocast(self):
        return autocast_for(self.precision, self.device.type)

    def inputs(self, name: str, indices) -> dict[str, torch.Tensor]:
        if self.cached:
            return self.sources[name].batch(indices, self.device)
        return self.sources[name].batch(indices, self.data.pad_id, self.device)

    def frozen_view(self):
        """With a cached prefix the model runs only the layers after it, on the cached states."""
        if not self.cached:
            return contextlib.nullcontext()
        return layer_view(self.backbone, self.config.freeze_depth, num_layers(self.model.config),
                          skip_embeddings=True)


def prepare(config: RunConfig, session: Session, device, progress: bool, use_prefix_cache: bool) -> Prepared:
    """Check, load data and model, freeze, and (depth > 0) compute the frozen prefix's outputs once."""
    check(config)
    device = resolve_device(device)
    precision = precision_for(config.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        reuse_freed_memory()  # large per-step tensors would otherwise be page-faulted in every step

    tokenizer = session.tokenizer(config.model)
    data = session.text_data(config.dataset, tokenizer, config.text_column, config.label_column, config.max_length)
    rows, dev_rows = split_rows(config, data)
    picked = {"train": rows, "dev": dev_rows}
    splits = {name: split.subset(picked.get(name), progress)  # tokenizes only rows in use
              for name, split in data.splits.items()}
    if len(dev_rows):
        splits["dev"] = data.splits["train"].subset(dev_rows, progress)

    set_seed(config.seed)
    model = session.model(config.model, data.label_names).to(device)
    backbone = freeze(model, config.freeze_depth)
    trainable, total = count_parameters(model)
    prepared = Prepared(config, device, precision, data, splits,
                        {name: torch.as_tensor(split.labels) for name, split in splits.items()}, model, backbone,
                        [p for p in model.parameters() if p.requires_grad], trainable, total,
                        cached=caches_prefix(config, session, data, use_prefix_cache),
                        prefix={}, sources=dict(splits), scaler=loss_scaler(precision, device))
    prepared.prefix = {"cached": prepared.cached, "seconds": {}, "reused": {}}
    if prepared.cached:
        for name, split in splits.items():
            rows_key = hashlib.sha256(picked[name].tobytes()).hexdigest()[:16] if name in picked else "all"
            key = (config.model, data.fingerprint, name, rows_key, precision)

            def build(split=split, key=key):
                return prefix_states(session.prefix_cache, model, backbone, split, key, config.freeze_depth,
                                     data.pad_id, device, prepared.autocast)
            if name == "train" and session.timing_repeats and not session.prefix_cache.has(key, config.freeze_depth):
                # The train split's build is part of what the config costs alone (train_seconds): built with the
                # machine's other project workers paused, like the timed steps, and checked for foreign load.
                (states, reused), _, contention = session.timer.solo(build, device)
                if contention.contended and not states.contended:
                    states.contended = contention.evidence
            else:
                states, reused = build()
            if name == "train" and states.contended:  # built now, earlier (reused), or derived from such a build
                prepared.prefix["contended"] = states.contended
            prepared.sources[name] = states
            prepared.prefix["seconds"][name], prepared.prefix["reused"][name] = round(states.build_seconds, 3), reused
    return prepared


def split_rows(config: RunConfig, data: TextData) -> tuple[np.ndarray, np.ndarray]:
    """(the run's training rows, the dev rows): the dev split comes out of the training rows first (the same rows
    for every run), then the run's seeded subsample."""
    dev_rows, rest = carve_dev(data.splits["train"].labels, config.dev_size)
    return rest[subsample(len(rest), config.max_train_samples, config.seed)], dev_rows


def caches_prefix(config: RunConfig, session: Session, data: TextData, use_prefix_cache: bool = True) -> bool:
    """Whether the run trains on cached frozen-prefix states: it freezes a prefix, frozen dropout does not need the
    frozen layers live, and the model can be cut after its prefix (`Session.prefix_cache_works`)."""
    return (config.freeze_depth > 0 and use_prefix_cache and not config.frozen_dropout
            and session.prefix_cache_works(config.model, data, config.freeze_depth))

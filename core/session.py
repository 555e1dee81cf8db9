"""`Session`: what one process keeps between the runs it trains, in one object the caller creates and passes.

A grid trains many runs in one process, and most of what a run loads is the same for the next one: the
tokenizer, the tokenized data, the pretrained checkpoint, the frozen-prefix states, the steps a schedule
sibling can take over, the metric modules. Keeping them here (not in module globals) makes the dependence
of one run on the runs before it explicit: a fresh `Session()` is a fresh process as far as runs can tell.
"""
from __future__ import annotations

import os

import torch

from core.data import TextData, load_text_data
from core.metrics import load_metric
from core.model import fresh_model, load_pretrained, load_tokenizer
from core.prefix_cache import PrefixCache
from core.shared_steps import SharedSteps
from core.timing import REPEATS, Timer


class Session:
    def __init__(self, cache_device_gb: float = 4.0, cache_host_gb: float = 4.0, timing_repeats: int = REPEATS):
        self.prefix_cache = PrefixCache(cache_device_gb, cache_host_gb)
        self.shared_steps = SharedSteps()
        self.timing_repeats = timing_repeats  # 0: no timing pass, train_seconds is the loop as it ran here
        self._timer: Timer | None = None
        self._tokenizers: dict[str, object] = {}
        self._data: dict[tuple, TextData] = {}
        self._pretrained: dict[tuple, tuple] = {}
        self._metrics: dict[str, object] = {}

    @property
    def timer(self) -> Timer:
        """Step timings per work shape, taken alone on the machine (`core.timing`); made on first use."""
        if self._timer is None:
            self._timer = Timer(repeats=max(1, self.timing_repeats))
        return self._timer

    def tokenizer(self, name: str):
        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(name)
        return self._tokenizers[name]

    def text_data(self, dataset: str, tokenizer, text_column: str | None, label_column: str | None,
                  max_length: int) -> TextData:
        """Loaded once; one dataset at a time (a grid reuses it, a new dataset replaces it). Rows are
        tokenized on demand and kept, so a later run tokenizes only rows no earlier run used."""
        key = (dataset, os.path.abspath(dataset) if os.path.exists(dataset) else "", tokenizer.name_or_path,
               text_column, label_column, max_length)
        if key not in self._data:
            self._data.clear()
            self._data[key] = load_text_data(dataset, tokenizer, text_column, label_column, max_length)
        return self._data[key]

    def model(self, name: str, label_names: list) -> torch.nn.Module:
        """A fresh classifier; the checkpoint is read once, later runs copy it (one model at a time)."""
        key = (os.path.expanduser(name), tuple(str(n) for n in label_names))
        rng = torch.random.get_rng_state()  # loading draws from the RNG; the head must not depend on whether it did
        if key not in self._pretrained:
            self._pretrained.clear()
            self._pretrained[key] = load_pretrained(key[0], list(key[1]))
        torch.random.set_rng_state(rng)
        return fresh_model(*self._pretrained[key])

    def metric(self, name: str):
        """`evaluate`'s metric, or None offline; tried once per session."""
        if name not in self._metrics:
            self._metrics[name] = load_metric(name)
        return self._metrics[name]

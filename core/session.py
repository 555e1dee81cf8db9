"""`Session`: what one process keeps between the runs it trains, in one object the caller creates and passes.

A grid trains many runs in one process, and most of what a run loads is the same for the next one: the
tokenizer, the tokenized data, the pretrained checkpoint, the frozen-prefix states, the steps a schedule
sibling can take over, the metric modules, and what was checked once about the model (whether it can be cut
after its frozen prefix, whether its runs stack). Keeping them here (not in module globals) makes the dependence
of one run on the runs before it explicit: a fresh `Session()` is a fresh process as far as runs can tell.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from core.data import TextData, load_text_data
from core.exact_dropout import exact_dropout_problem
from core.metrics import load_metric
from core.model import find_backbone, fresh_model, load_pretrained, load_tokenizer
from core.prefix_cache import PrefixCache, split_forward_mismatch
from core.shared_steps import SharedSteps
from core.stacked_modules import stack_problem
from core.timer import Timer
from core.timing import REPEATS


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
        self._cuttable: dict[tuple, bool] = {}
        self._stackable: dict[tuple, str | None] = {}

    @property
    def timer(self) -> Timer:
        """Step timings per work shape, taken alone on the machine (`core.timer`); made on first use."""
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
        return fresh_model(*self._pristine(name, label_names))

    def _pristine(self, name: str, label_names: list) -> tuple:
        key = (os.path.expanduser(name), tuple(str(n) for n in label_names))
        rng = torch.random.get_rng_state()  # loading draws from the RNG; the head must not depend on whether it did
        if key not in self._pretrained:
            self._pretrained.clear()
            self._pretrained[key] = load_pretrained(key[0], list(key[1]))
        torch.random.set_rng_state(rng)
        return self._pretrained[key]

    def prefix_cache_works(self, name: str, data: TextData, depth: int) -> bool:
        """Whether the model cut at `depth` computes what the whole model does (`split_forward_mismatch`, on the
        first training rows, once per model, data and depth). When it does not, the note says so once and the
        runs train with the frozen layers run every step instead: slower, never wrong."""
        key = (os.path.expanduser(name), data.fingerprint, depth)
        if key not in self._cuttable:
            pristine, _ = self._pristine(name, data.label_names)
            backbone, reason = find_backbone(pristine), None
            for inputs in probe_batches(data):
                reason = reason or split_forward_mismatch(pristine, backbone, depth, inputs)
            if reason is not None:
                print(f"note: the frozen-prefix cache cannot cut this {pristine.config.model_type!r} model after "
                      f"{depth} layers ({reason}): its runs at depth {depth} run the frozen layers every step "
                      "instead (slower, same arithmetic)", file=sys.stderr)
            self._cuttable[key] = reason is None
        return self._cuttable[key]

    def metric(self, name: str):
        """`evaluate`'s metric, or None offline; tried once per session."""
        if name not in self._metrics:
            self._metrics[name] = load_metric(name)
        return self._metrics[name]

    def stack_problem(self, name: str, data: TextData, depth: int, exact_dropout: bool = False,
                      frozen_dropout: bool = False) -> str | None:
        """Why runs of this model at `depth` cannot train as one stacked group (`core.stacked_modules.stack_problem`,
        its forward checked on a few training rows; `exact_dropout`: and each run's dropout masks drawn as alone,
        `core.exact_dropout.exact_dropout_problem`, with the frozen layers' dropout on where `frozen_dropout`), or
        None; once per model, data, depth and kind of check."""
        kind = (exact_dropout, exact_dropout and frozen_dropout)
        key = (os.path.expanduser(name), data.fingerprint, depth, kind)
        if key not in self._stackable and any(k[:2] == key[:2] and k[3] == kind and k[2] < depth
                                              and problem is None for k, problem in self._stackable.items()):
            # Runs that stack at a shallower depth stack here too: they train a subset of those modules, and the
            # modules frozen in between are shared, computing one function for every run's rows.
            self._stackable[key] = None
        if key not in self._stackable:
            model, batches = self._pristine(name, data.label_names)[0], probe_batches(data)
            problem = stack_problem(model, depth, batches, data.pad_id)
            if problem is None and exact_dropout:
                problem = exact_dropout_problem(model, depth, batches, data.pad_id, frozen_dropout)
            self._stackable[key] = problem
        return self._stackable[key]


def probe_batches(data: TextData) -> list[dict[str, torch.Tensor]]:
    """A few training rows to check a model on, as two batches (on the CPU) of padded lengths of both parities: a
    model can treat an odd length apart (one that pools pairs of tokens), and one that treats a batch by its padded
    length (FNet's Fourier transform over the tokens, a dropout over attention probabilities) shows only on two
    lengths. Where the first 64 rows have one parity (all at --max-length, say), the second batch is cut a token
    shorter."""
    train = data.splits["train"]
    head = train.subset(np.arange(min(64, len(train))), progress=False)
    first = head.subset(np.arange(min(4, len(head))))
    padded = int(first.lengths.max())
    other = [i for i in range(len(head)) if head.lengths[i] % 2 != padded % 2][:1] or [len(head) - 1]
    batches = [rows.batch(np.arange(len(rows)), data.pad_id, "cpu") for rows in (first, head.subset(np.asarray(other)))]
    length = batches[1]["attention_mask"].shape[1]
    if length % 2 == padded % 2 and length > 1:
        batches[1] = {k: v[:, :length - 1] if v.dim() >= 2 and v.shape[1] == length else v
                      for k, v in batches[1].items()}
    return batches

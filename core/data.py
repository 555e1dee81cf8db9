"""Load a text-classification dataset (its rows: `core.sources`), find its columns, encode labels, tokenize once per
process."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from core.columns import (check_label_column, check_text_column, class_values, detect_columns,
                          drop_unlabeled_rows, drop_unlabeled_test)
from core.errors import UsageError
from core.files import quiet_datasets
from core.sources import load_raw


@dataclass
class Split:
    """Tokenized rows of one split: unpadded token ids, labels and lengths."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        pick = [int(i) for i in indices]
        return Split([self.input_ids[i] for i in pick],
                      None if self.token_type_ids is None else [self.token_type_ids[i] for i in pick],
                      self.labels[indices], self.lengths[indices])

    def batch(self, indices, pad_id: int, device) -> dict[str, torch.Tensor]:
        rows = [torch.tensor(self.input_ids[i]) for i in indices]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
        lengths = torch.as_tensor(self.lengths[indices])
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        out = {"input_ids": input_ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            types = [torch.tensor(self.token_type_ids[i]) for i in indices]
            out["token_type_ids"] = torch.nn.utils.rnn.pad_sequence(types, batch_first=True)
        return {k: to_device(v, device) for k, v in out.items()}


class TextSplit:
    """The texts and encoded labels of one split, tokenized row by row as runs ask for rows, once per process.

    A 2,000-sentence run on the 67,349-sentence SST-2 train file tokenizes its 2,000 sentences, not the file;
    a later run of the same process tokenizes only the rows no earlier run used."""

    CHUNK = 2048  # rows per tokenizer call: the fast tokenizer's batch parallelism, and progress-bar steps

    def __init__(self, name: str, texts: list[list[str]], labels: np.ndarray, tokenize):
        self.name, self.texts, self.labels, self._tokenize = name, texts, labels, tokenize
        self._ids: list[list[int] | None] = [None] * len(labels)
        self._types: list[list[int] | None] | None = None
        self._all: Split | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | None = None, progress: bool = True) -> Split:
        """The tokenized rows `indices` (all rows when None), in that order."""
        if indices is None:
            if self._all is None:
                self._all = self.subset(np.arange(len(self)), progress)
            return self._all
        indices = np.asarray(indices, dtype=np.int64)
        missing = [int(i) for i in np.unique(indices) if self._ids[i] is None]
        with tqdm(total=len(missing), unit="row", desc=f"tokenize {self.name}", leave=False,
                  disable=not progress or len(missing) < 8 * self.CHUNK) as bar:
            for start in range(0, len(missing), self.CHUNK):
                rows = missing[start:start + self.CHUNK]
                encoded = self._tokenize([[column[i] for i in rows] for column in self.texts])
                types = encoded.get("token_type_ids")
                if types is not None and self._types is None:
                    self._types = [None] * len(self)
                for j, i in enumerate(rows):
                    self._ids[i] = encoded["input_ids"][j]
                    if types is not None:
                        self._types[i] = types[j]
                bar.update(len(rows))
        input_ids = [self._ids[i] for i in indices]
        types = None if self._types is None else [self._types[i] for i in indices]
        return Split(input_ids, types, self.labels[indices], np.fromiter(map(len, input_ids), np.int64, len(indices)))

    # The whole split, tokenized (validation and test are used whole).
    @property
    def input_ids(self) -> list[list[int]]:
        return self.subset().input_ids

    @property
    def token_type_ids(self) -> list[list[int]] | None:
        return self.subset().token_type_ids

    @property
    def lengths(self) -> np.ndarray:
        return self.subset().lengths

    def batch(self, indices, pad_id: int, device) -> dict[str, torch.Tensor]:
        return self.subset().batch(indices, pad_id, device)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Copy a host tensor to `device` without stalling the GPU: a copy from ordinary (pageable) host memory
    waits for every queued kernel first, one from pinned memory is queued behind them, so the host can launch
    the next step while this one runs."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class TextData:
    splits: dict[str, TextSplit]      # train, validation and (when labeled) test, tokenized on demand
    label_names: list[str]
    text_columns: tuple[str, ...]
    label_column: str
    fingerprint: str                  # columns, label names, each split's rows (content_hash), tokenizer, max_length
    pad_id: int

    @property
    def num_labels(self) -> int:
        return len(self.label_names)



def load_text_data(dataset: str, tokenizer, text_column: str | None = None, label_column: str | None = None,
                   max_length: int = 128) -> TextData:
    """Load, detect columns and encode labels as 0..n-1; rows are tokenized on demand (`core.session` keeps it)."""
    return _build(dataset, tokenizer, text_column, label_column, max_length)


def _build(dataset, tokenizer, text_column, label_column, max_length) -> TextData:
    raw = load_raw(dataset)  # a Hub download keeps its progress bars; the work on the rows read draws none
    with quiet_datasets():
        return _encode(raw, tokenizer, text_column, label_column, max_length)


def _encode(raw: dict[str, datasets.Dataset], tokenizer, text_column, label_column, max_length) -> TextData:
    texts, label = detect_columns(raw["train"], text_column, label_column)
    for name in ("validation", "test"):
        if name in raw:
            missing = [c for c in texts if c not in raw[name].column_names]
            if missing:
                raise UsageError(f"the {name} split has no column {missing[0]!r}: columns are "
                                 f"{', '.join(raw[name].column_names)}")
    for column in texts:
        check_text_column(raw["train"], column)
    check_label_column(raw["train"], label)
    drop_unlabeled_test(raw, label)
    if label not in raw["validation"].column_names:
        raise UsageError(f"the validation split has no label column {label!r}: columns are "
                         f"{', '.join(raw['validation'].column_names)}")
    drop_unlabeled_rows(raw, label)
    for name, split in raw.items():
        labels = split[label][:]  # a list, read at once: `None in` a lazy column took 3.6 s on SST-2's train split
        if None in labels:
            row = labels.index(None)
            raise UsageError(f"row {row + 1} of the {name} split ({str(split[row][texts[0]])[:40]!r}) has no "
                             f"{label!r} value, and {labels.count(None)} row(s) in all: a ragged file? every row "
                             "needs a text and a label")
    values = class_values(raw, label)
    if len(values) < 2:
        raise UsageError(f"label column {label!r} holds {len(values)} distinct value(s): a classifier needs at "
                         "least 2")
    fractional = [v for v in values if isinstance(v, float) and not v.is_integer()]
    if fractional:
        raise UsageError(f"label column {label!r} holds fractional numbers ({', '.join(map(str, fractional[:3]))}, "
                         "…): a regression score, such as STS-B's, is not a class; this tool trains classifiers")
    if len(values) > 100 and len(values) > len(raw["train"]) / 2:
        raise UsageError(f"label column {label!r} holds {len(values)} distinct values in {len(raw['train'])} "
                         "training rows, fewer than 2 rows a class: an id or a score, not a class? pass "
                         "--label-column")
    feature = raw["train"].features[label]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else [str(v) for v in values]
    index = {v: i for i, v in enumerate(values)}

    def tokenize(columns: list[list[str]]):
        return tokenizer(*columns, truncation=True, max_length=max_length)

    splits = {}
    for name, split in raw.items():
        # Plain Python lists: datasets returns lazy columns whose per-row indexing is slow.
        columns = split.select_columns(list(dict.fromkeys([*texts, label]))).to_dict()
        own = split.features[label]
        if isinstance(feature, datasets.ClassLabel) and own != feature:
            # A split encoded on its own numbers its classes its own way, one written by hand names them: match
            # them by name.
            named = own.int2str(columns[label]) if isinstance(own, datasets.ClassLabel) else columns[label]
            columns[label] = [feature.names.index(n) if isinstance(n, str) and n in feature.names else n
                              for n in named]
        labels = np.asarray([index.get(v, -1) for v in columns[label]], dtype=np.int64)
        if (labels < 0).any():
            bad = columns[label][int(np.argmax(labels < 0))]
            if set(columns[label]) == {-1}:
                raise UsageError(f"the {name} split has no labels (every row -1, GLUE's mark of a hidden label): "
                                 f"{name} is scored, so it needs them")
            raise UsageError(f"the {name} split has label {bad!r}, which the train split never uses")
        texts_of = [[str(t) if t is not None else "" for t in columns[c]] for c in texts]
        splits[name] = TextSplit(name, texts_of, labels, tokenize)
    # The rows themselves, not where they came from: two spellings of one dataset (a folder and its copy, `sst2`
    # and `../shared/data/sst2`) share their timings and caches.
    source = hashlib.sha256(repr((texts, label, [str(n) for n in names], tokenizer.name_or_path, max_length,
                                  [(n, content_hash(s.texts, s.labels)) for n, s in splits.items()])).encode())
    return TextData(splits, names, texts, label, source.hexdigest()[:16], tokenizer.pad_token_id or 0)


def content_hash(texts: list[list[str]], labels: np.ndarray) -> str:
    """sha256 of a split's texts (each column: every text's length, then the texts end to end) and encoded labels,
    in row order: what was loaded, not how (`datasets`' own fingerprint of a file changes with its mtime and
    across versions). SST-2's 67,349 training rows hash in about 30 ms (2 busy CPU cores)."""
    digest = hashlib.sha256()
    for column in texts:
        digest.update(np.fromiter(map(len, column), np.int64, len(column)).astype("<i8").tobytes())
        digest.update("".join(column).encode("utf-8", "surrogatepass"))
    digest.update(labels.astype("<i8").tobytes())
    return digest.hexdigest()[:16]

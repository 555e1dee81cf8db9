"""Load a text-classification dataset, find its columns, encode labels, tokenize once per process."""
from __future__ import annotations

import functools
import hashlib
import lzma
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from core.errors import UsageError, first_line

TEXT_COLUMNS = ("sentence", "text", "content", "review", "document", "tweet", "utterance", "body", "question")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("text_a", "text_b"))
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target", "category")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
CONFIG_DATASETS = ("glue", "super_glue")  # legacy ids whose second part is a config: glue/sst2
# SST-2 ships inside the package (core/sst2/README.md): `--dataset sst2` names it, and `glue/sst2` falls back to it
# when the Hub cannot be reached. Same rows in the Hub's order, checked against these digests on loading.
EMBEDDED_SST2 = Path(__file__).resolve().parent / "sst2"
EMBEDDED_NAMES = ("sst2", "sst-2")
HUB_SST2 = ("glue/sst2", "glue:sst2", "nyu-mll/glue:sst2", "nyu-mll/glue/sst2")
EMBEDDED_SHA256 = {"train": "c75796b01672b41c38cd4b35f4ff1ade88ca79b7577f3926e01ff69739d85ec9",
                   "validation": "f7271f7a919ea884ca8563e13ed03028aa44296d1f738c003af3142b9a2188f8"}
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


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
    fingerprint: str                  # identifies source + columns + tokenizer + max_length
    pad_id: int

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def hub_offline() -> bool:
    """True when the Hugging Face Hub is out of reach: an offline variable is set, or a 1.5-second connection probe
    fails. Asked before any Hub download, so an offline machine fails (or falls back) at once instead of after
    the libraries' own retries."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES):
        return True
    return not _hub_answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    answered = threading.Event()

    def probe() -> None:  # in a thread: a DNS look-up ignores socket timeouts
        try:
            socket.create_connection((name, int(port or 443)), timeout=1.0).close()
            answered.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(1.5)


def load_embedded_sst2() -> dict[str, datasets.Dataset]:
    """The packaged SST-2: the columns and label names of the Hub's `glue/sst2`, its rows in its order."""
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    splits = {}
    for split, digest in EMBEDDED_SHA256.items():
        raw = lzma.decompress((EMBEDDED_SST2 / f"{split}.tsv.xz").read_bytes())
        if hashlib.sha256(raw).hexdigest() != digest:
            raise UsageError(f"the embedded SST-2 {split} file in {str(EMBEDDED_SST2)!r} is damaged (its sha256 "
                             "differs from core/sst2/README.md): reinstall the package")
        rows = [line.rsplit("\t", 1) for line in raw.decode("utf-8").splitlines()[1:]]
        splits[split] = datasets.Dataset.from_dict(
            {"sentence": [r[0] for r in rows], "label": [int(r[1]) for r in rows], "idx": list(range(len(rows)))},
            features=features)
    return splits


def check_dataset(dataset: str) -> None:
    """Fail fast, before any model is loaded, on a local dataset path that cannot work."""
    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_dir() and _split_file(path, "train") is None:
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise UsageError(f"dataset folder {dataset!r} has no train file (train.tsv, .csv, .json, .jsonl or "
                             f".parquet); it holds {found}")
        if path.is_file() and path.suffix not in BUILDERS:
            raise UsageError(f"dataset file {dataset!r} has an unsupported type: use {', '.join(BUILDERS)}")
    elif _looks_local(dataset):
        raise UsageError(f"dataset folder {dataset!r} does not exist: give a local folder with train/validation "
                         "files or a Hub id such as glue/sst2")


def _looks_local(name: str) -> bool:
    """A path the user meant as local: explicit, with a data suffix, not shaped like a Hub id, or under an
    existing local folder (data/mydata when ./data exists)."""
    return name.startswith((".", "/", "~")) or Path(name).suffix in BUILDERS or not HUB_ID.match(name) \
        or ("/" in name and Path(name.split("/")[0]).is_dir())


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_NAMES[split]:
        for ext in BUILDERS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    return None


def _load_file(path: Path) -> datasets.Dataset:
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    # A local file reads in moments; its progress bar would only put a second line before a one-line error
    # (a missing column, say) on stderr.
    # datasets also logs each parse error before raising it: that log line would be a second line.
    quiet, verbosity = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    if quiet:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        loaded = datasets.load_dataset(BUILDERS[path.suffix], data_files={"data": str(path)}, split="data", **kwargs)
        if "__index_level_0__" in loaded.column_names:  # pandas made the extra first field of every row an index
            header = ", ".join(c for c in loaded.column_names if c != "__index_level_0__")
            raise UsageError(f"could not read {str(path)!r}: its rows have more fields than its header ({header})")
        return loaded
    except UsageError:
        raise
    except Exception as error:  # pandas/arrow parse errors: show one line, the parser's own reason
        while error.__cause__ is not None and "error occurred while generating" in str(error):
            error = error.__cause__
        raise UsageError(f"could not read {str(path)!r}: {first_line(error, 300)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if quiet:
            datasets.enable_progress_bars()


# A memo of a pure read, like core.identity's hashes: keyed by the name and every file's size and mtime, it holds
# rows, never run state, so no run depends on the runs before it (a changed file is a new key).
_RAW: dict[tuple, dict[str, datasets.Dataset]] = {}


def _raw_key(dataset: str) -> tuple:
    path = Path(dataset).expanduser()
    files = [path] if path.is_file() else [f for s in SPLIT_NAMES if (f := _split_file(path, s)) is not None] \
        if path.is_dir() else []
    return (dataset, *((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def load_raw(dataset: str) -> dict[str, datasets.Dataset]:
    """Return {'train', 'validation'[, 'test']} as plain `datasets.Dataset`s.

    Read once per process: the run id's row fingerprint (`core.identity`) and the session's training data ask for
    the same rows, and a changed local file (size or mtime) is read again."""
    check_dataset(dataset)
    key = _raw_key(dataset)
    if key not in _RAW:
        while len(_RAW) >= 2:  # a study uses one dataset; do not pile up others
            del _RAW[next(iter(_RAW))]
        _RAW[key] = _read_raw(dataset)
    return dict(_RAW[key])  # a copy of the dict: callers drop splits from it


def clear_raw_cache() -> None:
    _RAW.clear()


def _read_raw(dataset: str) -> dict[str, datasets.Dataset]:
    path = Path(dataset).expanduser()
    if path.is_file():
        splits = {"train": _load_file(path)}
    elif path.is_dir():
        splits = {s: _load_file(f) for s in SPLIT_NAMES if (f := _split_file(path, s)) is not None}
    elif dataset.lower() in EMBEDDED_NAMES:
        splits = load_embedded_sst2()
    elif dataset in HUB_SST2 and hub_offline():
        print(f"note: the Hugging Face Hub cannot be reached: {dataset} comes from the embedded copy (the same "
              "rows; core/sst2/README.md)", file=sys.stderr)
        splits = load_embedded_sst2()
    else:
        splits = _load_hub(dataset)
    if "train" not in splits:
        raise UsageError(f"dataset {dataset!r} has no train split")
    if len(splits["train"]) == 0:
        raise UsageError(f"the train split of {dataset!r} is empty")
    if "validation" not in splits:
        # A fixed seed, not the run seed: every run of a study must see the same validation set.
        parts = splits["train"].train_test_split(test_size=0.1, seed=0)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    return splits


def _load_hub(dataset: str) -> dict[str, datasets.Dataset]:
    name, _, config = dataset.partition(":")
    if not config and name.split("/")[0] in CONFIG_DATASETS and "/" in name:
        name, config = name.split("/", 1)
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as error:
        if dataset in HUB_SST2:
            print(f"note: {dataset} could not be loaded from the Hugging Face Hub ({first_line(error)}): it comes "
                  "from the embedded copy (the same rows; core/sst2/README.md)", file=sys.stderr)
            return load_embedded_sst2()
        reason = first_line(error)
        offline = " (the Hub cannot be reached)" if hub_offline() else ""
        raise UsageError(f"could not load dataset {dataset!r} from the Hugging Face Hub{offline} ({reason}): pass a "
                         "local folder with train/validation files, or --dataset sst2 for the embedded SST-2") \
            from None
    return {s: loaded[alias] for s, aliases in SPLIT_NAMES.items() for alias in aliases if alias in loaded}


def detect_columns(train: datasets.Dataset, text_column: str | None,
                   label_column: str | None) -> tuple[tuple[str, ...], str]:
    columns = list(train.column_names)
    listed = ", ".join(columns)
    if text_column:
        texts = tuple(c.strip() for c in text_column.split(","))
        for c in texts:
            if c not in columns:
                raise UsageError(f"text column {c!r} is not in the train split: columns are {listed}")
    else:
        texts = next((pair for pair in PAIR_COLUMNS if all(c in columns for c in pair)), None) or next(
            ((c,) for c in TEXT_COLUMNS if c in columns), None)
        if texts is None:
            raise UsageError(f"no text column found in the train split (columns: {listed}): pass --text-column")
    if label_column:
        if label_column not in columns:
            raise UsageError(f"label column {label_column!r} is not in the train split: columns are {listed}")
        label = label_column
    else:
        label = next((c for c in LABEL_COLUMNS if c in columns), None)
        if label is None:
            raise UsageError(f"no label column found in the train split (columns: {listed}): pass --label-column")
    return texts, label


def _label_names(splits: dict[str, datasets.Dataset], label: str) -> list:
    feature = splits["train"].features[label]
    if isinstance(feature, datasets.ClassLabel):
        return list(range(feature.num_classes))
    # The classes are what the train split uses; a label seen only in validation or test is an error later
    # (encode), not a silent extra class.
    values = {v for v in splits["train"].unique(label) if v is not None}
    return sorted(values, key=lambda v: (str(type(v)), v))


def _unlabeled(split: datasets.Dataset, label: str) -> bool:
    return set(split.unique(label)) <= {-1, None}  # GLUE marks hidden test labels with -1


def load_text_data(dataset: str, tokenizer, text_column: str | None = None, label_column: str | None = None,
                   max_length: int = 128) -> TextData:
    """Load, detect columns and encode labels as 0..n-1; rows are tokenized on demand (`core.session` keeps it)."""
    return _build(dataset, tokenizer, text_column, label_column, max_length)


def _build(dataset, tokenizer, text_column, label_column, max_length) -> TextData:
    raw = load_raw(dataset)
    texts, label = detect_columns(raw["train"], text_column, label_column)
    for name in ("validation", "test"):
        if name in raw:
            missing = [c for c in texts if c not in raw[name].column_names]
            if missing:
                raise UsageError(f"the {name} split has no column {missing[0]!r}: columns are "
                                 f"{', '.join(raw[name].column_names)}")
    if "test" in raw and (label not in raw["test"].column_names or _unlabeled(raw["test"], label)):
        del raw["test"]  # an unlabeled test split cannot be scored
    if label not in raw["validation"].column_names:
        raise UsageError(f"the validation split has no label column {label!r}: columns are "
                         f"{', '.join(raw['validation'].column_names)}")
    for name, split in raw.items():
        labels = split[label]
        if None in labels:
            row = labels.index(None)
            raise UsageError(f"row {row + 1} of the {name} split ({str(split[row][texts[0]])[:40]!r}) has no "
                             f"{label!r} value, and {labels.count(None)} row(s) in all: a ragged file? every row "
                             "needs a text and a label")
    values = _label_names(raw, label)
    if len(values) < 2:
        raise UsageError(f"label column {label!r} holds {len(values)} distinct value(s): a classifier needs at "
                         "least 2")
    feature = raw["train"].features[label]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else [str(v) for v in values]
    index = {v: i for i, v in enumerate(values)}

    def tokenize(columns: list[list[str]]):
        return tokenizer(*columns, truncation=True, max_length=max_length)

    splits = {}
    for name, split in raw.items():
        # Plain Python lists: datasets returns lazy columns whose per-row indexing is slow.
        columns = split.select_columns(list(dict.fromkeys([*texts, label]))).to_dict()
        labels = np.asarray([index.get(v, -1) for v in columns[label]], dtype=np.int64)
        if (labels < 0).any():
            bad = columns[label][int(np.argmax(labels < 0))]
            raise UsageError(f"the {name} split has label {bad!r}, which the train split never uses")
        texts_of = [[str(t) if t is not None else "" for t in columns[c]] for c in texts]
        splits[name] = TextSplit(name, texts_of, labels, tokenize)
    source = hashlib.sha256(repr((dataset, texts, label, tokenizer.name_or_path, max_length,
                                  [(n, len(s), getattr(raw[n], "_fingerprint", None)) for n, s in splits.items()])
                                 ).encode())
    return TextData(splits, names, texts, label, source.hexdigest()[:16], tokenizer.pad_token_id or 0)


DEV_SEED = 0          # fixed, not the run seed: every run of a study must be chosen on the same dev rows
DEV_FRACTION, DEV_MAX_ROWS = 0.1, 1000  # the default dev split: 10 % of the training rows, at most 1,000


def dev_rows_count(n: int, dev_size: float | None) -> int:
    """Rows the dev split takes from `n` training rows: a count, a fraction, 0, or (None) the default."""
    if dev_size is None:
        return min(round(DEV_FRACTION * n), DEV_MAX_ROWS)
    size = round(dev_size * n) if isinstance(dev_size, float) else int(dev_size)
    if size >= n:
        raise UsageError(f"--dev-size {dev_size} leaves no training rows: the train split has {n:,}; use fewer rows "
                         "or a smaller fraction")
    return size


def carve_dev(labels: np.ndarray, dev_size: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(dev rows, the remaining training rows), both sorted: a stratified sample with a fixed seed.

    Each label gets its share of the dev rows (largest remainders round), so the dev split has the training
    data's label balance; the run's own subsample (`max_train_samples`) is then drawn from the remaining rows."""
    n = len(labels)
    size = dev_rows_count(n, dev_size)
    if size == 0:
        return np.arange(0), np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(-(exact - shares), kind="stable")[:size - shares.sum()]] += 1
    rng = np.random.default_rng(DEV_SEED)
    dev = np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:share]
                          for label, share in zip(classes, shares)])
    keep = np.ones(n, dtype=bool)
    keep[dev] = False
    return np.sort(dev), np.flatnonzero(keep)


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Seeded subsample, the same rows `Dataset.shuffle(seed).select(range(limit))` would pick."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:limit]


def eval_tokens(device) -> int:
    """Tokens per inference batch: large on a GPU, cache-friendly on a CPU."""
    return 32768 if torch.device(device).type == "cuda" else 4096


def sorted_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Inference batches of similar length, longest first, each holding about `tokens_per_batch` tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, tokens_per_batch // max(1, int(lengths[order[start]])))
        batches.append(order[start:start + size])
        start += size
    return batches


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Seeded training batches of similar length: shuffle, sort within chunks of 50 batches, shuffle batches.

    Little padding (so little wasted compute) while every epoch still sees a fresh random order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]

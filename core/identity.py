"""Fingerprints of what determines a run's result: the model's files and the data's rows, not their names.

`./m`, `/abs/m` and `m/` are one model; a data folder copied elsewhere is the same data. A run id built from
these fingerprints (`RunConfig.run_id`) is the same wherever the run is spelled, started or stored.
Hashes are cached per process by (path, size, mtime) of every file read, so asking again costs a few stats.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# The files of a model folder that change what a run computes: architecture, weights, tokenizer.
MODEL_FILES = ("config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_FILE_HASHES: dict[tuple, str] = {}
_DATA_HASHES: dict[tuple, str] = {}
_NUMBERED_APART: set[str] = set()   # fingerprints of data whose splits number their classes each their own way


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _model_folder(name: str) -> Path | None:
    """The local folder holding the model: a path, or a Hub id already in the local cache; None otherwise."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    try:  # offline: only what is cached; a Hub id never downloaded keeps its name as its identity
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def model_fingerprint(name: str) -> str:
    """'model:<hash>' of the model's config, weights and tokenizer files; the name itself if none is found."""
    folder = _model_folder(name)
    files = [] if folder is None else sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name in MODEL_FILES or (
            p.name.endswith(WEIGHT_SUFFIXES) and p.name != "training_args.bin")))
    if not any(p.name == "config.json" for p in files):
        return name
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_file_hash(path)}\n".encode())
    return f"model:{digest.hexdigest()[:32]}"


def data_fingerprint(dataset: str, text_column: str | None = None, label_column: str | None = None) -> str:
    """'data:<hash>' of every split's texts and labels in order, after core.data's column detection, so the same
    rows give the same fingerprint from any folder or spelling; the name itself where the rows cannot be read
    here (a Hub id offline, a missing or broken file: the run reports that). The files it keys its memo on are
    the ones `load_raw` reads: the packaged SST-2 for `sst2` (and `glue/sst2` offline), so the two are one run;
    online, the Hub's copy keeps its name (its rows are not read here)."""
    from core.sources import source_files
    files = source_files(dataset)
    if not files:
        return dataset
    key = (tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files), text_column, label_column)
    if key not in _DATA_HASHES:
        try:
            _DATA_HASHES[key] = _rows_hash(dataset, text_column, label_column)
        except Exception:
            return dataset
    return _DATA_HASHES[key]


def same_data(first: tuple, second: tuple) -> bool | None:
    """Whether two (dataset, text_column, label_column) name the same rows, as the run id compares them (another
    spelling, folder or copy is the same data); None where only one side can be read here (a folder since moved or
    deleted, a Hub id online), which cannot be told apart."""
    if first == second:
        return True
    one, other = data_fingerprint(*first), data_fingerprint(*second)
    if (one == first[0]) != (other == second[0]):
        return None
    return one == other


def _rows_hash(dataset: str, text_column: str | None, label_column: str | None) -> str:
    from core.columns import detect_columns, drop_unlabeled_test
    from core.sources import load_raw
    raw = load_raw(dataset)
    texts, label = detect_columns(raw["train"], text_column, label_column)
    drop_unlabeled_test(raw, label)
    digest = hashlib.sha256()
    for name in sorted(raw):
        columns = raw[name].select_columns(list(dict.fromkeys([*texts, label]))).to_dict()
        rows = [[columns[c] for c in texts], columns[label]]
        digest.update(f"{name}\0{json.dumps(rows, default=str, separators=(',', ':'))}\n".encode())
    classes = _class_numberings(raw, label)
    if classes:
        digest.update(f"classes\0{json.dumps(classes, default=str)}\n".encode())
    fingerprint = f"data:{digest.hexdigest()[:32]}"
    if classes:
        _NUMBERED_APART.add(fingerprint)
    return fingerprint


def numbered_apart(dataset: str, text_column: str | None = None, label_column: str | None = None) -> bool:
    """Whether the data's splits number their classes each their own way (`_class_numberings`): such data's runs
    stored under ids of its path (`RunConfig.legacy_run_id`) were scored by train's numbering, and are not reused."""
    return data_fingerprint(dataset, text_column, label_column) in _NUMBERED_APART


def _class_numberings(raw: dict, label: str) -> dict[str, list] | None:
    """Each split's class names, where the splits number their classes each their own way (ClassLabel names in
    another order, or fewer): the same numbers then mean other classes, and before core.data matched them by name
    they were scored as train's. Only such data hashes its names, so its runs stored under the old numbering get
    new ids and train again; data whose splits agree (SST-2) keeps its run ids."""
    import datasets
    features = {name: split.features.get(label) for name, split in raw.items()}
    if not isinstance(features["train"], datasets.ClassLabel) or all(f == features["train"]
                                                                     for f in features.values()):
        return None
    return {name: getattr(feature, "names", None) for name, feature in sorted(features.items())}


def clear_caches() -> None:
    from core.sources import clear_raw_cache
    _FILE_HASHES.clear()
    _DATA_HASHES.clear()
    _NUMBERED_APART.clear()
    clear_raw_cache()


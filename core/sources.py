"""Where a dataset's rows come from: local files (through `datasets`), the embedded SST-2, or the Hub.

`load_raw` returns the plain splits, read once per process; `core.data` finds their columns and tokenizes them.
"""
from __future__ import annotations

import hashlib
import lzma
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import UsageError, first_line
from core.files import BUILDERS, SHARD, load_file, shards
from core.hub import hub_offline

if TYPE_CHECKING:
    import datasets

SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
CONFIG_DATASETS = ("glue", "super_glue")  # legacy ids whose second part is a config: glue/sst2
# SST-2 ships inside the package (core/sst2/README.md): `--dataset sst2` names it, and `glue/sst2` falls back to it
# when the Hub cannot be reached. Same rows in the Hub's order, checked against these digests on loading.
EMBEDDED_SST2 = Path(__file__).resolve().parent / "sst2"
EMBEDDED_NAMES = ("sst2", "sst-2")
HUB_SST2 = ("glue/sst2", "glue:sst2", "nyu-mll/glue:sst2", "nyu-mll/glue/sst2")
EMBEDDED_SHA256 = {"train": "c75796b01672b41c38cd4b35f4ff1ade88ca79b7577f3926e01ff69739d85ec9",
                   "validation": "f7271f7a919ea884ca8563e13ed03028aa44296d1f738c003af3142b9a2188f8"}


def load_embedded_sst2() -> dict[str, datasets.Dataset]:
    """The packaged SST-2: the columns and label names of the Hub's `glue/sst2`, its rows in its order."""
    import datasets
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
        if path.is_dir() and "train" not in split_files(path):
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


def pick_split(names, split: str) -> str | None:
    """Which of `names` (a dataset's split names, or a folder's file stems) holds `split`: an exact alias
    (`validation`, `dev`, ...), else the first in sorted order of the aliases with a suffix (`validation_matched`
    of MNLI, `dev_matched` of GLUE's own files); None where there is none."""
    names = list(names)
    exact = next((alias for alias in SPLIT_NAMES[split] if alias in names), None)
    if exact is not None:
        return exact
    suffixed = sorted(name for name in names for alias in SPLIT_NAMES[split] if name.startswith(f"{alias}_"))
    return suffixed[0] if suffixed else None


def _split_note(dataset: str, split: str, picked: str, names) -> None:
    """One line where a split was found by its suffixed name: the user should know which of several it is."""
    if picked in SPLIT_NAMES[split]:
        return
    others = sorted(n for n in names if n != picked and any(n.startswith(f"{a}_") for a in SPLIT_NAMES[split]))
    also = f" ({', '.join(others)} not used)" if others else ""
    print(f"note: {dataset} has no plain {split} split: {picked} is its {split} split{also}", file=sys.stderr)


def _data_files(folder: Path) -> dict[str, Path]:
    """A folder's data files by stem (`dev_matched` → dev_matched.tsv; a split in shards by its first shard,
    `train` → train-00000-of-00002.parquet); a stem in two formats keeps the first of BUILDERS' order."""
    files: dict[str, Path] = {}
    for ext in BUILDERS:
        for file in sorted(folder.glob(f"*{ext}")):
            if file.is_file():
                stem = file.name[:-len(ext)]
                files.setdefault(shard["stem"] if (shard := SHARD.match(stem)) else stem, file)
    return files


def split_files(folder: Path) -> dict[str, Path]:
    """The file of each split a local dataset folder holds: train, validation, test (those found)."""
    files = _data_files(folder)
    return {split: files[stem] for split in SPLIT_NAMES if (stem := pick_split(files, split)) is not None}


def local_files(dataset: str) -> dict[str, Path] | None:
    """The file of each split of a local dataset, as `dataset` spells it: one file is the train split (10 % of
    it is held out), a folder holds its split files; None where `dataset` is not a local path. The only place
    that works this out: `load_raw` reads these files and keys its memo on them, and `source_files` (the run id's
    row fingerprint, `core.identity`) names them."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return {"train": path}
    if path.is_dir():
        return split_files(path)
    return None


def source_files(dataset: str) -> list[Path] | None:
    """The files `load_raw(dataset)` reads its rows from, resolved; None where they come from the Hub."""
    if (files := local_files(dataset)) is not None:
        return [part.resolve() for file in files.values() for part in shards(file)]
    if dataset.lower() in EMBEDDED_NAMES or (dataset in HUB_SST2 and hub_offline()):
        return sorted(EMBEDDED_SST2.glob("*.tsv.xz"))
    return None


# A memo of a pure read, like core.identity's hashes: keyed by the name and every file's size and mtime, it holds
# rows, never run state, so no run depends on the runs before it (a changed file is a new key).
_RAW: dict[tuple, dict[str, datasets.Dataset]] = {}


def _raw_key(dataset: str) -> tuple:
    files = [part for file in (local_files(dataset) or {}).values() for part in shards(file)]
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
    if (files := local_files(dataset)) is not None:
        splits = {split: load_file(file) for split, file in files.items()}
        if files and Path(dataset).expanduser().is_dir():
            stems = {file: stem for stem, file in _data_files(next(iter(files.values())).parent).items()}
            for split, file in files.items():
                _split_note(dataset, split, stems[file], stems.values())
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
        if files and Path(dataset).expanduser().is_dir():  # a file not read may be the validation set meant
            used = {file.name for file in files.values()}
            unused = sorted(f.name for f in _data_files(Path(dataset).expanduser()).values() if f.name not in used)
            if unused:
                print(f"note: {dataset} has no validation file ({', '.join(SPLIT_NAMES['validation'][:-1])} or "
                      f"{SPLIT_NAMES['validation'][-1]}): 10 % of its train rows are held out as the validation "
                      f"split ({', '.join(unused)} not used)", file=sys.stderr)
        # A fixed seed, not the run seed: every run of a study must see the same validation set.
        parts = splits["train"].train_test_split(test_size=0.1, seed=0)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    return splits


def _load_hub(dataset: str) -> dict[str, datasets.Dataset]:
    import datasets
    name, _, config = dataset.partition(":")
    if not config and name.split("/")[0] in CONFIG_DATASETS and "/" in name:
        name, config = name.split("/", 1)
    offline = hub_offline()  # where the Hub is out of reach, datasets reads its cache alone (core.hub._work_offline)
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as error:
        if dataset in HUB_SST2:
            print(f"note: {dataset} could not be loaded from the Hugging Face Hub ({first_line(error)}): it comes "
                  "from the embedded copy (the same rows; core/sst2/README.md)", file=sys.stderr)
            return load_embedded_sst2()
        way_out = "pass a local folder with train/validation files, or --dataset sst2 for the embedded SST-2"
        if offline and isinstance(error, ConnectionError):
            raise UsageError(f"dataset {dataset!r} is a Hugging Face Hub id, the Hub cannot be reached and it is not "
                             f"in the local cache: {way_out}") from None
        raise UsageError(f"could not load dataset {dataset!r} from the Hugging Face Hub ({first_line(error)}): "
                         f"{way_out}") from None
    splits = {}
    for split in SPLIT_NAMES:
        if (picked := pick_split(loaded, split)) is not None:
            _split_note(dataset, split, picked, loaded)
            splits[split] = loaded[picked]
    return splits

"""One local data file read into rows (`core.sources` finds the files): a tab-separated file read literally
unless its writer quoted it, an empty file named as such, a split in shards read whole."""
from __future__ import annotations

import contextlib
import csv
import glob
import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import UsageError, first_line

if TYPE_CHECKING:
    import datasets

BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-(?P<count>\d{5})$")  # the Hub's parquet: train-00000-of-00002


def shards(file: Path) -> list[Path]:
    """A split's files: `file` alone, or where it is a shard, every shard of its split in order."""
    shard = SHARD.match(file.stem)
    if shard is None:
        return [file]
    found = sorted(file.parent.glob(f"{glob.escape(shard['stem'])}-[0-9]*-of-{shard['count']}{file.suffix}"))
    if len(found) != int(shard["count"]):
        raise UsageError(f"{str(file.parent)!r} holds {len(found)} of the {int(shard['count'])} shards of "
                         f"{shard['stem']}{file.suffix}: the split needs all of them")
    return found


def _writer_quoted(table: datasets.Dataset) -> bool:
    """Whether a literally read table holds a field its writer fenced in quotes: one that starts and ends with a
    quote, with every quote inside doubled, as in `"a ""quoted"" word"`."""
    import pyarrow.compute as pc  # a column at a time: row by row, SST-2's 67,349 rows took 1.5 s
    for name, feature in table.features.items():
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            continue
        column = table.data.column(name)
        fenced = pc.filter(column, pc.and_(pc.starts_with(column, '"'), pc.ends_with(column, '"'))).to_pylist()
        if any(len(value) > 1 and '"' not in value[1:-1].replace('""', "") for value in fenced):
            return True
    return False


def _read_table(path: Path) -> datasets.Dataset:
    """One file's rows. A tab-separated file is read literally, as GLUE writes and reads its files: a quote is a
    character, not a field's fence. Read with CSV quoting, one unmatched quote (`"great film<TAB>1`) silently
    merged every row up to the next quote into one text. A file its writer quoted (pandas' to_csv writes
    `"a ""quoted"" word"`, and fences a tab or a line break inside a text) is read with quoting: where the
    literal read finds such a field and quoting keeps every line a row, or where only quoting can read it. (A
    file whose only fenced texts hold line breaks reads as ragged rows, an error: quoting would read them, but
    so would it merge rows after one stray quote, and the two cannot be told apart.)"""
    import datasets
    files = {"data": str(path)}
    if path.suffix != ".tsv":
        return datasets.load_dataset(BUILDERS[path.suffix], data_files=files, split="data")
    try:
        literal = datasets.load_dataset("csv", data_files=files, split="data", delimiter="\t",
                                        quoting=csv.QUOTE_NONE)
    except Exception:  # a quoted field holds a tab or a line break: only the writer's quoting can read it
        literal = None
    if literal is not None and not _writer_quoted(literal):
        return literal
    try:
        quoted = datasets.load_dataset("csv", data_files=files, split="data", delimiter="\t")
    except Exception:
        if literal is None:
            raise
        return literal
    return quoted if literal is None or len(quoted) == len(literal) else literal


@contextlib.contextmanager
def quiet_datasets():
    """`datasets` without progress bars or log lines, for work on rows already read: a local file reads in
    moments, and flattening the indices of a held-out split took moments too, yet each drew a bar, and datasets
    logs a parse error before raising it; on stderr any of them was a second line before a one-line error."""
    import datasets
    quiet, verbosity = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    if quiet:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if quiet:
            datasets.enable_progress_bars()


def _holds_no_rows(path: Path) -> bool:
    """Whether a data file is empty, or a header alone: `datasets` and pyarrow refuse such a file in words of
    their own ('Instruction "data" corresponds to no data!', 'BatchSize must be greater than 0')."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_metadata(path).num_rows == 0
        with path.open(encoding="utf-8", errors="replace") as lines:
            filled = list(itertools.islice((line for line in lines if line.strip()), 2))  # two tell enough
    except Exception:  # a damaged file: the reader's own error says more
        return False
    header = 1 if path.suffix in (".csv", ".tsv") else 0
    return len(filled) <= header or (path.suffix == ".json" and "".join("".join(filled).split()) == "[]")


def load_file(path: Path) -> datasets.Dataset:
    """A split's rows: its file's, or its shards' in order."""
    parts = [_load_one(part) for part in shards(path)]
    if len(parts) == 1:
        return parts[0]
    import datasets
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:  # shards whose columns differ
        raise UsageError(f"could not join the shards of {str(path)!r}: {first_line(error, 300)}") from None


def _load_one(path: Path) -> datasets.Dataset:
    with quiet_datasets():
        try:
            loaded = _read_table(path)
        except Exception as error:  # pandas/arrow parse errors: show one line, the parser's own reason
            if _holds_no_rows(path):
                raise UsageError(f"could not read {str(path)!r}: it holds no rows") from None
            while error.__cause__ is not None and "error occurred while generating" in str(error):
                error = error.__cause__
            raise UsageError(f"could not read {str(path)!r}: {first_line(error, 300)}") from None
    if "__index_level_0__" in loaded.column_names:  # pandas made the extra first field of every row an index
        header = ", ".join(c for c in loaded.column_names if c != "__index_level_0__")
        raise UsageError(f"could not read {str(path)!r}: its rows have more fields than its header ({header})")
    return loaded

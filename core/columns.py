"""Which columns of a dataset are its texts and its label, and the checks that refuse what is neither: a column of
numbers or token lists as text, lists of classes as a label, rows without a label."""
from __future__ import annotations

import sys

import datasets
import numpy as np

from core.errors import UsageError

TEXT_COLUMNS = ("sentence", "text", "content", "review", "document", "tweet", "utterance", "body", "question")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("question", "passage"), ("text_a", "text_b"))
LABEL_COLUMNS = ("label", "labels", "gold_label", "sentiment", "class", "target", "category", "is_duplicate")


def detect_columns(train: datasets.Dataset, text_column: str | None,
                   label_column: str | None) -> tuple[tuple[str, ...], str]:
    columns = list(train.column_names)
    listed = ", ".join(columns)
    if text_column:
        texts = tuple(c.strip() for c in text_column.split(","))
        if len(texts) > 2:  # the tokenizer takes a third text as a seq2seq target, and no model reads it
            raise UsageError(f"--text-column {text_column!r} names {len(texts)} columns: give one, or two (a pair)")
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
    if label in texts:
        raise UsageError(f"text column {label!r} is the label column: the model would read its answer")
    return texts, label


def class_values(splits: dict[str, datasets.Dataset], label: str) -> list:
    feature = splits["train"].features[label]
    if isinstance(feature, datasets.ClassLabel):
        return list(range(feature.num_classes))
    # The classes are what the train split uses; a label seen only in validation or test is an error later
    # (encode), not a silent extra class.
    values = {v for v in splits["train"].unique(label) if v is not None}
    return sorted(values, key=lambda v: (str(type(v)), v))


def drop_unlabeled_test(raw: dict[str, datasets.Dataset], label: str) -> None:
    """Drop a test split without `label` values: it cannot be scored, so it touches no result (and no run id,
    `core.identity`). GLUE marks its hidden test labels with -1."""
    if "test" in raw and (label not in raw["test"].column_names or set(raw["test"].unique(label)) <= {-1, None}):
        del raw["test"]


def check_text_column(split: datasets.Dataset, column: str) -> None:
    """Refuse a text column that holds no text: its numbers or token lists became their Python spelling
    (`"42"`, `"['a', 'film']"`) and trained without a word of warning."""
    feature = split.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return
    if isinstance(feature, datasets.Value):
        held = "no values" if feature.dtype == "null" else f"{feature.dtype} values"
        fix = "name the column with the texts as --text-column"
    elif _mixed(feature):
        held = "values of mixed types (a number among the texts?)"
        fix = "write every row's value as a text, or name another column as --text-column"
    else:
        held, fix = "lists (tokens?)", "join each row's list into one text, or name another column as --text-column"
    raise UsageError(f"text column {column!r} holds {held}, not text: {fix}")


def _mixed(feature) -> bool:
    """A JSON column whose rows hold values of more than one type, which `datasets` 5 reads as `Json`."""
    return type(feature).__name__ == "Json"


def check_label_column(split: datasets.Dataset, column: str) -> None:
    """Refuse a label column that holds no single class a row: a multi-label dataset's lists of classes (or
    records) stopped pyarrow's `unique` with a traceback."""
    feature = split.features[column]
    if isinstance(feature, (datasets.ClassLabel, datasets.Value)):
        return
    if _mixed(feature):
        raise UsageError(f"label column {column!r} holds values of mixed types (a number among texts?): write "
                         "every row's label alike, or name another column as --label-column")
    held = "records" if isinstance(feature, dict) else "lists"
    raise UsageError(f"label column {column!r} holds {held}, not one class a row (a multi-label dataset?): this "
                     "tool trains classifiers of one label per row; name another column as --label-column")


def drop_unlabeled_rows(raw: dict[str, datasets.Dataset], label: str) -> None:
    """Leave out the rows a class-label column marks -1: the Hub's mark for a row without a label (SNLI's
    no-consensus pairs), which is no class (one line says how many). A plain integer column keeps its -1: there
    it may be a class (negative sentiment)."""
    for name, split in raw.items():
        if not isinstance(split.features.get(label), datasets.ClassLabel):
            continue
        labels = np.asarray(split[label][:])  # [:] reads the column at once; iterating it reads row by row
        if (unlabeled := int((labels == -1).sum())):
            raw[name] = split.select(np.flatnonzero(labels != -1))
            print(f"note: {unlabeled} of the {len(labels)} rows of the {name} split have no label (-1) and are left "
                  "out", file=sys.stderr)

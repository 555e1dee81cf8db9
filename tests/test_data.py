"""Data: columns are found, labels of any kind become 0..n-1, splits are what the user gave, bad data is named."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import quick_config, toy_rows, write_split, write_tokenizer, write_toy_dataset

from core import UsageError
from core.batches import subsample
from core.columns import detect_columns
from core.data import load_text_data
from core.sources import load_raw
from core.train import run as train_run


def run(config, **kwargs) -> dict:
    return train_run(config, **kwargs).to_dict()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_table(path: Path, columns: dict[str, list]) -> None:
    """One split in the format its suffix names, written through `datasets`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict(columns)
    if path.suffix in (".tsv", ".csv"):
        table.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.to_json(path, lines=True)


def toy_columns(n: int, seed: int, text="sentence", label="label", classes=2, names=None) -> dict[str, list]:
    rows = toy_rows(n, seed, classes)
    return {text: [s for s, _ in rows], label: [names[y] if names else y for _, y in rows]}


def pair_columns(n: int, seed: int, first: str, second: str) -> dict[str, list]:
    rows = toy_rows(n, seed)
    return {first: [s for s, _ in rows], second: ["the story was told"] * n, "label": [y for _, y in rows]}


# Column detection

@pytest.mark.parametrize("columns, texts, label", [
    (["sentence", "label"], ("sentence",), "label"),
    (["idx", "text", "labels"], ("text",), "labels"),
    (["content", "sentiment"], ("content",), "sentiment"),
    (["review", "class"], ("review",), "class"),
    (["tweet", "target"], ("tweet",), "target"),
    (["document", "category"], ("document",), "category"),
    (["idx", "sentence1", "sentence2", "label"], ("sentence1", "sentence2"), "label"),
    (["premise", "hypothesis", "label"], ("premise", "hypothesis"), "label"),
    (["question", "sentence", "label"], ("question", "sentence"), "label"),
    (["question1", "question2", "label"], ("question1", "question2"), "label"),
    (["question", "passage", "idx", "label"], ("question", "passage"), "label"),  # BoolQ: not the question alone
    (["sentence1", "sentence2", "gold_label", "label1"], ("sentence1", "sentence2"), "gold_label"),  # GLUE's MNLI
    (["id", "question1", "question2", "is_duplicate"], ("question1", "question2"), "is_duplicate"),  # GLUE's QQP
])
def test_columns_are_detected(columns, texts, label):
    train = datasets.Dataset.from_dict({c: ["x"] for c in columns})
    assert detect_columns(train, None, None) == (texts, label)


def test_given_columns_win_over_detection():
    train = datasets.Dataset.from_dict({"sentence": ["x"], "a": ["x"], "b": ["y"], "label": [0], "y": [1]})
    assert detect_columns(train, "a, b", "y") == (("a", "b"), "y")


@pytest.mark.parametrize("text_column, label_column, named", [
    (None, None, "no label column found in the train split (columns: sentence, score)"),
    (None, "nope", "label column 'nope' is not in the train split: columns are sentence, score"),
    ("words", None, "text column 'words' is not in the train split"),
])
def test_missing_columns_are_named(text_column, label_column, named):
    train = datasets.Dataset.from_dict({"sentence": ["x"], "score": [1]})
    with pytest.raises(UsageError) as caught:
        detect_columns(train, text_column, label_column)
    assert named in str(caught.value)


def test_missing_text_column_lists_the_columns():
    train = datasets.Dataset.from_dict({"words": ["x"], "label": [1]})
    with pytest.raises(UsageError, match=r"no text column found .*columns: words, label.*--text-column"):
        detect_columns(train, None, None)


def test_missing_label_column_is_named_when_loading_files(tmp_path, tokenizer):
    write_table(tmp_path / "train.csv", {"sentence": ["a good film", "a bad film"], "stars": [5, 1]})
    with pytest.raises(UsageError, match="no label column found .*sentence, stars"):
        load_text_data(str(tmp_path), tokenizer)
    with pytest.raises(UsageError, match="label column 'nope'"):
        load_text_data(str(tmp_path), tokenizer, label_column="nope")


# Files and formats

@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl", "json", "parquet"])
def test_every_file_format_loads(tmp_path, tokenizer, ext):
    write_table(tmp_path / f"train.{ext}", toy_columns(40, 1, text="text", label="labels"))
    write_table(tmp_path / f"dev.{ext}", toy_columns(12, 2, text="text", label="labels"))
    data = load_text_data(str(tmp_path), tokenizer, max_length=32)
    assert (data.text_columns, data.label_column) == (("text",), "labels")
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 40, "validation": 12}
    assert data.label_names == ["0", "1"]
    assert data.splits["train"].labels.tolist() == toy_columns(40, 1)["label"]


@pytest.mark.parametrize("first, second", [("sentence1", "sentence2"), ("premise", "hypothesis")])
def test_sentence_pairs_are_encoded_as_two_segments(tmp_path, tokenizer, first, second):
    write_table(tmp_path / "train.csv", pair_columns(20, 1, first, second))
    write_table(tmp_path / "validation.csv", pair_columns(8, 2, first, second))
    data = load_text_data(str(tmp_path), tokenizer, max_length=32)
    assert data.text_columns == (first, second)
    train = data.splits["train"]
    # [CLS] first [SEP] second [SEP]: two [SEP]s and a second segment in the token types.
    assert all(ids.count(tokenizer.sep_token_id) == 2 for ids in train.input_ids)
    assert all(1 in types for types in train.token_type_ids)


def test_rows_are_tokenized_when_a_run_asks_for_them(tmp_path, tokenizer):
    """A subsampled run tokenizes its rows only; a later subset reuses them; the ids are the tokenizer's own."""
    write_table(tmp_path / "train.csv", pair_columns(50, 1, "sentence1", "sentence2"))
    write_table(tmp_path / "validation.csv", pair_columns(8, 2, "sentence1", "sentence2"))
    train = load_text_data(str(tmp_path), tokenizer, max_length=32).splits["train"]
    rows = subsample(len(train), 10, seed=3)
    part = train.subset(rows, progress=False)
    assert sum(ids is not None for ids in train._ids) == 10
    texts = pair_columns(50, 1, "sentence1", "sentence2")
    expected = tokenizer([texts["sentence1"][i] for i in rows], [texts["sentence2"][i] for i in rows],
                         truncation=True, max_length=32)
    assert part.input_ids == expected["input_ids"] and part.token_type_ids == expected["token_type_ids"]
    assert part.labels.tolist() == [texts["label"][i] for i in rows]
    assert part.lengths.tolist() == [len(ids) for ids in expected["input_ids"]]
    train.subset(rows[:5], progress=False)
    assert sum(ids is not None for ids in train._ids) == 10  # nothing tokenized twice
    assert train.input_ids == tokenizer(texts["sentence1"], texts["sentence2"], truncation=True,
                                        max_length=32)["input_ids"]


def test_inputs_are_truncated_to_max_length(tmp_path, tokenizer):
    long = " ".join(["the movie was good"] * 20)
    write_table(tmp_path / "train.csv", {"sentence": [long, "bad"], "label": [1, 0]})
    write_table(tmp_path / "validation.csv", {"sentence": [long, "bad"], "label": [1, 0]})
    data = load_text_data(str(tmp_path), tokenizer, max_length=16)
    assert data.splits["train"].lengths.tolist() == [16, 3]


def test_a_single_file_is_split_into_train_and_validation(tmp_path, tokenizer):
    write_table(tmp_path / "all.jsonl", toy_columns(100, 1))
    data = load_text_data(str(tmp_path / "all.jsonl"), tokenizer, max_length=32)
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (90, 10)
    # A fixed split: every run of a study is judged on the same validation rows.
    again = load_raw(str(tmp_path / "all.jsonl"))
    assert again["validation"]["sentence"] == load_raw(str(tmp_path / "all.jsonl"))["validation"]["sentence"]


def test_the_data_fingerprint_is_the_rows_loaded_not_how_datasets_read_them(tmp_path, tokenizer, monkeypatch):
    """TextData.fingerprint (in the timing, prefix-cache and shared-steps keys) hashes the texts and labels that
    were loaded: the same rows written again give the same key, one changed label or sentence another, and
    `datasets`' own fingerprint of a split (it changes with a file's mtime, and may with the library) plays no part."""
    import os

    from core import data as core_data
    from core import sources
    folder = write_toy_dataset(tmp_path, train=40, validation=12)
    train = folder / "train.tsv"

    def fingerprint() -> str:
        sources.clear_raw_cache()  # read the files again, as a new process would
        return load_text_data(str(folder), tokenizer, max_length=32).fingerprint

    first = fingerprint()
    copy = write_toy_dataset(tmp_path / "copy", train=40, validation=12)  # the same rows under another name
    sources.clear_raw_cache()
    assert load_text_data(str(copy), tokenizer, max_length=32).fingerprint == first
    write_toy_dataset(tmp_path, train=40, validation=12)  # the same rows, rewritten, a minute newer
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 60 * 10**9))
    assert fingerprint() == first
    real = core_data.load_raw

    def relabeled(dataset: str) -> dict:
        raw = real(dataset)
        for split in raw.values():
            monkeypatch.setattr(split, "_fingerprint", "a fingerprint datasets might compute one day")
        return raw

    monkeypatch.setattr(core_data, "load_raw", relabeled)
    assert fingerprint() == first
    header, *rows = train.read_text().splitlines()
    sentence, label = rows[3].split("\t")
    for changed in (f"{sentence}\t{1 - int(label)}", f"{sentence} again\t{label}"):
        train.write_text("\n".join([header, *rows[:3], changed, *rows[4:]]) + "\n")
        assert fingerprint() != first, changed


def test_subsample_is_seeded_and_matches_datasets_shuffle():
    table = datasets.Dataset.from_dict({"row": list(range(100))})
    assert subsample(100, 10, 7).tolist() == list(table.shuffle(seed=7).select(range(10))["row"])
    assert subsample(100, 10, 7).tolist() != subsample(100, 10, 8).tolist()
    assert subsample(100, None, 7).tolist() == subsample(100, 500, 7).tolist() == list(range(100))


# Labels

def test_string_labels_become_class_indices(tmp_path, tokenizer):
    names = ["neg", "pos"]
    write_table(tmp_path / "train.tsv", toy_columns(30, 1, names=names))
    write_table(tmp_path / "validation.tsv", toy_columns(10, 2, names=names))
    data = load_text_data(str(tmp_path), tokenizer)
    assert data.label_names == ["neg", "pos"]
    assert data.splits["train"].labels.tolist() == toy_columns(30, 1)["label"]


def test_one_label_value_is_refused(tmp_path, tokenizer):
    write_table(tmp_path / "train.csv", {"sentence": ["good", "great"], "label": [1, 1]})
    write_table(tmp_path / "validation.csv", {"sentence": ["fine"], "label": [1]})
    with pytest.raises(UsageError, match="'label' holds 1 distinct value"):
        load_text_data(str(tmp_path), tokenizer)


def test_string_labels_train_end_to_end(tmp_path, tiny_bert):
    folder = write_toy_dataset(tmp_path, train=64, validation=32, names=["neg", "pos"])
    record = run(quick_config(tiny_bert, str(folder)), progress=False)
    assert record["label_names"] == ["neg", "pos"] and record["num_labels"] == 2


def test_three_classes_report_macro_f1(tmp_path, tiny_distilbert):
    folder = write_toy_dataset(tmp_path, train=360, validation=60, classes=3)
    # all 360 rows train (no dev split): the test is about macro-F1, on a model that has learned the task
    record = run(quick_config(tiny_distilbert, str(folder), epochs=3, learning_rate=3e-3, dev_size=0), progress=False)
    assert record["num_labels"] == 3
    predictions = np.array(record["validation_predictions"])
    labels = np.array([y for _, y in toy_rows(60, 2, 3)])
    f1s = []  # macro-F1: the unweighted mean of each class's F1
    for c in range(3):
        true_positives = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        f1s.append(2 * true_positives / denominator if denominator else 0.0)
    assert record["f1"] == pytest.approx(np.mean(f1s), abs=1e-6)
    assert record["accuracy"] == pytest.approx(np.mean(predictions == labels), abs=1e-6)
    assert record["accuracy"] >= 0.8  # well above chance (1/3)


# Test split

def test_labeled_test_split_is_reported(tmp_path, tiny_bert):
    folder = write_toy_dataset(tmp_path, train=64, validation=32, test=40)
    record = run(quick_config(tiny_bert, str(folder)), progress=False)
    assert record["test_samples"] == 40
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["test_f1"] is not None


def test_absent_test_split_is_null(tmp_path, tiny_bert):
    folder = write_toy_dataset(tmp_path, train=64, validation=32)
    record = run(quick_config(tiny_bert, str(folder)), progress=False)
    assert record["test_accuracy"] is None and record["test_samples"] == 0


def test_unlabeled_test_split_is_ignored(tmp_path, tiny_bert, tokenizer):
    folder = write_toy_dataset(tmp_path, train=64, validation=32)
    write_split(folder / "test.tsv", [(sentence, -1) for sentence, _ in toy_rows(20, 3)])  # GLUE's hidden labels
    assert "test" not in load_text_data(str(folder), tokenizer).splits
    record = run(quick_config(tiny_bert, str(folder)), progress=False)
    assert record["test_accuracy"] is None and record["test_samples"] == 0


# Bad datasets: one sentence naming the path

def test_missing_dataset_folder_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UsageError, match=re.escape(f"dataset folder '{missing}' does not exist")):
        load_raw(missing)


def test_empty_dataset_folder_is_named(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"'{tmp_path}' has no train file") + ".*it holds nothing"):
        load_raw(str(tmp_path))


def test_folder_without_train_file_lists_what_it_holds(tmp_path):
    write_split(tmp_path / "validation.tsv", toy_rows(4, 1))
    (tmp_path / "notes.txt").write_text("hello\n")
    expected = re.escape(f"'{tmp_path}' has no train file") + ".*it holds notes.txt, validation.tsv"
    with pytest.raises(UsageError, match=expected):
        load_raw(str(tmp_path))


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "data.txt").write_text("good\t1\n")
    with pytest.raises(UsageError, match="data.txt' has an unsupported type"):
        load_raw(str(tmp_path / "data.txt"))


@pytest.mark.parametrize("name", ["train.csv", "validation.tsv", "validation.parquet", "test.jsonl"])
def test_an_empty_file_is_named_as_empty(tmp_path, name):
    """A file of a header and no rows stopped in datasets' or pyarrow's words ('Instruction "data" corresponds to no
    data!', 'BatchSize must be greater than 0, got 0')."""
    for split in ("train", "validation"):
        if not name.startswith(split):
            write_table(tmp_path / f"{split}.csv", toy_columns(8, 1))
    empty = tmp_path / name
    headers = {".csv": "sentence,label\n", ".tsv": "sentence\tlabel\n", ".jsonl": ""}
    if empty.suffix in headers:
        empty.write_text(headers[empty.suffix])
    else:
        write_table(empty, {"sentence": [], "label": []})
    with pytest.raises(UsageError, match=re.escape(f"could not read '{empty}': it holds no rows")):
        load_raw(str(tmp_path))


def test_hub_dataset_offline_is_named_with_the_ways_out():
    with pytest.raises(UsageError, match="dataset 'glue/cola' is a Hugging Face Hub id, the Hub cannot be reached "
                                         "and it is not in the local cache: .*--dataset sst2"):
        load_raw("glue/cola")


# The embedded SST-2: the Hub's glue/sst2 rows, in its order, wherever the Hub cannot be reached

def test_the_embedded_sst2_has_the_hub_splits_columns_and_counts():
    splits = load_raw("sst2")
    assert set(splits) == {"train", "validation"}  # the Hub's test split is unlabeled and dropped either way
    assert [len(splits["train"]), len(splits["validation"])] == [67349, 872]
    assert splits["train"].features["label"].names == ["negative", "positive"]
    assert np.bincount(splits["train"]["label"]).tolist() == [29780, 37569]
    assert np.bincount(splits["validation"]["label"]).tolist() == [428, 444]
    assert splits["train"][0] == {"sentence": "hide new secretions from the parental units", "label": 0, "idx": 0}
    assert splits["validation"]["idx"] == list(range(872))


def test_the_embedded_sst2_keeps_the_reference_files_row_order():
    from conftest import SHARED_SST2
    if not SHARED_SST2.is_dir():
        pytest.skip("../shared/data/sst2 is absent")
    splits = load_raw("sst2")
    for name in ("train", "validation"):
        lines = (SHARED_SST2 / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        assert [line.rsplit("\t", 1)[0] for line in lines] == splits[name]["sentence"]
        assert [int(line.rsplit("\t", 1)[1]) for line in lines] == splits[name]["label"]


def test_glue_sst2_offline_comes_from_the_embedded_copy_saying_so_in_one_line(capsys):
    splits = load_raw("glue/sst2")  # conftest sets HF_HUB_OFFLINE
    assert len(splits["train"]) == 67349
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "embedded copy" in note[0] and "glue/sst2" in note[0]



def test_columns_are_read_at_once_never_row_by_row(tmp_path, tokenizer, monkeypatch):
    """`datasets` 5 hands out a column as a lazy `Column`: `None in` it, or `np.asarray` of it, formats every row
    one by one. On SST-2's 67,349 rows that was 5-10 s of every run's start (0.15 s read at once)."""
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"sentence": [f"row {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
    for split in ("train", "validation"):  # a class-label column: the unlabeled-row check reads it too
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))

    def row_by_row(self):
        raise AssertionError("a column was read row by row")

    monkeypatch.setattr(datasets.arrow_dataset.Column, "__iter__", row_by_row)
    data = load_text_data(str(tmp_path), tokenizer)
    assert data.splits["train"].labels.tolist() == [i % 2 for i in range(40)]


def test_a_one_file_dataset_loads_without_a_word_on_stderr(tmp_path, tokenizer, capsys):
    """The 10 % held out of a one-file dataset is a view of its rows; reading its labels flattened it and drew a
    'Flattening the indices' progress bar, which came before a one-line error as well."""
    import csv
    with open(tmp_path / "train.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows([f"row number {i}", ("pos", "neg", "neu")[i % 3]] for i in range(3000))
    data = load_text_data(str(tmp_path / "train.csv"), tokenizer)
    assert {name: len(split.labels) for name, split in data.splits.items()} == {"train": 2700, "validation": 300}
    assert capsys.readouterr().err == ""


def test_the_run_id_and_the_training_data_read_the_rows_once_and_say_so_once(tiny_bert, monkeypatch, capsys):
    """A run fingerprints its rows for its id and then trains on them: one read, one note (it was two of each)."""
    import core.sources
    from core.config import RunConfig
    from core.session import Session
    reads = []
    real = core.sources.load_embedded_sst2
    monkeypatch.setattr(core.sources, "load_embedded_sst2", lambda: reads.append(1) or real())
    assert RunConfig(model=tiny_bert, dataset="glue/sst2").run_id
    session = Session()
    data = session.text_data("glue/sst2", session.tokenizer(tiny_bert), None, None, 32)
    assert len(data.splits["train"]) == 67349 and len(reads) == 1
    assert capsys.readouterr().err.count("embedded copy") == 1


def test_one_function_says_which_files_hold_a_local_datasets_rows(tmp_path, monkeypatch):
    """`core.sources.local_files` is the only place a local dataset's files are worked out: the rows read, the key
    they are kept under and the run id's row fingerprint all follow it, so they cannot disagree."""
    from core import identity, sources
    given = write_toy_dataset(tmp_path / "given", train=20, validation=10, test=6)
    assert sources.local_files(str(given)) == {s: given / f"{s}.tsv" for s in ("train", "validation", "test")}
    assert sources.local_files(str(given / "train.tsv")) == {"train": given / "train.tsv"}
    assert sources.local_files("glue/sst2") is None and sources.local_files(str(tmp_path / "absent")) is None
    other = write_toy_dataset(tmp_path / "other", train=30, validation=12, ext="csv")
    found = sources.local_files
    monkeypatch.setattr(sources, "local_files", lambda name: found(str(other) if name == str(given) else name))
    identity.clear_caches()
    assert sources.source_files(str(given)) == [(other / f"{s}.csv").resolve() for s in ("train", "validation")]
    assert {name: len(rows) for name, rows in load_raw(str(given)).items()} == {"train": 30, "validation": 12}
    assert identity.data_fingerprint(str(given)) == identity.data_fingerprint(str(other))
    identity.clear_caches()

def test_a_folder_of_hub_parquet_shards_reads_each_split_whole(tmp_path):
    """The Hub's parquet layout (`huggingface-cli download` of glue: sst2/train-00000-of-00001.parquet) is a
    folder of shards: each split is all its shards, in order; their files key the memo and the run id."""
    from core import identity, sources
    train = toy_columns(30, 1)
    write_table(tmp_path / "train-00000-of-00002.parquet", {k: v[:18] for k, v in train.items()})
    write_table(tmp_path / "train-00001-of-00002.parquet", {k: v[18:] for k, v in train.items()})
    write_table(tmp_path / "validation-00000-of-00001.parquet", toy_columns(10, 2))
    write_table(tmp_path / "test-00000-of-00001.parquet", toy_columns(6, 3))
    raw = load_raw(str(tmp_path))
    assert {name: len(rows) for name, rows in raw.items()} == {"train": 30, "validation": 10, "test": 6}
    assert raw["train"]["sentence"] == train["sentence"]
    assert len(sources.source_files(str(tmp_path))) == 4
    before = identity.data_fingerprint(str(tmp_path))
    write_table(tmp_path / "train-00001-of-00002.parquet", {k: v[18:][::-1] for k, v in train.items()})
    assert identity.data_fingerprint(str(tmp_path)) != before  # the second shard is part of the rows
    identity.clear_caches()
    (tmp_path / "train-00000-of-00002.parquet").unlink()
    with pytest.raises(UsageError, match="holds 1 of the 2 shards of train.parquet: the split needs all of them"):
        load_raw(str(tmp_path))


def test_class_label_splits_are_matched_by_name_not_by_index(tmp_path, tokenizer):
    """Splits encoded one by one (`class_encode_column` per split) number their classes each its own way: a
    validation set without 'neu' calls 'pos' 1, which is 'neu' in train. Scored by index it was silently wrong."""
    train_names, validation_names = ["neg", "neu", "pos"], ["neg", "pos"]
    for name, names, n in (("train", train_names, 30), ("validation", validation_names, 10)):
        columns = toy_columns(n, 1, classes=len(names))
        features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        datasets.Dataset.from_dict(columns, features=features).to_parquet(tmp_path / f"{name}.parquet")
    data = load_text_data(str(tmp_path), tokenizer)
    written = toy_columns(10, 1, classes=2)["label"]
    assert data.label_names == train_names
    assert [data.label_names[y] for y in data.splits["validation"].labels] == [validation_names[y] for y in written]
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "meh"])})
    datasets.Dataset.from_dict(toy_columns(10, 1), features=features).to_parquet(tmp_path / "validation.parquet")
    with pytest.raises(UsageError, match="the validation split has label 'meh', which the train split never uses"):
        load_text_data(str(tmp_path), tokenizer)
    # A validation file written by hand names its classes: 'pos' was "a label the train split never uses".
    (tmp_path / "validation.parquet").unlink()
    write_table(tmp_path / "validation.csv", {"sentence": ["a fine film", "bad"], "label": ["pos", "neg"]})
    assert load_text_data(str(tmp_path), tokenizer).splits["validation"].labels.tolist() == [2, 0]


def test_a_folder_without_a_validation_file_says_what_is_held_out_and_what_is_not_used(tmp_path, capsys):
    """train.csv + eval.csv: eval is no validation name, so 10 % of train became the validation set, in silence."""
    write_table(tmp_path / "train.csv", toy_columns(40, 1))
    write_table(tmp_path / "eval.csv", toy_columns(10, 2))
    capsys.readouterr()  # the writer's own progress bar
    raw = load_raw(str(tmp_path))
    assert (len(raw["train"]), len(raw["validation"])) == (36, 4)
    assert capsys.readouterr().err == (f"note: {tmp_path} has no validation file (validation, valid, dev or val): 10 % "
                                       "of its train rows are held out as the validation split (eval.csv not used)\n")


def test_a_validation_split_without_labels_is_named_so(tmp_path, tokenizer):
    """GLUE marks hidden labels -1: a validation split of -1s was 'label -1, which the train split never uses'."""
    write_table(tmp_path / "train.tsv", toy_columns(20, 1))
    write_table(tmp_path / "validation.tsv", {"sentence": ["a fine film", "bad"], "label": [-1, -1]})
    with pytest.raises(UsageError, match=re.escape("the validation split has no labels (every row -1, GLUE's mark of "
                                                   "a hidden label): validation is scored, so it needs them")):
        load_text_data(str(tmp_path), tokenizer)


# Unreadable files: one line, the parser's own reason, no log line before it

@pytest.mark.parametrize("name, content, reason", [
    ("train.tsv", b"sentence\tlabel\n\xff\xfe bad\t0\ngood\t1\n", "can't decode byte 0xff"),
    ("train.csv", b'sentence,label\n"unclosed,0\ngood,1\n', "EOF inside string"),
    ("train.tsv", b"sentence\tlabel\nfine movie\t1\textra\nbad film\t0\tmore\n", "more fields than its header"),
])
def test_an_unreadable_file_is_one_line_with_the_parsers_reason(tmp_path, capfd, caplog, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(reason)):
        load_raw(str(tmp_path))
    assert capfd.readouterr().err.strip() == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # a second line


def test_a_truncated_parquet_file_is_one_line(tmp_path, capfd, caplog):
    write_table(tmp_path / "whole" / "train.parquet", toy_columns(64, 1))
    data = (tmp_path / "whole" / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(data[:len(data) // 2])
    capfd.readouterr()  # the writer's own progress bar
    with pytest.raises(UsageError, match="could not read .*train.parquet'"):
        load_raw(str(tmp_path))
    assert capfd.readouterr().err.strip() == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # a second line


def test_a_row_without_a_label_is_named_not_called_one_distinct_value(tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine movie\nbad film\t0\ngood\t1\n")
    with pytest.raises(UsageError, match="row 1 of the train split \\('fine movie'\\) has no 'label' value"):
        load_text_data(str(tmp_path), tokenizer)


def test_a_label_only_in_validation_is_refused_not_made_a_class(tmp_path, tiny_bert):
    from conftest import toy_rows, write_split

    from core.data import load_text_data
    from core.model import load_tokenizer
    write_split(tmp_path / "train.tsv", toy_rows(40, 1))
    write_split(tmp_path / "validation.tsv", toy_rows(10, 2) + [("the movie", 7)])
    with pytest.raises(UsageError, match="7"):
        load_text_data(str(tmp_path), load_tokenizer(tiny_bert))


def test_a_missing_relative_folder_under_an_existing_one_is_called_missing(tmp_path, monkeypatch):
    from core.sources import check_dataset
    from core.model import model_config
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        check_dataset("data/mydata")
    with pytest.raises(UsageError, match="does not exist"):
        model_config("data/mymodel")


# Files and labels from elsewhere: GLUE's own files, writers that quote, Hub split names, labels that are no class

def test_a_quote_in_a_tsv_file_is_a_character_not_a_fence(tmp_path):
    """Read with CSV quoting, the unmatched quote of the first row swallowed the next two rows into its text."""
    rows = ['"unmatched quote opens here', "second row", 'third "row" here', '"quoted" start', "fifth"]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\nfine\t0\nbad\t1\n")
    train = load_raw(str(tmp_path))["train"]
    assert train["sentence"] == rows
    assert train["label"] == [0, 1, 0, 1, 0]


def test_a_tsv_file_its_writer_quoted_reads_back_as_written(tmp_path, tokenizer):
    texts = ['he said "hi"', "plain", "a tab\tinside", '"starts with a quote', "a line\nbreak"]
    table = {"sentence": texts, "label": [0, 1, 0, 1, 0]}
    write_table(tmp_path / "train.tsv", table)  # pandas' to_csv: fenced and doubled quotes
    write_table(tmp_path / "validation.tsv", {"sentence": texts[:2], "label": [0, 1]})
    splits = load_raw(str(tmp_path))
    assert splits["train"]["sentence"] == texts
    assert splits["validation"]["sentence"] == texts[:2]  # no tab or break: found quoted by its fenced quotes
    # Fenced line breaks alone look like a stray quote's merge to quoting: ragged rows, named, never merged.
    write_table(tmp_path / "validation.tsv", {"sentence": ["a line\nbreak", "plain"], "label": [0, 1]})
    with pytest.raises(UsageError, match="row 1 of the validation split .* a ragged file"):
        load_text_data(str(tmp_path), tokenizer)


def test_glue_files_with_suffixed_split_names_are_found_and_named(tmp_path, tokenizer, capsys):
    """GLUE's own MNLI files: dev_matched/dev_mismatched, an unlabeled test_matched, the label in gold_label."""
    for name, seed in (("train", 1), ("dev_matched", 2), ("dev_mismatched", 3)):
        columns = pair_columns(30, seed, "sentence1", "sentence2")
        columns["gold_label"] = [("entailment", "neutral", "contradiction")[y] for y in columns.pop("label")]
        write_table(tmp_path / f"{name}.tsv", columns)
    write_table(tmp_path / "test_matched.tsv", {"sentence1": ["a"], "sentence2": ["b"]})
    data = load_text_data(str(tmp_path), tokenizer)
    assert (data.text_columns, data.label_column) == (("sentence1", "sentence2"), "gold_label")
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 30, "validation": 30}
    assert data.splits["validation"].texts[0] == pair_columns(30, 2, "sentence1", "sentence2")["sentence1"]
    err = capsys.readouterr().err
    assert "dev_matched is its validation split (dev_mismatched not used)" in err


def test_hub_split_names_with_suffixes_are_found_and_named(monkeypatch, capsys):
    hub = datasets.DatasetDict({name: datasets.Dataset.from_dict(pair_columns(6, i, "premise", "hypothesis"))
                                for i, name in enumerate(("train", "validation_matched", "validation_mismatched",
                                                          "test_matched"))})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub)
    splits = load_raw("nyu-mll/glue:mnli")
    assert {name: split["premise"] for name, split in splits.items()} == {
        "train": hub["train"]["premise"], "validation": hub["validation_matched"]["premise"],
        "test": hub["test_matched"]["premise"]}
    assert "validation_matched is its validation split (validation_mismatched not used)" in capsys.readouterr().err


def test_a_hub_dataset_with_the_hub_out_of_reach_is_read_from_the_cache_alone(monkeypatch):
    """With no offline variable set and the Hub's probe unanswered, `datasets` retried the Hub for ~25 s, printing
    each retry, before failing; it must look only in its cache, and the refusal must say so in one line."""
    import huggingface_hub.constants

    import core.hub
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(core.hub, "_hub_answers", lambda endpoint: False)  # the probe finds no Hub
    seen = []

    def load_dataset(name, config=None):
        seen.append((name, datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UsageError) as error:
        load_raw("someone/reviews")
    assert seen == [("someone/reviews", True, True)]
    assert "not in the local cache" in str(error.value) and "\n" not in str(error.value)


def test_a_fractional_label_is_refused_as_a_regression_score(tmp_path, tokenizer):
    """STS-B's scores: each distinct score became a class, silently (validation's scores are all in train)."""
    columns = pair_columns(40, 1, "sentence1", "sentence2")
    columns["label"] = [round(i * 0.125, 3) for i in range(40)]
    write_table(tmp_path / "train.csv", columns)
    write_table(tmp_path / "validation.csv", {**pair_columns(4, 2, "sentence1", "sentence2"),
                                              "label": columns["label"][:4]})
    with pytest.raises(UsageError, match=r"label column 'label' holds fractional numbers \(0\.125, 0\.25, 0\.375, "
                                         r"….*regression"):
        load_text_data(str(tmp_path), tokenizer)


def test_an_id_column_is_not_taken_for_classes(tmp_path, tokenizer):
    write_table(tmp_path / "train.csv", {"sentence": [f"row {i}" for i in range(300)], "target": list(range(300))})
    write_table(tmp_path / "validation.csv", {"sentence": ["row 1"], "target": [1]})
    with pytest.raises(UsageError, match="'target' holds 300 distinct values in 300 training rows"):
        load_text_data(str(tmp_path), tokenizer)


def test_rows_a_class_label_marks_minus_one_are_left_out_but_a_plain_minus_one_is_a_class(tmp_path, tokenizer,
                                                                                          capsys):
    """SNLI on the Hub: a ClassLabel column marks rows without a gold label -1; they are no class."""
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    for name, n in (("train", 40), ("validation", 12)):
        columns = pair_columns(n, 1, "premise", "hypothesis")
        columns["label"] = [i % 4 - 1 for i in range(n)]
        datasets.Dataset.from_dict(columns, features=features).to_parquet(tmp_path / f"{name}.parquet")
    data = load_text_data(str(tmp_path), tokenizer)
    assert data.label_names == ["entailment", "neutral", "contradiction"]
    assert data.splits["train"].labels.tolist() == [0, 1, 2] * 10
    assert "10 of the 40 rows of the train split have no label (-1) and are left out" in capsys.readouterr().err
    plain = tmp_path / "plain"
    for name, n in (("train", 30), ("validation", 9)):
        write_table(plain / f"{name}.csv", {"sentence": [f"row {i}" for i in range(n)],
                                            "label": [i % 3 - 1 for i in range(n)]})
    data = load_text_data(str(plain), tokenizer)
    assert data.label_names == ["-1", "0", "1"]
    assert len(data.splits["train"]) == 30


def test_a_column_of_texts_and_numbers_is_named_as_such(tmp_path, tokenizer):
    """A JSON column with a number among its texts (or among string labels) is read as JSON values: it was
    called a column of token lists (the text) or of lists (the label)."""
    rows = [json.dumps({"text": text, "label": label}) for text, label in
            (("a fine film", "pos"), (12345, "neg"), ("good", "pos"), ("dull plot", "neg"))]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(UsageError, match="text column 'text' holds values of mixed types"):
        load_text_data(str(tmp_path), tokenizer)
    (tmp_path / "train.jsonl").write_text("\n".join(rows).replace("12345", '"12345"').replace('"pos"}', "1}"))
    with pytest.raises(UsageError, match="label column 'label' holds values of mixed types"):
        load_text_data(str(tmp_path), tokenizer)


@pytest.mark.parametrize("values, held", [
    ([[0], [1, 2], [2], []], "lists"),  # multi-label, as go_emotions' `labels`
    ([{"id": 0}, {"id": 1}, {"id": 0}, {"id": 1}], "records"),
])
def test_a_label_column_without_one_class_a_row_is_refused(tmp_path, tokenizer, values, held):
    """A multi-label column (each row a list of classes) stopped pyarrow with a traceback; it is no single class."""
    write_table(tmp_path / "train.jsonl", {"text": ["a fine film", "bad", "good", "dull plot"], "labels": values})
    with pytest.raises(UsageError, match=f"label column 'labels' holds {held}, not one class a row"):
        load_text_data(str(tmp_path), tokenizer)


@pytest.mark.parametrize("values, held", [
    ([4, 2, 7, 1], "int64 values"),
    ([["a", "fine", "film"], ["bad"], ["good"], ["dull", "plot"]], "lists (tokens?)"),
])
def test_a_text_column_without_text_is_refused(tmp_path, tokenizer, values, held):
    """--text-column pointed at an id, or a dataset of token lists: each value trained as its Python spelling."""
    write_table(tmp_path / "train.jsonl", {"review": values, "words": ["w"] * 4, "label": [0, 1, 0, 1]})
    with pytest.raises(UsageError, match=f"text column 'review' holds {re.escape(held)}, not text"):
        load_text_data(str(tmp_path), tokenizer, text_column="review")

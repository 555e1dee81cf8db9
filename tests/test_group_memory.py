"""How many runs a stacked group holds on a GPU (`core.group.bytes_per_run`, `group_size`), checked against what a
group keeps in memory on the CPU, and what happens when a group does not fit after all (the group trainer halves
it)."""
from __future__ import annotations

import gc
import sys
import warnings
from argparse import Namespace

import optuna
import pytest
import torch
from conftest import quick_config, save_tiny, write_toy_dataset

from core import group as run_group_module
from core.group import bytes_per_run, group_size, run_group
from core.session import Session


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("memory-bert"), "bert", layers=2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("memory-data"), train=60, validation=32))


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in the process, each storage once (views share theirs)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for thing in gc.get_objects():
            if isinstance(thing, torch.Tensor) and thing.device.type != "meta":
                storage = thing.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def held_by_group(configs) -> int:
    """What is alive while a group trains: measured after its first epoch, when every run's model, the stacked
    weights, their gradients and AdamW moments exist (a batch's activations are gone by then)."""
    held: list[int] = []

    def measure(entry: dict) -> None:
        if not held:
            held.append(live_tensor_bytes())
    results = run_group(configs, Session(), "cpu", on_epoch=[measure] * len(configs))
    assert not any(isinstance(r, Exception) for r in results)
    return held[0]


def test_the_memory_rule_covers_what_one_more_run_keeps_in_a_group(model, data):
    """One more run in a group keeps 16 bytes per trainable weight in the stacked model (weight, gradient, two
    moments) and its own whole model (4 bytes a weight, frozen ones too): measured as the growth of live tensor
    storage from 2 to 4 runs. The rule counted only the first: with every layer frozen it said 18 kB a run where
    the run keeps 115 kB, so on a GPU a grid of frozen cells would have been sized 6x too large."""
    from core.model import count_parameters, freeze, load_model
    for depth in (0, 1, 2):
        base = quick_config(model, data, freeze_depth=depth, batch_size=8)
        per_run = (held_by_group([base.replace(seed=s) for s in range(4)])
                   - held_by_group([base.replace(seed=s) for s in range(2)])) / 2
        net = load_model(model, ["0", "1"])
        freeze(net, depth)
        trainable, total = count_parameters(net)
        assert per_run == pytest.approx(16 * trainable + 4 * total, rel=0.05), depth
        assert bytes_per_run(base) >= 0.97 * per_run, depth  # the rest is its data (labels, tokens): < 3 %


def test_the_prefix_cache_budget_is_kept_aside_before_runs_are_counted(model, monkeypatch):
    """The cache fills the device after the group size is chosen: its budget (--cache-device-gb) is not free."""
    config = quick_config(model, "unused")
    per_run = bytes_per_run(config)
    free = int(10.5 * per_run / run_group_module.MEMORY_HEADROOM)
    assert group_size(config, "cpu", free_bytes=free + 4 * per_run, reserved=4 * per_run) == 10
    assert group_size(config, "cpu", free_bytes=free, reserved=2 * free) == 1
    from ablations.runner import parallel_runs
    seen = []
    flags = {"engine": "auto", "device": "cpu", "compile": False, "max_parallel_runs": "auto", "exact_dropout": False}
    monkeypatch.setattr(run_group_module, "group_size", lambda *args, **kwargs: seen.append(kwargs) or 1)
    parallel_runs(Namespace(cache_device_gb=1.5, **flags), config)
    assert seen[0]["reserved"] == int(1.5 * 2**30)  # --cache-device-gb


def test_automatic_group_size_is_bounded_by_free_memory(model):
    config = quick_config(model, "unused")
    per_run = bytes_per_run(config)
    assert bytes_per_run(config.replace(freeze_depth=2)) < per_run < bytes_per_run(config.replace(max_length=64))
    assert group_size(config, "cpu", free_bytes=int(10.5 * per_run / run_group_module.MEMORY_HEADROOM)) == 10
    assert group_size(config, "cpu", free_bytes=per_run // 2) == 1
    assert group_size(config, "cpu", free_bytes=10**15) == run_group_module.MAX_GROUP


def test_the_memory_rule_counts_the_weights_a_run_trains_exactly_for_any_family(model, tmp_path):
    """Weights come from the model itself (built on the meta device), not from a formula of BERT's shapes: with
    every layer frozen no activations are kept, and what is left is 16 bytes per trainable parameter. Funnel has
    no intermediate_size (the old formula's AttributeError on CUDA, before any run). The run's own whole model (4
    bytes a weight, frozen or not) is counted too."""
    from core.model import count_parameters, freeze, load_model
    for folder in (model, str(save_tiny(tmp_path / "funnel", "funnel", layers=2))):
        config = quick_config(folder, "unused")
        net = load_model(folder, ["0", "1"])
        for depth in (0, 1, 2):
            freeze(net, depth)
            trainable, total = count_parameters(net)
            weights = 16 * trainable + 4 * total
            per_run = bytes_per_run(config.replace(freeze_depth=depth))
            assert per_run == weights if depth == 2 else per_run > weights  # activations of the trained layers


def test_a_captured_group_budgets_one_graph_pool_per_length_bucket(model):
    """Each bucket's graph keeps its pool: the captured rule holds one batch's activations at every bucket length
    up to max_length (the eager rule: at max_length only), so fewer runs fit the same memory."""
    from core.captured import buckets_for
    config = quick_config(model, "unused", max_length=128)
    frozen = config.replace(freeze_depth=2)  # every layer of the 2-layer model frozen: no activations to keep
    assert bytes_per_run(frozen, captured=True) == bytes_per_run(frozen)

    def rule(max_length, captured=False):
        return bytes_per_run(config.replace(max_length=max_length), captured)
    # Weights P do not depend on the length: eager(s) = P + act(s), captured(64) = P + act(32) + act(64).
    weights = rule(32) + rule(64) - rule(64, captured=True)
    assert buckets_for(128) == (32, 64, 128)
    assert rule(128, True) == pytest.approx(weights + (rule(32) - weights) + (rule(64) - weights) +
                                            (rule(128) - weights), abs=4)
    eager = rule(128)
    assert eager < rule(128, True) < 2 * eager
    free = int(10.5 * eager / run_group_module.MEMORY_HEADROOM)
    assert group_size(config, "cpu", free_bytes=free, captured=True) < group_size(config, "cpu", free_bytes=free)



def grid_argv(model, data, out, *extra) -> list[str]:
    return ["grid", "--model", model, "--dataset", data, "--schedulers", "linear", "--epochs", "1",
            "--learning-rate", "3e-3", "--precision", "fp32", "--max-length", "32", "--batch-size", "8",
            "--output-dir", str(out), "--no-progress", "--no-report", "--timing-repeats", "0",
            "--storage", f"sqlite:///{out}/grid.db", *extra]


def out_of_memory_above(size: int, monkeypatch, after_epoch: bool = False) -> list[int]:
    """Make a group of more than `size` runs raise CUDA's out-of-memory error (after its first epoch's callbacks
    where `after_epoch`); the sizes of the groups asked for, in order."""
    asked: list[int] = []

    def sized(configs, session, device, on_epoch=None, **kwargs):
        asked.append(len(configs))
        if len(configs) > size:
            if after_epoch:
                on_epoch[0]({"epoch": 1})
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run_group(configs, session, device, on_epoch=on_epoch, **kwargs)
    monkeypatch.setattr(run_group_module, "run_group", sized)
    return asked


def test_a_group_that_runs_out_of_memory_trains_again_in_halves_and_later_groups_stay_that_size(
        model, data, tmp_path, monkeypatch, capsys):
    """--max-parallel-runs 4 on a GPU that holds 2: the first group of 4 fails before any epoch ends, is trained
    again as two groups of 2, and the second depth's 4 runs go straight to groups of 2. Every run is claimed and
    stored once, COMPLETE, under its own trial; one line says what happened. Before, the 4 runs were each
    recorded as FAIL, and the next invocation failed them again the same way."""
    from ablations.grid import main
    asked = out_of_memory_above(2, monkeypatch)
    monkeypatch.setattr(sys, "argv", grid_argv(model, data, tmp_path, "--freeze-depths", "0,1", "--seeds", "4",
                                               "--max-parallel-runs", "4"))
    assert main() == 0
    assert asked == [4, 2, 2, 2, 2]
    assert capsys.readouterr().out.count("a group of 4 runs ran out of device memory: training groups of at most "
                                         "2 from here") == 1
    trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{tmp_path}/grid.db").get_trials()
    assert len(trials) == 8 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["record"]["engine"] for t in trials} == {"stacked (2 runs)"}
    assert sorted((t.params["freeze_depth"], t.params["seed"]) for t in trials) == \
        [(depth, seed) for depth in (0, 1) for seed in range(42, 46)]


def test_a_group_that_ran_out_of_memory_is_let_go_before_its_halves_train(model, data, monkeypatch):
    """The halves were trained inside the `except` block, where the error's traceback still held the failed group's
    frames and their tensors (and a stacked group with a captured step is a reference cycle): on a GPU the retry ran
    beside the memory of the group that did not fit. Now it is gone before the first half starts."""
    import weakref

    from ablations.runner import make_group_trainer

    class Group:  # stands in for a stacked group's device tensors, in a reference cycle as StackedRuns is
        def __init__(self):
            self.me = self
    alive = []

    def sized(configs, session, device, on_epoch=None, **kwargs):
        if alive:
            assert alive[0]() is None, "the failed group is still held while its halves train"
            return [RuntimeError("not trained")] * len(configs)
        failed = Group()
        alive.append(weakref.ref(failed))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(run_group_module, "run_group", sized)
    configs = [quick_config(model, data, seed=s) for s in range(4)]
    results = make_group_trainer(Namespace(device="cpu", exact_dropout=False), Session(), "stacked")(configs)
    assert len(results) == 4 and alive[0]() is None


def test_a_captured_group_lets_go_of_its_model_and_graphs_when_it_ends(model, data, monkeypatch):
    """A captured step holds its group's own step function, so the group (stacked weights, AdamW state, gradients,
    graphs and their pools) was a reference cycle that outlived `run_group` until Python's cycle collector ran: on a
    GPU the next group started beside it. It is let go as the group ends, the narrowed-away one included."""
    import weakref

    from conftest import GraphOnTheCpu
    from core.stacked import StackedRuns
    groups = []
    train_epoch = StackedRuns.train_epoch

    def noting(self, *args, **kwargs):
        groups.append((weakref.ref(self), weakref.ref(self.model)))
        return train_epoch(self, *args, **kwargs)
    monkeypatch.setattr(StackedRuns, "train_epoch", noting)
    configs = [quick_config(model, data, seed=0, epochs=1), quick_config(model, data, seed=1, epochs=2),
               quick_config(model, data, seed=2, epochs=2)]
    gc.collect()
    gc.disable()  # only reference counting frees anything here
    try:
        results = run_group(configs, Session(), "cpu", capture=GraphOnTheCpu)
        assert len(groups) == 2  # 3 runs, then the 2 of two epochs
        assert [stacked() for _, stacked in groups] == [None, None]
        assert all(group() is None or not vars(group()) for group, _ in groups)  # gone, or an empty shell
    finally:
        gc.enable()
    assert [r.engine for r in results] == ["captured (3 runs)"] * 3


def test_out_of_memory_after_an_epoch_ended_fails_the_group_as_before(model, data, monkeypatch):
    """Callbacks that have seen an epoch's results (the search's pruner) must not see it twice: such a group is
    not retried, and so is a group of one."""
    from ablations.runner import make_group_trainer
    configs = [quick_config(model, data, seed=s) for s in range(4)]
    asked = out_of_memory_above(2, monkeypatch, after_epoch=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        make_group_trainer(Namespace(device="cpu", exact_dropout=False), Session(), "stacked")(
            configs, [lambda entry: None] * 4)
    assert asked == [4]
    asked = out_of_memory_above(0, monkeypatch)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        make_group_trainer(Namespace(device="cpu", exact_dropout=False), Session(), "stacked")(configs[:1])
    assert asked == [1]



def graph_that_fits(runs: int):
    """A CPU stand-in for CUDA graphs (`conftest.GraphOnTheCpu`) whose capture runs out of device memory for a group
    of more than `runs` runs, as capture_end raising in its turn leaves it: the out-of-memory error as the context
    of another. Returns the class and the group sizes it captured."""
    from conftest import GraphOnTheCpu
    captured: list[int] = []

    class FitsOnly(GraphOnTheCpu):
        def _capture(self, static):
            size = static["labels"].shape[0]
            if size > runs:
                try:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                except torch.cuda.OutOfMemoryError:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            captured.append(size)
            return super()._capture(static)
    return FitsOnly, captured


def test_a_group_that_runs_out_of_memory_capturing_trains_again_in_halves_still_captured(model, data, monkeypatch,
                                                                                         capsys, caplog):
    """Capturing a group's step allocates its graph's memory pool: where the memory rule was wrong, the whole group
    went on eagerly (one step ≈ 25 ms of launches on an H100 instead of ≈ 3 ms replayed). Before its first epoch
    ends it is now trained again in halves, captured; each run's record as the run alone."""
    import core.captured
    from ablations.runner import make_group_trainer
    stand_in, captured = graph_that_fits(2)
    monkeypatch.setattr(core.captured, "CapturedStep", stand_in)
    configs = [quick_config(model, data, seed=s, epochs=1) for s in range(4)]
    alone = [run_group([c], Session(), "cpu")[0] for c in configs]
    with caplog.at_level("WARNING", logger="core.captured"):
        results = make_group_trainer(Namespace(device="cpu", exact_dropout=False), Session(), "captured")(configs)
    assert "a group of 4 runs ran out of device memory: training groups of at most 2" in capsys.readouterr().out
    assert not [r for r in caplog.records if "eagerly" in r.getMessage()]
    assert captured and set(captured) == {2}
    assert [r["engine"] for r in results] == ["captured (2 runs)"] * 4
    assert [r["validation_predictions"] for r in results] == [r.validation_predictions for r in alone]


def test_out_of_memory_capturing_goes_on_eagerly_after_an_epoch_ended_and_in_a_group_of_one(model, data, monkeypatch,
                                                                                           caplog):
    """A group whose epoch's results went out (to the pruner, say) is not trained again, and a group of one has no
    halves: there a capture that runs out of memory goes on eagerly, as before."""
    from core.stacked import StackedRuns
    stand_in, captured = graph_that_fits(0)
    with caplog.at_level("WARNING", logger="core.captured"):
        (alone,) = run_group([quick_config(model, data, seed=0, epochs=1)], Session(), "cpu", capture=stand_in)
    assert alone.engine == "stacked (1 run)" and captured == []
    assert [r.getMessage() for r in caplog.records] == ["training step runs eagerly: capturing it failed (CUDA error: "
                                                        "operation failed due to a previous error during capture)"]
    seen, train_epoch = [], StackedRuns.train_epoch

    def noting(self, epoch, *args, **kwargs):
        seen.append((epoch, self.captured.oom_raises))
        return train_epoch(self, epoch, *args, **kwargs)
    monkeypatch.setattr(StackedRuns, "train_epoch", noting)
    stand_in, captured = graph_that_fits(2)
    run_group([quick_config(model, data, seed=s, epochs=2) for s in range(2)], Session(), "cpu", capture=stand_in)
    assert seen == [(1, True), (2, False)]


def test_a_group_whose_later_capture_failed_is_recorded_as_captured_in_part(model, data):
    """After one capture failed (here the narrowed group's, once the 1-epoch run ended), the rest of the steps ran
    eagerly, yet the records said "captured (2 runs)" as soon as any step had replayed."""
    from conftest import GraphOnTheCpu

    class FailsAlone(GraphOnTheCpu):
        def _capture(self, static):
            if static["labels"].shape[0] == 1:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super()._capture(static)
    configs = [quick_config(model, data, seed=0, epochs=1), quick_config(model, data, seed=1, epochs=2)]
    results = run_group(configs, Session(), "cpu", capture=FailsAlone)
    assert [r.engine for r in results] == ["captured in part (2 runs)"] * 2
    results = run_group(configs, Session(), "cpu", capture=GraphOnTheCpu)
    assert [r.engine for r in results] == ["captured (2 runs)"] * 2


def test_recording_graphs_is_not_counted_in_a_groups_training_loop(model, data):
    """Capture is warm-up (issue 8): the seconds spent recording a group's graphs were in its train_loop_seconds."""
    import time as clock

    from conftest import GraphOnTheCpu

    class SlowCapture(GraphOnTheCpu):
        def _capture(self, static):
            clock.sleep(4.0)
            return super()._capture(static)
    configs = [quick_config(model, data, seed=s, epochs=1) for s in range(2)]
    results = run_group(configs, Session(), "cpu", capture=SlowCapture)
    assert [r.engine for r in results] == ["captured (2 runs)"] * 2
    assert all(r.train_loop_seconds < 2.0 for r in results), [r.train_loop_seconds for r in results]

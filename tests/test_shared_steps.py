"""Shared steps: a run that differs from an earlier one only in its schedule starts where their schedules part,
and ends exactly where it would have ended alone."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import quick_config

import core.train
from core import Session, shared_steps

SAME = ("accuracy", "loss", "f1", "best_epoch", "validation_predictions", "validation_correct")


def run(config, session: Session, **kwargs) -> dict:
    return core.train.run(config, session=session, **kwargs).to_dict()


def alone(config) -> dict:
    return run(config, Session(), device="cpu", progress=False)


@pytest.fixture
def final_weights(monkeypatch):
    """The trained weights of every run in the test, in order (the record does not carry them)."""
    models, load = [], Session.model
    monkeypatch.setattr(Session, "model", lambda *a, **k: models.append(load(*a, **k)) or models[-1])
    return lambda: [torch.cat([p.detach().flatten().float() for p in m.parameters()]) for m in models]


@pytest.mark.parametrize("depth, precision", [(0, "fp32"), (1, "fp32"), (1, "bf16")])
def test_a_sibling_resumes_bit_for_bit(tiny_bert, toy_data, depth, precision, final_weights):
    # 96 sentences, batch 16: 6 steps an epoch, 12 in all; warm-up ceil(0.3 * 12) = 4 steps, then both schedules
    # are at their peak at step 4: steps 0-4 are the same arithmetic for linear and cosine.
    linear = quick_config(tiny_bert, toy_data, epochs=2, warmup_ratio=0.3, freeze_depth=depth, precision=precision)
    cosine = linear.replace(scheduler="cosine")
    expected = alone(cosine)
    assert expected["shared_steps"] is None

    third = linear.replace(scheduler="constant_with_warmup")
    expected_third = alone(third)

    session = Session()
    first = run(linear, session, device="cpu", progress=False, siblings=[linear, cosine, third])
    assert first["shared_steps"] is None
    second = run(cosine, session, device="cpu", progress=False)
    last = run(third, session, device="cpu", progress=False)  # same snapshot, after `second` trained on from it
    for got, want in ((second, expected), (last, expected_third)):
        assert got["shared_steps"]["steps"] == 5 and got["shared_steps"]["from_run"] == linear.run_id
        # train_seconds charges every step at the timed cost, the shared ones too: what the run costs alone.
        assert got["timing"]["steps"] == want["timing"]["steps"] == 12
        for name in SAME:
            assert got[name] == want[name], name
        for mine, theirs in zip(got["history"], want["history"]):
            assert {k: v for k, v in mine.items() if k not in ("train_seconds", "loop_seconds")} == \
                   {k: v for k, v in theirs.items() if k not in ("train_seconds", "loop_seconds")}
    weights = final_weights()  # alone: cosine, third; shared: linear, cosine, third
    assert torch.equal(weights[3], weights[0]) and torch.equal(weights[4], weights[1])
    assert not torch.equal(weights[2], weights[0])
    # What the run costs alone: its own steps plus what the shared ones took when they ran.
    assert second["history"][0]["loop_seconds"] >= second["shared_steps"]["seconds"] > 0


def test_putting_a_sibling_at_the_snapshot_is_not_its_training_time(tiny_bert, toy_data, monkeypatch):
    """Without a timing pass train_seconds is the loop as it ran plus the shared steps as they ran: copying the
    snapshot back (weights, AdamW moments) is neither, as taking it is not the first run's."""
    linear = quick_config(tiny_bert, toy_data, warmup_ratio=0.3)
    cosine = linear.replace(scheduler="cosine")
    restore = shared_steps.SharedSteps.restore
    monkeypatch.setattr(shared_steps.SharedSteps, "restore", staticmethod(
        lambda *args: time.sleep(1.0) or restore(*args)))  # a model large enough for the copy to take a second
    session = Session(timing_repeats=0)
    run(linear, session, device="cpu", progress=False, siblings=[linear, cosine])
    second = run(cosine, session, device="cpu", progress=False)
    assert second["shared_steps"] and second["train_loop_seconds"] < 1.0 and second["wall_seconds"] > 1.0


def test_only_schedule_siblings_share(tiny_bert, toy_data):
    linear = quick_config(tiny_bert, toy_data, warmup_ratio=0.3)
    other_rate = linear.replace(scheduler="cosine", learning_rate=2e-3)
    other_seed = linear.replace(scheduler="cosine", seed=1)
    no_warmup = linear.replace(scheduler="constant")  # its first multiplier is 1, linear's 0: nothing in common
    session = Session()
    run(linear, session, device="cpu", progress=False, siblings=[other_rate, other_seed, no_warmup])
    assert not session.shared_steps.entries
    for config in (other_rate, other_seed, no_warmup):
        assert run(config, session, device="cpu", progress=False)["shared_steps"] is None


def test_common_steps_follow_the_schedules():
    linear = quick_config("m", "d", epochs=1, warmup_ratio=0.1)
    rates = {name: shared_steps.multipliers(linear.replace(scheduler=name), 125)
             for name in ("linear", "cosine", "polynomial", "constant_with_warmup", "constant")}
    assert shared_steps.common_steps(rates["linear"], rates["cosine"]) == 14  # 13 warm-up steps and the peak
    assert shared_steps.common_steps(rates["linear"], rates["polynomial"]) == 14  # decays to 1e-7 by its own formula
    assert shared_steps.common_steps(rates["cosine"], rates["constant_with_warmup"]) == 14
    assert shared_steps.common_steps(rates["linear"], rates["constant"]) == 0


def test_the_grid_trains_schedule_siblings_back_to_back_and_shares_their_steps(tiny_bert, toy_data, tmp_path):
    from ablations.cells import run_cells
    from ablations.space import Grid
    from ablations.ledger import Ledger, open_study
    from ablations.storage import load_runs, open_storage
    storage = open_storage(f"sqlite:///{tmp_path}/grid.db", heartbeat_seconds=1)
    base = quick_config(tiny_bert, toy_data, warmup_ratio=0.3)
    configs = Grid((0, 1), ("linear", "cosine"), (1,), (0, 1)).configs(base)
    session = Session()
    run_cells(configs, open_study(storage, "grid"), Ledger(storage),
              lambda c, siblings: run(c, session, progress=False, siblings=siblings), progress=False)
    records = {r["record"]["run_id"]: r["record"] for r in load_runs(f"sqlite:///{tmp_path}/grid.db")}
    assert len(records) == 8
    for config in configs:  # of each (depth, seed) pair, the second starts from the first's common steps
        sibling = config.replace(scheduler="cosine" if config.scheduler == "linear" else "linear")
        pair = [records[config.run_id]["shared_steps"], records[sibling.run_id]["shared_steps"]]
        assert sorted(map(bool, pair)) == [False, True]
        shared = next(p for p in pair if p)
        assert shared["steps"] == 3 and shared["from_run"] in (config.run_id, sibling.run_id)
    resumed = next(c for c in configs if records[c.run_id]["shared_steps"])
    assert alone(resumed)["validation_correct"] == records[resumed.run_id]["validation_correct"]

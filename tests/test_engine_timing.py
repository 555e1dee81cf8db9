"""`--step-times` (core.engine_timing) times what its rows say: training steps, on the named device, and a contender
that could not be built is a row without a time, not a failed process."""
from __future__ import annotations

import torch

import core.engine_timing as engine_timing
from core.model import device_name

SIZES = dict(length=12, steps=1, warmup=1, rounds=1, device="cpu")


def test_every_contender_times_a_training_step_with_dropout_on(tiny_bert, monkeypatch):
    """from_pretrained leaves a model in eval mode, and the contenders were timed so: steps without dropout, which
    no run trains with (core.train and StackedRuns.train_epoch switch to train mode first)."""
    modes = []
    forward = torch.nn.Dropout.forward

    def noting(self, x):
        modes.append(self.training)
        return forward(self, x)
    monkeypatch.setattr(torch.nn.Dropout, "forward", noting)
    rows = engine_timing.step_times(tiny_bert, [1, 2], [0, 1], **SIZES)
    assert [r["engine"] for r in rows] == ["eager", "stacked N=1", "stacked N=2"] * 2
    assert modes and all(modes), f"{modes.count(False)} of {len(modes)} dropout calls in eval mode"


def test_every_row_names_the_device_and_torch_it_ran_on(tiny_bert):
    """A row said only "cuda": the figures must name the card (an H100 and an H200 are both "cuda")."""
    rows = engine_timing.step_times(tiny_bert, [1], [0], **SIZES)
    assert {r["device_name"] for r in rows} == {device_name(torch.device("cpu"))}
    assert {r["torch"] for r in rows} == {torch.__version__}


def test_a_contender_that_does_not_fit_in_memory_is_a_row_without_a_time(tiny_bert, monkeypatch):
    """N = 56 where the card's memory does not hold it: the out-of-memory error ended the process, and with it the
    rows of every contender that did fit (eager, the smaller groups)."""
    build = engine_timing._stacked

    def no_room_for_two(pristine, depth, config, runs, *args):
        if runs == 2:
            torch.empty(1)  # something allocated first, as a real group would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(pristine, depth, config, runs, *args)
    monkeypatch.setattr(engine_timing, "_stacked", no_room_for_two)
    rows = {r["engine"]: r for r in engine_timing.step_times(tiny_bert, [1, 2], [0], **SIZES)}
    assert rows["eager"]["ms_per_run_step"] > 0 and rows["stacked N=1"]["ms_per_run_step"] > 0
    assert rows["stacked N=2"]["ms_per_run_step"] is None and rows["stacked N=2"]["vs_eager"] is None
    assert rows["stacked N=2"]["not_timed"].startswith("out of device memory: 2 run(s) did not fit")

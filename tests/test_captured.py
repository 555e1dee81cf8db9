"""The captured step's CPU-side logic: buckets, static buffers, the schedule as a tensor, the eager fallback."""
from __future__ import annotations

import logging
import signal
import sys

import numpy as np
import pytest
import torch

from core.captured import (
    CapturedStep,
    LearningRates,
    bucket_for,
    buckets_for,
    fill_static,
    probe_capture,
    resolve_engine,
)
from core.errors import UsageError
from core.stacked import learning_rate_table, pad_and_stack
from conftest import GraphOnTheCpu, quick_config


def test_a_batch_goes_to_the_shortest_bucket_that_holds_it():
    buckets = buckets_for(100)
    assert buckets == (32, 64, 100)
    assert [bucket_for(n, buckets) for n in (1, 32, 33, 64, 65, 100)] == [32, 32, 64, 64, 100, 100]
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_for(101, buckets)


def test_batches_are_padded_into_the_same_static_buffers():
    first = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    inputs, labels, weights = pad_and_stack([first], [torch.tensor([1, 0])], pad_id=0, rows=4, length=8)
    static = {**{k: v.clone() for k, v in inputs.items()}, "labels": labels.clone(), "weights": weights.clone()}
    storage = static["input_ids"].data_ptr()
    second = {"input_ids": torch.tensor([[11, 12]]), "attention_mask": torch.tensor([[1, 1]])}
    inputs, labels, weights = pad_and_stack([second], [torch.tensor([1])], pad_id=3, rows=4, length=8)
    fill_static(static, {**inputs, "labels": labels, "weights": weights})
    assert static["input_ids"].data_ptr() == storage  # a replayed graph reads these very buffers
    assert static["input_ids"].tolist() == [[11, 12, 3, 3, 3, 3, 3, 3]] + [[3] * 8] * 3
    assert static["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]] + [[1] + [0] * 7] * 3
    assert static["weights"].tolist() == [[1, 0, 0, 0]]
    too_long = {**inputs, "input_ids": torch.zeros(4, 9, dtype=torch.long)}
    with pytest.raises(ValueError, match="pad the batch to the bucket"):
        fill_static(static, {**too_long, "labels": labels, "weights": weights})


def test_the_schedule_advances_on_the_device_as_the_scheduler_would(tiny_bert, toy_data):
    runs = [quick_config(tiny_bert, toy_data, scheduler="linear", warmup_ratio=0.25, learning_rate=1e-3),
            quick_config(tiny_bert, toy_data, scheduler="cosine", warmup_ratio=0.0, learning_rate=5e-4)]
    table = learning_rate_table(runs, steps_per_epoch=8)
    assert table[0].tolist() == [0.0, 5e-4] and table[2, 0] == pytest.approx(1e-3)
    rates = LearningRates(table, "cpu")
    seen = []
    for _ in range(10):  # past the end the last rate stays
        seen.append([float(v) for v in rates.views])
        rates.advance()
    assert np.allclose(seen[:8], table) and seen[8] == seen[9] == table[-1].tolist()


def counting_body():
    seen = []

    def body(static):
        seen.append(static["x"].clone())
        return static["x"].sum()
    return body, seen


def test_each_step_runs_once_warm_up_then_one_capture_per_bucket():
    body, seen = counting_body()
    step = GraphOnTheCpu(body, "cpu", enabled=True, warmup=2)
    values = [torch.full((2,), float(i)) for i in range(6)]
    losses = [float(step(32 if i < 4 else 64, {"x": v})) for i, v in enumerate(values)]
    assert losses == [2.0 * i for i in range(6)]  # every step saw its own batch, through the static buffer
    assert [float(s[0]) for s in seen] == list(range(6))
    assert step.captures == 1 and set(step.static) == {32, 64}  # bucket 64 is still warming up


def test_without_cuda_the_step_runs_eagerly_with_one_log_line(caplog):
    body, seen = counting_body()
    with caplog.at_level(logging.WARNING, logger="core.captured"):
        step = CapturedStep(body, "cpu", enabled=True)
        for i in range(5):
            step(32, {"x": torch.full((2,), float(i))})
    assert len(seen) == 5
    assert [r.getMessage() for r in caplog.records] == ["training step runs eagerly: capture needs CUDA"]


def test_a_failed_capture_falls_back_to_eager_with_one_log_line(caplog):
    class FailingCapture(GraphOnTheCpu):
        def _capture(self, static):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    body, seen = counting_body()
    resets = []
    step = FailingCapture(body, "cpu", enabled=True, warmup=1, reset=lambda: resets.append(len(seen)))
    with caplog.at_level(logging.WARNING, logger="core.captured"):
        losses = [float(step(32, {"x": torch.full((1,), float(i))})) for i in range(4)]
    assert losses == [0.0, 1.0, 2.0, 3.0] and len(seen) == 4  # no step lost or repeated
    assert resets == [1]  # what the aborted capture left is dropped before the step runs eagerly
    assert [r.getMessage() for r in caplog.records] == [
        "training step runs eagerly: capturing it failed (operation not permitted when stream is capturing)"]


def test_a_capture_error_without_a_message_still_falls_back_to_eager(caplog):
    """The fallback's log line took the message's first line: an error with an empty message (IndexError) ended the
    run instead of going on eagerly."""
    class SilentFailure(GraphOnTheCpu):
        def _capture(self, static):
            raise RuntimeError()

    body, seen = counting_body()
    step = SilentFailure(body, "cpu", enabled=True, warmup=1)
    with caplog.at_level(logging.WARNING, logger="core.captured"):
        losses = [float(step(32, {"x": torch.full((1,), float(i))})) for i in range(3)]
    assert losses == [0.0, 1.0, 2.0] and step.why == "capturing it failed (RuntimeError)"
    assert [r.getMessage() for r in caplog.records] == [
        "training step runs eagerly: capturing it failed (RuntimeError)"]


def test_step_times_never_times_an_uncaptured_step_as_captured(tiny_bert, monkeypatch, capsys):
    """A captured contender whose capture failed (or could not run) fell back to the eager stacked step and was still
    timed and reported as "captured N=…": its row now says why and has no time; a real capture is timed as before."""
    import sys

    import core.engine_timing as engine_timing
    from ablations import benchmark
    from conftest import GraphOnTheCpu
    sizes = dict(length=12, steps=1, warmup=1, rounds=1, device="cpu", capture=True)
    rows = {r["engine"]: r for r in engine_timing.step_times(tiny_bert, [1], [0], **sizes)}
    assert rows["captured N=1"]["ms_per_run_step"] is None and rows["captured N=1"]["vs_eager"] is None
    assert rows["captured N=1"]["not_timed"] == "not captured: capture needs CUDA"
    assert rows["stacked N=1"]["ms_per_run_step"] > 0
    real = engine_timing.step_times
    monkeypatch.setattr(engine_timing, "step_times", lambda *a, **k: real(*a, **k, capture=True))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--step-times", "--model", tiny_bert, "--runs", "1",
                                      "--freeze-depths", "0", "--steps", "1", "--rounds", "1", "--length", "12"])
    assert benchmark.main() == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "captured N=1" in line)
    assert line.split() == ["0", "captured", "N=1", "—", "—", "not", "captured:", "capture", "needs", "CUDA"]
    monkeypatch.setattr(engine_timing, "CapturedStep", GraphOnTheCpu)  # a capture that works
    rows = {r["engine"]: r for r in real(tiny_bert, [1], [0], **sizes)}
    assert rows["captured N=1"]["ms_per_run_step"] > 0 and "not_timed" not in rows["captured N=1"]


def test_a_probe_that_crashes_answers_no_and_the_parent_lives_on():
    crash = (sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    ok, why = probe_capture("some-model", 32, "cuda", command=crash)
    assert not ok and f"crashed (signal {int(signal.SIGSEGV)})" in why
    ok, why = probe_capture("some-model", 32, "cuda", command=(sys.executable, "-c", "raise SystemExit('no graph')"))
    assert not ok and why.endswith("no graph")
    assert probe_capture("some-model", 32, "cuda", command=(sys.executable, "-c", "pass")) == (True, "")
    assert probe_capture("some-model", 32, "cpu") == (False, "capture needs CUDA")


def test_engine_switch_is_eager_on_the_cpu_and_refuses_unknown_names():
    assert resolve_engine("auto", "cpu") == "eager"
    assert resolve_engine("stacked", "cpu") == "stacked"
    with pytest.raises(UsageError, match="--engine 'graph' is unknown"):
        resolve_engine("graph", "cpu")


def test_benchmark_step_times_runs_on_the_cpu_with_small_groups(tiny_bert, tmp_path, monkeypatch, capsys):
    import json

    from ablations import benchmark
    out = tmp_path / "steps.json"
    monkeypatch.setattr(sys, "argv", ["benchmark", "--step-times", "--model", tiny_bert, "--runs", "1,2",
                                      "--freeze-depths", "0,1", "--steps", "1", "--rounds", "1", "--length", "12",
                                      "--output", str(out)])
    assert benchmark.main() == 0
    rows = json.loads(out.read_text())["step_times"]
    assert [(r["depth"], r["engine"]) for r in rows] == [
        (d, e) for d in (0, 1) for e in ("eager", "stacked N=1", "stacked N=2")]  # no capture without CUDA
    assert all(r["ms_per_run_step"] > 0 and r["device"] == "cpu" for r in rows)
    assert [r["vs_eager"] for r in rows if r["engine"] == "eager"] == [1.0, 1.0]
    out = capsys.readouterr().out
    assert "stacked N=2" in out and "12 tokens, 1 round)" in out, out  # was "median of 1 rounds"


def test_benchmark_step_times_refuses_bad_sizes_in_one_line(tiny_bert, monkeypatch):
    from ablations import benchmark
    monkeypatch.setattr(sys, "argv", ["benchmark", "--step-times", "--model", tiny_bert, "--runs", "0,2"])
    with pytest.raises(UsageError, match="--runs '0,2' is out of range"):
        benchmark.main()


def test_benchmark_step_times_refuses_a_model_that_does_not_stack_in_one_line(tmp_path, monkeypatch):
    """SqueezeBERT trains convolutions: stacking it raised ValueError deep in StackedRuns (a traceback)."""
    from ablations import benchmark
    from conftest import save_tiny
    folder = str(save_tiny(tmp_path / "squeezebert", "squeezebert", layers=2))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--step-times", "--model", folder, "--runs", "2",
                                      "--freeze-depths", "0", "--steps", "1", "--rounds", "1", "--length", "12",
                                      "--output", str(tmp_path / "steps.json")])
    with pytest.raises(UsageError, match="at freeze depth 0 cannot be stacked .it trains Conv1d"):
        benchmark.main()
    assert not (tmp_path / "steps.json").exists()


def test_the_rate_table_is_what_each_schedule_sets_step_by_step(tiny_bert, toy_data):
    """learning_rate_table reads the schedules' lambdas in closed form: the very rates a stepped scheduler sets,
    for every schedule the project accepts."""
    from transformers import get_scheduler

    from core.config import step_schedulers
    configs = [quick_config(tiny_bert, toy_data, scheduler=name, warmup_ratio=0.2, learning_rate=3e-4)
               for name in step_schedulers()]
    table = learning_rate_table(configs, steps_per_epoch=23)
    for run, config in enumerate(configs):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
        schedule = get_scheduler(config.scheduler, optimizer, num_warmup_steps=5, num_training_steps=23)
        stepped = []
        for _ in range(23):
            stepped.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert table[:, run].tolist() == stepped, config.scheduler

"""Precision: bf16 where the hardware runs it natively, fp16 with loss scaling on older CUDA cards (core.device)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import quick_config, save_tiny, write_toy_dataset
from core.device import loss_scaler, make_optimizer, make_schedule, precision_for
from core.prepare import prepare
from core.session import Session
from core.shared_steps import SharedSteps
from core.timing import preserved
from core.train import train_step


def card(major: int):
    """torch.cuda.is_bf16_supported on a card of compute capability `major`.x: natively from Ampere (8) on; a
    Turing T4 (7.5) or Volta V100 (7.0) creates bf16 tensors, so torch says yes there unless asked for native."""
    return lambda including_emulation=True: major >= 8 or including_emulation


@pytest.mark.parametrize("major, expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_is_bf16_only_where_a_cuda_card_runs_it_natively(monkeypatch, major, expected):
    """On a T4 (Colab's card) torch emulates bf16, slower than fp32; its tensor cores run fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", card(major))
    assert precision_for("auto", torch.device("cuda")) == expected
    assert precision_for("fp32", torch.device("cuda")) == "fp32"  # a precision asked for is kept
    assert precision_for("fp16", torch.device("cpu")) == "fp16"


def test_only_fp16_scales_the_loss():
    assert loss_scaler("fp16", torch.device("cpu")).is_enabled()
    assert not any(loss_scaler(p, torch.device("cpu")).is_enabled() for p in ("bf16", "fp32"))


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16")
    model = str(save_tiny(folder / "model", "bert", layers=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0))
    data = str(write_toy_dataset(folder / "data", train=140, validation=48))
    return quick_config(model, data, precision="fp16", batch_size=4, dev_size=0)


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_its_scale_backs_off(fp16_run):
    """A scale of 2^100 overflows fp16's backward pass (its largest value is 65504): the step must leave the
    weights and AdamW's step count as they were and halve the scale; the next step, at 2^16, trains."""
    p = prepare(fp16_run, Session(timing_repeats=0), "cpu", False, True)
    assert p.scaler.is_enabled() and p.precision == "fp16"
    optimizer = make_optimizer(p.model, fp16_run, p.device)
    scheduler = make_schedule(optimizer, fp16_run, 12)
    p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = [w.detach().clone() for w in p.params]
    loss = train_step(p, p.model, np.arange(8), optimizer, scheduler)
    assert torch.isfinite(loss)  # the loss itself is fine: only the scaled gradients overflow
    assert all(torch.equal(w, b) for w, b in zip(p.params, before)), "an overflowing step changed the weights"
    assert p.scaler.get_scale() == 2.0 ** 99
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())
    p.scaler = loss_scaler("fp16", p.device)
    train_step(p, p.model, np.arange(8, 16), optimizer, scheduler)
    assert not all(torch.equal(w, b) for w, b in zip(p.params, before))
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())


def test_a_timing_pass_and_a_shared_step_snapshot_keep_the_loss_scale(fp16_run):
    """Timing steps are put back, the loss scale with them; a sibling resumed from a snapshot goes on at the
    scale the steps it takes over reached."""
    p = prepare(fp16_run, Session(timing_repeats=0), "cpu", False, True)
    optimizer = make_optimizer(p.model, fp16_run, p.device)
    scheduler = make_schedule(optimizer, fp16_run, 12)
    p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    with preserved(p.params, optimizer, scheduler, p.device, p.scaler):
        train_step(p, p.model, np.arange(8), optimizer, scheduler)  # overflows: the scale halves
        assert p.scaler.get_scale() == 2.0 ** 99
    assert p.scaler.get_scale() == 2.0 ** 100

    train_step(p, p.model, np.arange(8), optimizer, scheduler)
    store = SharedSteps()
    store.take("key", (1.0,), "run", p.params, optimizer, p.device, torch.zeros(()), 0.0, p.scaler)
    resumed = loss_scaler("fp16", p.device)
    store.restore(store.find("key", (1.0, 1.0)), p.params, optimizer, scheduler, p.device, torch.zeros(()), resumed)
    assert resumed.get_scale() == 2.0 ** 99


def test_an_fp16_run_and_an_fp16_group_learn_alike(fp16_run):
    """End to end on the CPU (fp16 autocast runs there too): a solo run and the same runs trained as one stacked
    group, each with its loss scaled, learn the toy task alike: each run's training losses within fp16 rounding of
    the solo run's, its accuracy within noise. (Without dropout: a group draws other masks than a solo run.)"""
    from core.group import train_group
    from core.train import run
    group = [fp16_run.replace(seed=s, epochs=2, learning_rate=3e-3, weight_decay=0.0) for s in (0, 1)]
    session = Session(timing_repeats=0)
    together = train_group([prepare(c, session, "cpu", False, True) for c in group], session, [None] * 2)
    for config, training in zip(group, together):
        record = run(config, device="cpu", progress=False)
        assert record.precision == "fp16"
        assert training.engine == "stacked (2 runs)"
        group_losses = [h["train_loss"] for h in training.history]
        assert group_losses == pytest.approx([h["train_loss"] for h in record.history], rel=5e-3)  # measured: 2e-4
        assert abs(record.accuracy - training.best["metrics"]["accuracy"]) <= 3 / 48  # a few near-tie rows may flip
        assert record.accuracy > 0.85, "the fp16 run did not learn the toy task"

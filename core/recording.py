"""`make_record`: a finished run (its prepared data and model, its epochs, its test score) as its `RunRecord`.

Kept out of `core/record.py`, which imports neither torch nor transformers so that light tools can read records."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from core import metrics as run_metrics
from core.model import device_name
from core.record import RunRecord, now

if TYPE_CHECKING:
    from core.session import Session
    from core.prepare import Prepared
    from core.timing import StepTiming
    from core.train import Training


def make_record(p: Prepared, training: Training, test_metrics: dict | None, session: Session, compile: bool,
                wall_start: float) -> RunRecord:
    config, best, splits = p.config, training.best, p.splits
    train_tokens = int(p.train.lengths.sum()) * len(training.history)
    prefix_train = p.prefix["seconds"].get("train", 0.0) if p.cached else 0.0
    prefix_eval = sum(v for k, v in p.prefix["seconds"].items() if k != "train") if p.cached else 0.0
    predictions = best["predictions"]
    evaluated = session.metric("accuracy") is not None and session.metric("f1") is not None
    if training.timing and p.cached and training.timing.prefix_seconds is not None:
        # Steps and prefix build as timed together, alone and quiet (`StepTiming.prefix_seconds`), not this run's
        # own build under whatever load it met: one moment for both parts of what the run costs alone
        alone = training.timing.record(training.steps, extra=charged_prefix_seconds(p, training.timing))
    elif training.timing:  # what the run costs alone: its steps at the timed per-step cost, plus its prefix build
        alone = training.timing.record(training.steps, extra=prefix_train, extra_contention=p.prefix.get("contended"))
    else:
        alone = {"train_seconds": round(training.train_seconds + prefix_train, 3)}
    return RunRecord(
        run_id=config.run_id, config=config.to_dict(),
        accuracy=best["metrics"]["accuracy"], f1=best["metrics"]["f1"], loss=best["metrics"]["loss"],
        dev_accuracy=best["dev"]["accuracy"] if best["dev"] else None,
        dev_f1=best["dev"]["f1"] if best["dev"] else None, dev_loss=best["dev"]["loss"] if best["dev"] else None,
        best_epoch=best["epoch"], selected_by=config.select_by, selected_on="dev" if best["dev"] else "validation",
        history=training.history,
        stopped_early=training.stopped,
        test_accuracy=test_metrics["accuracy"] if test_metrics else None,
        test_f1=test_metrics["f1"] if test_metrics else None,
        **alone,
        train_loop_seconds=round(training.train_seconds, 3),
        eval_seconds=round(training.eval_seconds + prefix_eval, 3),
        wall_seconds=round(time.perf_counter() - wall_start, 3),
        prefix_cache=p.prefix, shared_steps=training.sharing.record(),
        trainable_params=p.trainable, total_params=p.total,
        train_samples=len(p.train), dev_samples=len(splits["dev"]) if "dev" in splits else 0,
        validation_samples=len(splits["validation"]),
        test_samples=len(splits["test"]) if "test" in splits else 0,
        num_labels=p.data.num_labels, label_names=[str(n) for n in p.data.label_names],
        text_columns=list(p.data.text_columns), label_column=p.data.label_column,
        tokens_per_second=round(train_tokens / training.train_seconds, 1) if training.train_seconds else None,
        peak_memory_mb=round(run_metrics.peak_memory_mb(p.device), 1),
        peak_memory_scope="run (CUDA allocator)" if p.device.type == "cuda" else "process (max RSS)",
        device=device_name(p.device), precision=p.precision, compiled=compile, engine=training.engine,
        metrics_backend="evaluate" if evaluated else "numpy (evaluate offline)",
        versions=run_metrics.versions(), finished_at=now(),
        validation_predictions=[int(x) for x in predictions],
        validation_correct="".join("1" if x == y else "0" for x, y in zip(predictions, splits["validation"].labels)),
        validation_labels=[int(y) for y in splits["validation"].labels],
    )


def charged_prefix_seconds(p: Prepared, step_timing: StepTiming | None) -> float:
    """The frozen-prefix build a run's train_seconds includes: the quiet build kept with its step timing where there
    is one (both parts of the time from one moment), else its own (as measured when built, even if reused)."""
    if not p.cached:
        return 0.0
    if step_timing is not None and step_timing.prefix_seconds is not None:
        return step_timing.prefix_seconds
    return p.prefix["seconds"].get("train", 0.0)

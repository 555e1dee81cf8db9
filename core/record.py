"""Metrics and the run record: what one run reports about itself."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
from pathlib import Path

import numpy as np
import torch

_METRICS: dict[str, object] = {}


def _evaluate_metric(name: str):
    """`evaluate`'s metric when it can be loaded (it comes from the Hub), else None; tried once per process."""
    if name not in _METRICS:
        # `evaluate` has an offline switch of its own: without it an offline process spends seconds retrying
        # the Hub for every metric even when the user said HF_HUB_OFFLINE=1.
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
        try:
            import evaluate
            _METRICS[name] = evaluate.load(name)
        except Exception:  # offline: evaluate fetches metric scripts from the Hub
            _METRICS[name] = None
    return _METRICS[name]


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 through `evaluate`, with the same definitions computed locally when offline."""
    accuracy_metric, f1_metric = _evaluate_metric("accuracy"), _evaluate_metric("f1")
    if accuracy_metric is not None and f1_metric is not None:
        accuracy = accuracy_metric.compute(predictions=predictions, references=labels)["accuracy"]
        f1 = f1_metric.compute(predictions=predictions, references=labels, average="macro",
                               labels=list(range(num_labels)))["f1"]
        return {"accuracy": float(accuracy), "f1": float(f1)}
    accuracy = float((predictions == labels).mean()) if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": accuracy, "f1": float(np.mean(f1s))}


def metrics_backend() -> str:
    return "evaluate" if _METRICS.get("accuracy") is not None else "numpy (evaluate offline)"


def versions() -> dict[str, str]:
    import datasets
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by this run. CPU: the process's peak resident memory (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_record(record: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def summary(record: dict) -> str:
    c = record["config"]
    test = f", test {record['test_accuracy']:.4f}" if record.get("test_accuracy") is not None else ""
    return (f"run {record['run_id']}: freeze {c['freeze_depth']}, {c['scheduler']}, {c['epochs']} epoch(s), "
            f"seed {c['seed']} -> validation accuracy {record['accuracy']:.4f} (epoch {record['best_epoch']}"
            f"{test}); train {record['train_seconds']:.1f}s, {record['trainable_params']:,} of "
            f"{record['total_params']:,} parameters trainable, {record['train_samples']:,} train examples, "
            f"{record['device']}")

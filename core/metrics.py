"""Metrics and facts about the machine that a run record reports: accuracy/F1, versions, peak memory."""
from __future__ import annotations

import os
import platform
import resource

import numpy as np
import torch


def load_metric(name: str):
    """`evaluate`'s metric when it can be loaded (it comes from the Hub), else None."""
    # `evaluate` has an offline switch of its own: without it an offline process spends seconds retrying
    # the Hub for every metric even when the user said HF_HUB_OFFLINE=1.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    try:
        import evaluate
        return evaluate.load(name)
    except Exception:  # offline: evaluate fetches metric scripts from the Hub
        return None


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int,
                           accuracy_metric=None, f1_metric=None) -> dict[str, float]:
    """Accuracy and macro-F1 through `evaluate` when its metrics are given, else the same definitions locally.

    Macro-F1 averages the classes that the examples hold or the model predicts (scikit-learn's macro average
    without `labels`): a class of the label set that a split lacks and no prediction names has no F1, and
    counting it as 0 held a model right on every example of a validation set without it to (k − 1)/k."""
    if accuracy_metric is not None and f1_metric is not None:
        accuracy = accuracy_metric.compute(predictions=predictions, references=labels)["accuracy"]
        f1 = f1_metric.compute(predictions=predictions, references=labels, average="macro")["f1"]
        return {"accuracy": float(accuracy), "f1": float(f1)}
    accuracy = float((predictions == labels).mean()) if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        if denominator:
            f1s.append(2 * tp / denominator)
    return {"accuracy": accuracy, "f1": float(np.mean(f1s)) if f1s else 0.0}


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

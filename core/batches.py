"""Which rows a run uses and how it batches them: the dev split, the seeded subsample, training batches grouped
by length and inference batches sorted by it."""
from __future__ import annotations

import numpy as np
import torch

from core.errors import UsageError

DEV_SEED = 0          # fixed, not the run seed: every run of a study must be chosen on the same dev rows
DEV_FRACTION, DEV_MAX_ROWS = 0.1, 1000  # the default dev split: 10 % of the training rows, at most 1,000


def dev_rows_count(n: int, dev_size: float | None) -> int:
    """Rows the dev split takes from `n` training rows: a count, a fraction, 0, or (None) the default."""
    if dev_size is None:
        return min(round(DEV_FRACTION * n), DEV_MAX_ROWS)
    size = round(dev_size * n) if isinstance(dev_size, float) else int(dev_size)
    if size >= n:
        raise UsageError(f"--dev-size {dev_size} leaves no training rows: the train split has {n:,}; use fewer rows "
                         "or a smaller fraction")
    return size


def carve_dev(labels: np.ndarray, dev_size: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(dev rows, the remaining training rows), both sorted: a stratified sample with a fixed seed.

    Each label gets its share of the dev rows (largest remainders round), so the dev split has the training
    data's label balance; the run's own subsample (`max_train_samples`) is then drawn from the remaining rows."""
    n = len(labels)
    size = dev_rows_count(n, dev_size)
    if size == 0:
        return np.arange(0), np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(-(exact - shares), kind="stable")[:size - shares.sum()]] += 1
    rng = np.random.default_rng(DEV_SEED)
    dev = np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:share]
                          for label, share in zip(classes, shares)])
    keep = np.ones(n, dtype=bool)
    keep[dev] = False
    return np.sort(dev), np.flatnonzero(keep)


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Seeded subsample, the same rows `Dataset.shuffle(seed).select(range(limit))` would pick."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:limit]


def eval_tokens(device) -> int:
    """Tokens per inference batch: large on a GPU, cache-friendly on a CPU."""
    return 32768 if torch.device(device).type == "cuda" else 4096


def sorted_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Inference batches of similar length, longest first, each holding about `tokens_per_batch` tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, tokens_per_batch // max(1, int(lengths[order[start]])))
        batches.append(order[start:start + size])
        start += size
    return batches


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Seeded training batches of similar length: shuffle, sort within chunks of 50 batches, shuffle batches.

    Little padding (so little wasted compute) while every epoch still sees a fresh random order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]

"""One run, top to bottom: check, load, freeze, (cache the frozen prefix), train, evaluate, record."""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from core import record as rec
from core import shared_steps
from core.config import RunConfig
from core.data import (
    check_dataset,
    eval_tokens,
    length_grouped_batches,
    load_text_data,
    sorted_batches,
    subsample,
    to_device,
)
from core.host_memory import reuse_freed_memory
from core.model import (
    check_freeze_depth,
    count_parameters,
    decay_groups,
    device_name,
    freeze,
    frozen_modules,
    load_model,
    load_tokenizer,
    model_config,
    num_layers,
)
from core.prefix_cache import layer_view, prefix_states

EpochCallback = Callable[[dict], "str | None"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_for(precision: str, device: torch.device) -> str:
    """'auto' means bf16 autocast where the hardware runs it natively (CUDA; CPUs with AVX512-BF16/AMX)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    return "fp32"


def check(config: RunConfig):
    """Every check that needs no weights: run before anything heavy is loaded."""
    check_dataset(config.dataset)
    model_cfg = model_config(config.model)
    check_freeze_depth(config.freeze_depth, model_cfg, config.model)
    return model_cfg


def run(config: RunConfig, device: str | torch.device | None = None, progress: bool = True,
        on_epoch: EpochCallback | None = None, use_prefix_cache: bool = True, compile: bool = False,
        siblings: Iterable[RunConfig] = ()) -> dict:
    """Train one config and return its record. `on_epoch(entry)` may return a reason to stop early.

    `compile=True` runs the model through `torch.compile` (dynamic shapes: batches vary in length); it pays
    off on long GPU runs, rarely on short CPU ones, and does not change what is computed.
    `siblings`: configs this process may train next; where one differs only in its schedule, the steps both
    take alike are kept for it (`core.shared_steps`), and this run itself starts from such steps if kept."""
    wall_start = time.perf_counter()
    model_cfg = check(config)
    device = torch.device(device) if device else default_device()
    precision = precision_for(config.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        reuse_freed_memory()  # large per-step tensors would otherwise be page-faulted in every step

    tokenizer = load_tokenizer(config.model)
    data = load_text_data(config.dataset, tokenizer, config.text_column, config.label_column, config.max_length)
    rows = subsample(len(data.splits["train"]), config.max_train_samples, config.seed)
    splits = {name: split.subset(rows if name == "train" else None, progress)  # tokenizes only rows in use
              for name, split in data.splits.items()}

    set_seed(config.seed)
    model = load_model(config.model, data.label_names).to(device)
    backbone = freeze(model, config.freeze_depth)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    depth, layers = config.freeze_depth, num_layers(model_cfg)

    # Stage 1, the frozen prefix: with depth k > 0 its outputs are computed once and the loop trains on them.
    cached = depth > 0 and use_prefix_cache and not config.frozen_dropout
    sources, prefix = dict(splits), {"cached": cached, "seconds": {}, "reused": {}}
    if cached:
        rows_key = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        for name, split in splits.items():
            key = (config.model, data.fingerprint, name, rows_key if name == "train" else "all", precision)
            states, reused = prefix_states(model, backbone, split, key, depth, data.pad_id, device, autocast)
            sources[name] = states
            prefix["seconds"][name], prefix["reused"][name] = round(states.build_seconds, 3), reused

    def inputs(name: str, indices) -> dict[str, torch.Tensor]:
        if cached:
            return sources[name].batch(indices, device)
        return sources[name].batch(indices, data.pad_id, device)

    train = splits["train"]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = make_optimizer(model, config, device)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    labels = {name: torch.as_tensor(split.labels) for name, split in splits.items()}
    view = layer_view(backbone, depth, layers, skip_embeddings=True) if cached else contextlib.nullcontext()

    # Steps shared with siblings that differ only in their schedule (core.shared_steps).
    sharing = shared_steps.plan(config, siblings, steps_per_epoch, device=device.type, precision=precision,
                                cached=cached, compile=compile, data=data.fingerprint)

    history, best, stopped, train_seconds, eval_seconds = [], None, None, 0.0, 0.0
    bar = tqdm(total=total_steps, disable=not progress, unit="step", leave=False,
               desc=f"freeze {depth} · {config.scheduler} · seed {config.seed}")
    with view:
        forward = torch.compile(model, dynamic=True) if compile else model
        for epoch in range(1, config.epochs + 1):
            model.train()
            if not config.frozen_dropout:  # frozen layers run in eval mode: the same function the cache computed
                for module in frozen_modules(backbone, depth) if not cached else []:
                    module.eval()
            started, loss_sum = _sync_time(device), torch.zeros((), device=device)
            skip, earlier = 0, 0.0  # steps (and their seconds) of this epoch that a snapshot already took
            if epoch == 1 and sharing.resumed:
                shared_steps.STORE.restore(sharing.resumed, params, optimizer, scheduler, device, loss_sum)
                skip, earlier = sharing.resumed.steps, sharing.resumed.seconds
                bar.update(skip)
            batches = length_grouped_batches(train.lengths, config.batch_size, seed=config.seed * 1000 + epoch)
            for step in range(skip, len(batches) + 1):
                if epoch == 1 and step in sharing.keep_at:  # the state after `step` steps, for a sibling
                    paused = _sync_time(device)
                    shared_steps.STORE.take(sharing.key, sharing.rates[:step], config.run_id, params, optimizer,
                                            device, loss_sum, earlier + paused - started)
                    started += _sync_time(device) - paused  # the copy is not this run's training time
                if step == len(batches):
                    break
                indices = batches[step]
                target = to_device(labels["train"][indices], device)
                with autocast():
                    loss = forward(**inputs("train", indices), labels=target).loss
                loss.backward()
                clip_gradients(params, 1.0, device)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                bar.update()
            epoch_seconds = _sync_time(device) - started + earlier
            train_loss = loss_sum.item() / steps_per_epoch
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch}: lower the learning "
                                         "rate or check the data")
            train_seconds += epoch_seconds

            started = time.perf_counter()
            metrics, predictions = _evaluate(forward, inputs, splits["validation"], labels["validation"], "validation",
                                             data.num_labels, device, autocast)
            eval_seconds += time.perf_counter() - started
            entry = {"epoch": epoch, **metrics, "train_loss": round(train_loss, 5),
                     "train_seconds": round(epoch_seconds, 3)}
            history.append(entry)
            bar.set_postfix(accuracy=f"{metrics['accuracy']:.4f}", loss=f"{metrics['loss']:.4f}")
            if best is None or _better(metrics, best["metrics"], config.select_by):
                best = {"epoch": epoch, "metrics": metrics, "predictions": predictions,
                        "weights": [p.detach().clone() for p in params]}
            if on_epoch is not None and (stopped := on_epoch(entry)):
                break
        bar.close()

        test_metrics = None
        if "test" in splits:
            with torch.no_grad():
                for p, w in zip(params, best["weights"]):
                    p.copy_(w)
            started = time.perf_counter()
            test_metrics, _ = _evaluate(forward, inputs, splits["test"], labels["test"], "test", data.num_labels,
                                        device, autocast)
            eval_seconds += time.perf_counter() - started

    train_tokens = int(train.lengths.sum()) * len(history)
    prefix_train = prefix["seconds"].get("train", 0.0) if cached else 0.0
    prefix_eval = sum(v for k, v in prefix["seconds"].items() if k != "train") if cached else 0.0
    predictions = best["predictions"]
    return {
        "run_id": config.run_id,
        "config": config.to_dict(),
        "accuracy": best["metrics"]["accuracy"],
        "f1": best["metrics"]["f1"],
        "loss": best["metrics"]["loss"],
        "best_epoch": best["epoch"],
        "selected_by": config.select_by,
        "history": history,
        "stopped_early": stopped,
        "test_accuracy": test_metrics["accuracy"] if test_metrics else None,
        "test_f1": test_metrics["f1"] if test_metrics else None,
        # What the run costs alone: its steps plus building its frozen-prefix cache (even if reused here).
        "train_seconds": round(train_seconds + prefix_train, 3),
        "train_loop_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds + prefix_eval, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "prefix_cache": prefix,
        "shared_steps": sharing.record(),
        "trainable_params": trainable,
        "total_params": total,
        "train_samples": len(train),
        "validation_samples": len(splits["validation"]),
        "test_samples": len(splits["test"]) if "test" in splits else 0,
        "num_labels": data.num_labels,
        "label_names": [str(n) for n in data.label_names],
        "text_columns": list(data.text_columns),
        "label_column": data.label_column,
        "tokens_per_second": round(train_tokens / train_seconds, 1) if train_seconds else None,
        "peak_memory_mb": round(rec.peak_memory_mb(device), 1),
        "peak_memory_scope": "run (CUDA allocator)" if device.type == "cuda" else "process (max RSS)",
        "device": device_name(device),
        "precision": precision,
        "compiled": compile,
        "metrics_backend": rec.metrics_backend(),
        "versions": rec.versions(),
        "finished_at": rec.now(),
        "validation_predictions": [int(p) for p in predictions],
        "validation_correct": "".join("1" if p == y else "0" for p, y in zip(predictions,
                                                                              splits["validation"].labels)),
    }


def make_optimizer(model, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel (CUDA; CPU since torch 2.4): the update of every trainable
    parameter, embeddings included, is otherwise a chain of small ops that costs as much as the backward pass."""
    groups = decay_groups(model, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=config.learning_rate)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, device: torch.device) -> None:
    """`clip_grad_norm_`, minus its multiply-by-one on the CPU: there reading the norm costs no device sync, so
    the rescale (a pass over every gradient) runs only when the norm is above `max_norm`. Same result."""
    if device.type != "cpu" or not hasattr(torch.nn.utils, "get_total_norm"):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _better(new: dict, old: dict, select_by: str) -> bool:
    return new["loss"] < old["loss"] if select_by == "loss" else new[select_by] > old[select_by]


@torch.inference_mode()
def _evaluate(model, inputs, split, labels, name, num_labels, device, autocast) -> tuple[dict, np.ndarray]:
    model.eval()
    predictions = np.empty(len(split), dtype=np.int64)
    loss_sum = 0.0
    for indices in sorted_batches(split.lengths, eval_tokens(device)):
        with autocast():
            logits = model(**inputs(name, indices)).logits.float()
        target = labels[indices].to(device)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        predictions[indices] = logits.argmax(-1).cpu().numpy()
    metrics = rec.classification_metrics(predictions, split.labels, num_labels)
    return {"accuracy": round(metrics["accuracy"], 6), "loss": round(loss_sum / max(1, len(split)), 6),
            "f1": round(metrics["f1"], 6)}, predictions

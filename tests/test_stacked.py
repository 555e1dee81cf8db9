"""Stacked runs compute what the same runs compute one at a time (core.stacked)."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import weakref

import pytest
import torch
from transformers import get_scheduler, set_seed

from conftest import GraphOnTheCpu, quick_config, save_tiny, write_toy_dataset
import core.stacked
from core import train as solo_train
from core.batches import length_grouped_batches, subsample
from core.data import load_text_data
from core.device import clip_gradients, make_optimizer
from core.model import find_backbone, freeze, load_model, load_tokenizer, num_layers
from core.prefix_cache import PrefixCache, layer_view, prefix_states
from core.stacked import StackedRun, StackedRuns, group_key, pad_and_stack
from core.stacked_modules import stack_models

NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)}
ZERO_GRADIENT = ("attention.self.key.bias", "attention.k_lin.bias")
TRAIN_ROWS = 118  # batch 4: 30 steps, the last one 2 rows (padded in the stack)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_toy_dataset(tmp_path_factory.mktemp("stack-data"), train=140, validation=48))


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def model_dir(request, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp(f"stack-{request.param}")
    return str(save_tiny(folder, request.param, layers=2, **NO_DROPOUT[request.param]))


def configs(model: str, data: str, depth: int, precision: str = "fp32"):
    base = quick_config(model, data, freeze_depth=depth, batch_size=4, max_train_samples=TRAIN_ROWS,
                        warmup_ratio=0.1, precision=precision, dev_size=0)  # the engine's prepare carves no dev
    return [base.replace(seed=0, scheduler="linear", learning_rate=1e-3),
            base.replace(seed=1, scheduler="cosine", learning_rate=3e-3, weight_decay=0.1),
            base.replace(seed=2, scheduler="constant_with_warmup", learning_rate=5e-4, select_by="loss")]


def prepare(config, autocast=contextlib.nullcontext, cache: PrefixCache | None = None, dtype=torch.float32,
            cached: bool = True):
    """What a run's prepare stage hands the engine: its model (own seed, in `dtype`), training rows and inputs
    (`cached`: a frozen prefix's states from the prefix cache, else tokens through the frozen layers)."""
    cache = cache or PrefixCache()
    tokenizer = load_tokenizer(config.model)
    text = load_text_data(config.dataset, tokenizer, None, None, config.max_length)
    rows = subsample(len(text.splits["train"]), config.max_train_samples, config.seed)
    train, validation = text.splits["train"].subset(rows, False), text.splits["validation"].subset(None, False)
    set_seed(config.seed)
    model = load_model(config.model, text.label_names).to(dtype)
    backbone = freeze(model, config.freeze_depth)
    sources = {"train": lambda i: train.batch(i, text.pad_id, "cpu"),
               "validation": lambda i: validation.batch(i, text.pad_id, "cpu")}
    if config.freeze_depth > 0 and cached:
        rows_key = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        for name, split, key in (("train", train, rows_key), ("validation", validation, "all")):
            states, _ = prefix_states(cache, model, backbone, split,
                                      (config.model, text.fingerprint, name, key, "x"), config.freeze_depth,
                                      text.pad_id, "cpu", autocast)
            sources[name] = lambda i, s=states: s.batch(i, "cpu")
    run = StackedRun(config, model, sources["train"], train.lengths, torch.as_tensor(train.labels))
    return run, (sources["validation"], validation.lengths, validation.labels, text.num_labels), text.pad_id


def solo_weights(run: StackedRun, autocast=contextlib.nullcontext, cached: bool = True,
                 scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
    """The project's solo step (fused AdamW, clip 1.0, its schedule; `scaler`: fp16's loss scaling, as
    `core.train.train_step` applies it) on one run, one epoch."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    config, model = run.config, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    batches = length_grouped_batches(run.lengths, config.batch_size, seed=config.seed * 1000 + 1)
    schedule = get_scheduler(config.scheduler, optimizer,
                             num_warmup_steps=math.ceil(config.warmup_ratio * len(batches)),
                             num_training_steps=len(batches))
    backbone = find_backbone(model)
    view = layer_view(backbone, config.freeze_depth, num_layers(model.config), True) \
        if config.freeze_depth and cached else contextlib.nullcontext()
    model.train()
    with view:
        for indices in batches:
            with autocast():
                loss = model(**run.batch(indices), labels=run.labels[indices]).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            clip_gradients(params, 1.0, torch.device("cpu"))
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.norm().clamp_min(1e-12))


def stacked_error(weights: dict, reference: dict) -> tuple[float, float]:
    """(whole, worst tensor) relative error. Attention key biases have an exactly zero gradient (softmax ignores
    a shift shared by a row's logits), so both sides move them by AdamW-normalised rounding noise: left out."""
    names = [n for n in reference if not n.endswith(ZERO_GRADIENT)]
    whole = relative_error(torch.cat([weights[n].flatten() for n in names]),
                           torch.cat([reference[n].flatten() for n in names]))
    return whole, max(relative_error(weights[n], reference[n]) for n in names)


@pytest.mark.parametrize("depth", [0, 1])
def test_stacked_runs_match_solo_runs_in_fp32(model_dir, data, depth):
    group, cache = configs(model_dir, data, depth), PrefixCache()
    prepared = [prepare(c, cache=cache) for c in group]
    runs = [p[0] for p in prepared]
    assert len({len(r.lengths) for r in runs}) == 1 and math.ceil(TRAIN_ROWS / 4) == 30
    engine = StackedRuns(runs, steps_per_epoch=30, pad_id=prepared[0][2], device="cpu", cached=depth > 0)
    engine.train_epoch(1)
    for i, run in enumerate(runs):
        initial = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        reference = solo_weights(run)  # trains the run's own (untouched) model: the stack holds copies
        weights = engine.run_weights(i)
        assert weights.keys() == reference.keys()
        whole, worst = stacked_error(weights, reference)
        assert whole < 1e-5, f"seed {run.config.seed}: the weights differ by {whole:.2e} relative"
        assert worst < 1e-4, f"seed {run.config.seed}: a weight tensor differs by {worst:.2e} relative"
        assert max(relative_error(weights[n], initial[n]) for n in reference) > 1e-3  # 30 steps really trained
    # Predictions, metrics and records of a group against the same runs alone: tests/test_group.py.


@pytest.mark.parametrize("depth", [0, 1])
def test_stacked_runs_are_solo_runs_to_fp64_rounding(model_dir, data, depth):
    """fp32 rounding, amplified over 30 AdamW steps, varies 1000-fold with the initial weights (2e-8 to 2e-5 on
    these tiny models: AdamW normalises the rounding noise of near-zero gradients to whole steps), so the fp32
    test above could hide a small real difference (an eps placed elsewhere, a clip norm off by 1e-6). In fp64 that
    noise is gone: three runs stacked must end where each alone does, to rounding (1e-13 measured). At depth 1
    the frozen layer runs live (the prefix cache keeps fp32 states), shared by the stacked runs."""
    group = configs(model_dir, data, depth)
    prepared = [prepare(c, dtype=torch.float64, cached=False) for c in group]
    engine = StackedRuns([p[0] for p in prepared], steps_per_epoch=30, pad_id=prepared[0][2], device="cpu",
                         cached=False)
    shared = len(engine.params) < len(list(prepared[0][0].model.parameters()))  # frozen weights: one copy
    assert shared == (depth > 0)
    engine.train_epoch(1)
    for i, config in enumerate(group):
        alone = solo_weights(prepare(config, dtype=torch.float64, cached=False)[0], cached=False)
        whole, worst = stacked_error(engine.run_weights(i), alone)
        assert whole < 1e-11 and worst < 1e-10, f"seed {config.seed}: {whole:.1e} whole, {worst:.1e} worst"


@pytest.mark.parametrize("depth", [0, 1])
def test_a_captured_group_computes_what_the_eager_group_does(model_dir, data, depth):
    """The capture path: every step padded to batch-size rows and a length bucket, copied into that bucket's
    static buffers, the rates read from the device table, the step "replayed" after 3 warm-up steps per bucket
    (GraphOnTheCpu replays by calling the step on the static buffers). After 30 steps the weights are those of
    the eager stacked step within 1e-5 relative, and so are the epoch's losses."""
    group, cache = configs(model_dir, data, depth), PrefixCache()
    prepared = [prepare(c, cache=cache) for c in group]
    pad_id = prepared[0][2]
    eager = StackedRuns([p[0] for p in prepared], 30, pad_id, "cpu", cached=depth > 0)
    graphed = StackedRuns([prepare(c, cache=cache)[0] for c in group], 30, pad_id, "cpu", cached=depth > 0,
                          capture=GraphOnTheCpu, buckets=(6, 8, 10))
    eager_losses, graphed_losses = eager.train_epoch(1), graphed.train_epoch(1)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    assert len(graphed.captured.replays) >= 2 and graphed.captured.captures == len(graphed.captured.replays)
    step = graphed.captured  # every step ran once: eagerly (warm-up), or replayed (the capture step included)
    assert sum(step.calls.values()) - len(step.replays) + step.replayed == 30
    assert graphed.device_rates.index.item() == 29  # one advance per step, on the device (clamped at the end)
    for i in range(len(group)):
        whole, worst = stacked_error(graphed.run_weights(i), eager.run_weights(i))
        assert whole < 1e-5, f"run {i}: the weights differ by {whole:.2e} relative"
        assert worst < 1e-4, f"run {i}: a weight tensor differs by {worst:.2e} relative"


@pytest.mark.parametrize("capture", [None, GraphOnTheCpu], ids=["eager", "captured"])
def test_a_stacked_epoch_copies_host_tensors_to_the_device_only_queued(model_dir, data, capture, monkeypatch):
    """On a GPU a plain `.to(device)` of a host tensor waits for every kernel queued before it: the engine copied
    each run's labels so, N host syncs a step, which the captured step exists to avoid (the host can no longer
    prepare the next step while the GPU runs this one). Every host tensor must go through `core.data.to_device`
    (pinned memory, a queued copy); on the CPU that is what can be checked: no `.to` with a device in
    core/stacked.py while an epoch trains."""
    import os
    import sys

    group = configs(model_dir, data, 0)
    engine = StackedRuns([prepare(c)[0] for c in group], 30, prepare(group[0])[2], "cpu", capture=capture,
                         buckets=(6, 8, 10) if capture else None)
    real, moved = torch.Tensor.to, []

    def spy(tensor, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.endswith(os.path.join("core", "stacked.py")) and (
                "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)):
            moved.append((sys._getframe(1).f_lineno, tuple(tensor.shape)))
        return real(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    engine.train_epoch(1)
    assert moved == [], f"blocking copies to the device from core/stacked.py (line, shape): {moved[:4]}"


@pytest.mark.parametrize("depth, capture", [(0, None), (1, None), (1, GraphOnTheCpu)],
                         ids=["depth0-eager", "depth1-eager", "depth1-captured"])
def test_a_narrowed_group_goes_on_where_the_whole_group_stood(model_dir, data, depth, capture, monkeypatch):
    """After epoch 1, runs 0 and 2 go on without run 1 (it ended): the narrowed group carries their weights, AdamW
    moments, step count and place in their schedules, so after epoch 2 they hold what the whole group gives them
    (within 1e-5 relative), and it steps 2 runs, not 3 (a captured one captures again for its new shapes)."""
    group, cache = [c.replace(epochs=2) for c in configs(model_dir, data, depth)], PrefixCache()
    prepared = [prepare(c, cache=cache) for c in group]
    pad_id, extra = prepared[0][2], {} if capture is None else {"capture": capture, "buckets": (6, 8, 10)}
    whole = StackedRuns([p[0] for p in prepared], 30, pad_id, "cpu", cached=depth > 0, **extra)
    narrow = StackedRuns([prepare(c, cache=cache)[0] for c in group], 30, pad_id, "cpu", cached=depth > 0, **extra)
    whole.train_epoch(1), narrow.train_epoch(1)
    before, freed = [weakref.ref(narrow.model), *map(weakref.ref, narrow.params)], []

    def stack(models):  # by the time the smaller group is stacked, the wider one's weights must be given back
        gc.collect()
        freed.append(all(ref() is None for ref in before))
        return stack_models(models)
    monkeypatch.setattr(core.stacked, "stack_models", stack)
    narrow = narrow.narrowed([0, 2])  # `narrow` holds the wider group while the smaller one is built, as callers do
    assert freed == [True], "the wider group's weights are still held while the smaller one is built"

    assert len(narrow.runs) == 2 and narrow.params[0].shape[0] == 2 and narrow.global_step == 30
    assert narrow.step_count.tolist() == [30, 30] and narrow.rates[30].tolist() == whole.rates[30, [0, 2]].tolist()
    whole_losses, narrow_losses = whole.train_epoch(2), narrow.train_epoch(2)
    assert narrow_losses == pytest.approx(whole_losses[[0, 2]], rel=1e-5)
    if capture is not None:
        assert narrow.captured.replayed > 0 and narrow.device_rates.index.item() == 59
    for slot, run in enumerate([0, 2]):
        error, worst = stacked_error(narrow.run_weights(slot), whole.run_weights(run))
        assert error < 1e-5, f"run {run}: the weights differ by {error:.2e} relative"


@pytest.mark.parametrize("capture", [None, GraphOnTheCpu], ids=["eager", "captured"])
def test_each_stacked_run_scales_its_loss_as_its_own_grad_scaler(model_dir, data, capture):
    """fp16's loss scaling, per run: run 1's scale is infinite, so every one of its steps overflows and is skipped
    (its weights never move, its AdamW step count stays 0), while runs 0 and 2 train on, their scales growing
    every 7 clean steps. Each run's weights and scale are what a solo run with its own GradScaler of the same
    settings reaches (the arithmetic is fp32 here, where scaling by a power of two is exact: the stacked-vs-solo
    bound of fp32 holds). A scale shared by the group would skip every run's step with run 1's."""
    group, cache = configs(model_dir, data, 0), PrefixCache()
    runs = [prepare(c, cache=cache) for c in group]
    extra = {} if capture is None else {"capture": capture, "buckets": (6, 8, 10)}
    engine = StackedRuns([r[0] for r in runs], 30, runs[0][2], "cpu", loss_scaling=True, **extra)
    engine.scales.scale[1] = math.inf
    engine.scales.growth_interval = 7
    initial = engine.run_weights(1)
    engine.train_epoch(1)
    assert engine.step_count.tolist() == [30, 0, 30]
    for i, (run, _, _) in enumerate(runs):
        scaler = torch.amp.GradScaler("cpu", init_scale=math.inf if i == 1 else 2.0 ** 16, growth_interval=7)
        reference = solo_weights(run, scaler=scaler)
        whole, worst = stacked_error(engine.run_weights(i), reference)
        assert whole < 1e-5, f"run {i}: the weights differ by {whole:.2e} relative"
        assert engine.scales.scale[i].item() == scaler.get_scale()
    assert engine.scales.scale.tolist() == [2.0 ** 20, math.inf, 2.0 ** 20]  # 30 clean steps: grown 4 times
    assert all(torch.equal(engine.run_weights(1)[n], initial[n]) for n in initial)
    narrow = engine.narrowed([0, 1])  # the scales and step counts of the runs that go on carry over
    assert narrow.scales.scale.tolist() == [2.0 ** 20, math.inf] and narrow.step_count.tolist() == [30, 0]
    assert narrow.scales.growth_tracker.tolist() == [2, 0]


def test_stacked_bf16_accuracy_matches_solo_within_noise(data, tmp_path):
    from core.group import train_group
    from core.session import Session
    from core.prepare import prepare as prepare_run
    model = str(save_tiny(tmp_path / "m", "bert", layers=2, **NO_DROPOUT["bert"]))
    group = [c.replace(epochs=2, learning_rate=3e-3) for c in configs(model, data, 0, precision="bf16")]
    session = Session(timing_repeats=0)
    together = train_group([prepare_run(c, session, "cpu", False, True) for c in group], session, [None] * 3)
    accuracies = []
    for config, training in zip(group, together):
        record = solo_train.run(config, device="cpu", progress=False).to_dict()
        # 48 validation rows: one standard error of an accuracy near 0.8 is ~0.06; bf16 rounding may flip a
        # few near-tie rows, so allow 3 rows (0.0625) per epoch. (Measured: equal at every epoch.)
        for solo_epoch, stacked_epoch in zip(record["history"], training.history, strict=True):
            assert abs(solo_epoch["accuracy"] - stacked_epoch["accuracy"]) <= 3 / 48
        accuracies.append(training.best["metrics"]["accuracy"])
    assert max(accuracies) > 0.9  # the comparison is between runs that learned, not between two coin flips


def test_dropout_masks_are_drawn_per_run(tmp_path, data):
    """Two identical runs stacked with dropout on must diverge: each run draws its own masks."""
    model = str(save_tiny(tmp_path / "m", "bert", layers=1))  # default dropout 0.1
    config = quick_config(model, data, batch_size=4, max_train_samples=8)
    runs = [prepare(config)[0] for _ in range(2)]
    engine = StackedRuns(runs, steps_per_epoch=2, pad_id=0, device="cpu")
    engine.train_epoch(1)
    first, second = engine.run_weights(0), engine.run_weights(1)
    assert max(relative_error(first[n], second[n]) for n in first) > 1e-4


def test_pad_and_stack_pads_rows_and_tokens_per_run():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    b = {"input_ids": torch.tensor([[8], [9]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    inputs, labels, weights = pad_and_stack([a, b], [torch.tensor([1]), torch.tensor([0, 1])], pad_id=0)
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0], [9, 0, 0]]
    # a padding row attends to its first token only (an all-masked row gives NaN), and weighs nothing
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert labels.tolist() == [[1, 0], [0, 1]] and weights.tolist() == [[1, 0], [1, 1]]


def test_runs_of_different_work_shape_are_refused(tiny_bert, toy_data):
    a = quick_config(tiny_bert, toy_data, seed=0)
    assert group_key(a) == group_key(a.replace(seed=3, scheduler="cosine", learning_rate=5e-5))
    assert group_key(a) != group_key(a.replace(batch_size=8))
    runs = [prepare(a)[0], prepare(a.replace(freeze_depth=1))[0]]
    with pytest.raises(ValueError, match="work shape"):
        StackedRuns(runs, steps_per_epoch=6, pad_id=0, device="cpu")


def test_frozen_modules_are_shared_only_when_equal(tiny_bert):
    models = []
    for seed in (0, 1):
        set_seed(seed)
        models.append(load_model(tiny_bert, ["0", "1"]))
        freeze(models[-1], 1)
    with torch.no_grad():
        models[1].classifier.weight.add_(1.0)  # a head of its own (this tiny checkpoint ships one)
    stacked, axis = stack_models(models)
    assert axis.runs == 2
    assert stacked.bert.embeddings.word_embeddings is not models[0].bert.embeddings.word_embeddings  # a copy
    assert type(stacked.bert.embeddings.word_embeddings).__name__ == "Embedding"  # frozen: shared, not stacked
    assert stacked.classifier.weight.shape[0] == 2
    for run in (0, 1):
        assert torch.equal(stacked.classifier.weight[run], models[run].classifier.weight)
    with torch.no_grad():
        models[1].bert.embeddings.word_embeddings.weight[3] += 1
    with pytest.raises(ValueError, match="differs between runs"):
        stack_models(models)


@pytest.mark.parametrize("kind", ["roberta", "electra", "bert", "distilbert"])
def test_a_stacked_model_computes_each_runs_logits(kind, tmp_path):
    """Every BERT-like family stacks: run i's rows of the stacked model give run i's own model's logits."""
    from transformers import AutoModelForSequenceClassification
    folder = save_tiny(tmp_path / kind, kind, layers=2)
    models = []
    for run in range(3):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * run)  # every weight its own per run
        models.append(model)
    stacked, axis = stack_models(models)
    ids = torch.randint(5, 30, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    axis.rows = 2
    with torch.no_grad():
        out = stacked.eval()(input_ids=ids.repeat(3, 1), attention_mask=mask.repeat(3, 1)).logits.view(3, 2, -1)
        reference = torch.stack([m(input_ids=ids, attention_mask=mask).logits for m in models])
    assert torch.allclose(out, reference, atol=1e-6) and not torch.allclose(reference[0], reference[2])


def test_a_layer_norm_without_bias_stacks_and_trains_per_run():
    """LayerNorm(bias=False) (ModernBERT's) stacked: run i's rows give run i's own norm, and a backward reaches
    only run i's weight. It failed before ('NoneType' object has no attribute 'detach')."""
    from core.stacked_modules import RunAxis, StackedLayerNorm
    torch.manual_seed(0)
    norms = [torch.nn.LayerNorm(8, bias=False) for _ in range(3)]
    with torch.no_grad():
        for run, norm in enumerate(norms):
            norm.weight.mul_(1 + run)
    axis = RunAxis(3)
    axis.rows = 2
    stacked = StackedLayerNorm(norms, axis)
    assert stacked.bias is None
    x = torch.randn(3 * 2, 5, 8)
    out = stacked(x)
    reference = torch.cat([norm(x[2 * run:2 * run + 2]) for run, norm in enumerate(norms)])
    assert torch.allclose(out, reference, atol=1e-6)
    out[2:4].sum().backward()  # run 1's rows only
    grads = stacked.weight.grad
    assert grads[1].abs().sum() > 0 and grads[0].abs().sum() == 0 and grads[2].abs().sum() == 0
